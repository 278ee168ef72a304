"""End-to-end training on the embedded digits: the run directory contract and exact resume."""
import functools
import json

import pytest
import torch
from conftest import Crash, crash_after, tiny_cfg, untimed

from sparta import checkpoint, outcomes
from sparta.errors import CheckpointError, ConfigError
from sparta.experiment import load_model, prepare_resume, train
from sparta.rundir import RunDir

RECORD_KEYS = {"stage", "epoch", "step", "lr", "train_loss", "train_robust_acc", "val_clean_acc", "val_robust_acc",
               "val_robust_loss", "test_clean_acc", "test_robust_acc", "density", "epoch_time_s"}
SUMMARY_KEYS = {"sa_best", "ra_best", "sa_final", "ra_final", "robust_overfitting", "best_epoch", "epochs",
                "wall_time_s"}


def test_run_directory_contract_and_learning(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "epochs=4")
    summary = train(cfg)
    rd = RunDir(cfg.run_dir)
    records = rd.read_metrics()
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert all(RECORD_KEYS <= set(r) for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns
    assert records[-1]["test_clean_acc"] > 30.0  # 10 classes: chance is 10 %
    saved = json.loads(rd.summary.read_text())
    assert SUMMARY_KEYS <= set(saved) and saved == json.loads(json.dumps(summary))
    assert_outcomes_match(rd, records, saved)
    best = max(records, key=lambda r: r["val_robust_acc"])  # first maximum wins
    assert saved["best_epoch"] == best["epoch"] and saved["ra_best"] == best["test_robust_acc"]
    assert saved["robust_overfitting"] == pytest.approx(best["test_robust_acc"] - records[-1]["test_robust_acc"])
    state = torch.load(rd.last, weights_only=True)
    assert {"model", "masks", "config", "epoch", "step", "optimizer", "controller", "rng"} <= set(state)
    assert state["epoch"] == 4 and state["masks"] == {}
    model = load_model(rd.best)
    assert not model.training
    ref = torch.load(rd.best, weights_only=True)["model"]
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_equals_uninterrupted(tmp_path, precision):
    full = train(tiny_cfg(tmp_path / "a" / "run", f"train.precision={precision}"))
    assert full["train_precision"] == precision
    # the same run dies after its epoch-2 checkpoint, then is resumed from last.pt
    part = tiny_cfg(tmp_path / "b" / "run", f"train.precision={precision}")
    with pytest.raises(Crash):
        train(part, on_epoch=crash_after(2))
    resumed = train(prepare_resume(part.run_dir, [], force=False), resume=True)
    a = torch.load(RunDir(tmp_path / "a" / "run").last, weights_only=True)
    b = torch.load(RunDir(tmp_path / "b" / "run").last, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ma, mb = RunDir(tmp_path / "a" / "run").read_metrics(), RunDir(tmp_path / "b" / "run").read_metrics()
    assert untimed(ma) == untimed(mb)
    for key in ("sa_best", "ra_best", "sa_final", "ra_final", "best_epoch", "steps"):
        assert full[key] == resumed[key]
    oa, ob = RunDir(tmp_path / "a" / "run").read_outcomes(), RunDir(tmp_path / "b" / "run").read_outcomes()
    assert last_per_key(oa) == last_per_key(ob) and len(last_per_key(oa)) == 4  # 3 epochs' test, the gap


def assert_outcomes_match(rd, records, summary):
    """outcomes.jsonl: one test record per evaluated epoch, then the gap set's, whose accuracies are
    metrics.jsonl's and summary.json's."""
    lines = rd.read_outcomes()
    assert ([(o["split"], o["epoch"]) for o in lines]
            == [("test", r["epoch"]) for r in records] + [("gap", records[-1]["epoch"])])
    for r in records:
        test = outcomes.find(lines, split="test", epoch=r["epoch"], stage=r["stage"])
        assert (test.n == 200 and test.accuracy("robust") == r["test_robust_acc"]
                and test.accuracy("clean") == r["test_clean_acc"])
    gap = outcomes.find(lines, split="gap", epoch=records[-1]["epoch"], stage="train")
    assert gap.n == summary["gap_subset"] == 512 and gap.accuracy("robust") == summary["train_robust_acc"]


def last_per_key(lines):
    return {(o["stage"], o["epoch"], o["split"]): o for o in lines}


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path / "run")
    with pytest.raises(Crash):
        train(cfg, on_epoch=crash_after(2))
    rd = RunDir(cfg.run_dir)
    # simulate a kill after epoch 3's record was appended but before its checkpoint was written
    rd.append_metrics({**rd.read_metrics()[-1], "epoch": 3})
    rd.append_outcomes({**rd.read_outcomes()[-1], "epoch": 3})
    with open(rd.outcomes, "a") as f:
        f.write('{"stage": "train", "epoch": 3, "spl')  # and the next line cut short
    train(prepare_resume(cfg.run_dir, [], force=False), resume=True)
    assert [r["epoch"] for r in rd.read_metrics()] == [1, 2, 3]
    assert_outcomes_match(rd, rd.read_metrics(), json.loads(rd.summary.read_text()))


def test_resume_refuses_changed_config_and_non_runs(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "epochs=1")
    train(cfg)
    with pytest.raises(ConfigError, match="optim.lr"):
        prepare_resume(cfg.run_dir, ["optim.lr=0.2"], force=False)
    with pytest.raises(CheckpointError, match="not a sparta run"):
        prepare_resume(tmp_path, [], force=False)
    with pytest.raises(ConfigError, match="already exists"):
        train(cfg)


def test_trades_and_fgsm_and_clean_objectives_run(tmp_path):
    for i, extra in enumerate([["objective.name=trades"],
                               ["attack.name=fgsm", "attack.random_start=true", "attack.alpha=0.125"],
                               ["attack.name=none", "attack.bn_mode=eval"]]):
        s = train(tiny_cfg(tmp_path / str(i) / "run", "epochs=1", *extra))
        assert 0.0 <= s["ra_final"] <= s["sa_final"] + 100.0


def test_corrupted_checkpoint_is_one_clear_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read") as e:
        checkpoint.load(bad)
    assert "\n" not in str(e.value)


def test_tensorboard_logging_writes_every_record(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(tmp_path / "run", "epochs=2", "logging.tensorboard=true")
    train(cfg)
    events = EventAccumulator(str(cfg.run_dir / "tensorboard"))
    events.Reload()
    records = RunDir(cfg.run_dir).read_metrics()
    scalars = events.Scalars("train/test_robust_acc")
    assert [s.step for s in scalars] == [1, 2]
    assert [s.value for s in scalars] == pytest.approx([r["test_robust_acc"] for r in records])


def test_precision_is_recorded_and_auto_is_decided_once_per_run(tmp_path, monkeypatch):
    monkeypatch.setattr("sparta.precision.fast_bf16", lambda device: (True, "test: fast"))
    cfg = tiny_cfg(tmp_path / "run", "train.precision=auto", "eval.precision=bf16")
    with pytest.raises(Crash):
        train(cfg, on_epoch=crash_after(1))
    monkeypatch.setattr("sparta.precision.fast_bf16", lambda device: (False, "test: slow"))
    summary = train(prepare_resume(cfg.run_dir, [], force=False), resume=True)
    assert summary["train_precision"] == "bf16" and summary["train_precision_rule"] == "auto: test: fast"
    assert summary["eval_protocol"]["precision"] == "bf16" and "this run: bf16" in summary["flops_convention"]
    assert torch.load(RunDir(cfg.run_dir).last, weights_only=True)["precision"]["name"] == "bf16"
    fresh = train(tiny_cfg(tmp_path / "fresh" / "run", "train.precision=auto", "epochs=1"))
    assert fresh["train_precision"] == "fp32" and fresh["eval_protocol"]["precision"] == "fp32"


def test_fp16_without_cuda_is_one_config_error_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="train.precision=fp16 needs CUDA"):
        train(tiny_cfg(tmp_path / "run", "train.precision=fp16"))
    assert not (tmp_path / "run").exists()


def test_channels_last_trains_every_conv_weight_in_nhwc(tmp_path, monkeypatch):
    # exact densities, zeros and resume under channels_last: tests/test_methods.py
    import sparta.train as loop

    layouts = []
    real_step = loop.train_step

    def recording(model, *args, **kwargs):
        convs = [p for p in model.parameters() if p.dim() == 4]  # the first has 1 input channel: both layouts at once
        layouts.append((all(p.is_contiguous(memory_format=torch.channels_last) for p in convs),
                        sum(not p.is_contiguous() for p in convs)))
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", recording)
    train(tiny_cfg(tmp_path / "run", "epochs=1", "train.channels_last=true", "method.name=flying_bird",
                   "method.density=0.3", "method.update_every=4"))
    assert layouts == [(True, 2)] * 16  # 512 images / 32 per step


def test_channels_last_refuses_the_narrow_strided_1x1_layer_that_crashed_onednn(tmp_path):
    # preact_resnet18 at base_width 4: layer2.0.shortcut (1x1, stride 2, 4 input channels) made oneDNN's
    # NHWC weight gradient corrupt the heap (a segfault on AMD EPYC; on any x86 CPU with ONEDNN_MAX_CPU_ISA=AVX2)
    narrow = ["model.name=preact_resnet18", "model.base_width=4", "train.channels_last=true"]
    with pytest.raises(ConfigError, match=r"body\.layer2\.0\.shortcut \(and 1 more\) is a strided 1x1 convolution "
                                          r"with 4 input channels.*base_width.*train\.channels_last=false"):
        train(tiny_cfg(tmp_path / "run", *narrow))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_nhwc_unsafe_layers_are_the_narrow_strided_1x1_convolutions():
    from torch import nn

    from sparta.layout import channels_last_problem, nhwc_unsafe_convs

    net = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 8, 3, stride=2), nn.Conv2d(8, 16, 1),
                        nn.Conv2d(16, 32, 1, stride=2), nn.Conv2d(30, 30, 1, stride=2, groups=2))
    assert nhwc_unsafe_convs(net) == {"0": 4, "4": 15}  # 3x3, stride 1 and >= 16 channels per group are safe
    assert channels_last_problem(net, torch.device("cpu")).startswith("train.channels_last=true: 0 (and 1 more) ")
    assert channels_last_problem(net, torch.device("cuda")) is None  # cuDNN, not oneDNN
    assert channels_last_problem(net[1:4], torch.device("cpu")) is None


def test_a_stage_whose_network_became_too_narrow_for_nhwc_trains_nchw_with_a_warning(tmp_path, monkeypatch):
    # as after a channel ticket slimmed a shortcut below 16 channels: the search stage ran NHWC
    import sparta.experiment as experiment
    import sparta.train as loop

    calls, layouts, real_step = [], [], loop.train_step
    monkeypatch.setattr(experiment, "channels_last_problem",
                        lambda model, device: "too narrow" if calls else calls.append(1))

    def recording(model, *args, **kwargs):
        second_conv = [p for p in model.parameters() if p.dim() == 4][1]  # the first has 1 input channel
        layouts.append(second_conv.is_contiguous())
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", recording)
    with pytest.warns(UserWarning, match="too narrow; stage train trains in the default layout"):
        train(tiny_cfg(tmp_path / "run", "epochs=1", "train.channels_last=true", "method.name=robust_bird",
                       "method.density=0.5", "method.max_search_epochs=1", "data.train_subset=128"))
    assert layouts == [False] * 4 + [True] * 4  # search NHWC, the ticket's training NCHW


def test_channels_last_at_the_threshold_trains_on_the_avx2_kernels_that_crashed(tmp_path):
    # the same network at base_width 16 (16 input channels in layer2.0.shortcut), on the oneDNN kernels
    # of the reproduction, in a child process so a crash fails this test instead of the suite
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "sparta", "train", str(root / "configs" / "demo.yaml"), f"out_dir={tmp_path / 'r'}",
         "model.name=preact_resnet18", "model.base_width=16", "train.channels_last=true", "epochs=1", "batch_size=32",
         "data.train_subset=96", "data.val_size=32", "attack.steps=1", "eval.steps=1", "eval.test_subset=32",
         "eval.gap_subset=null", "progress=none"],
        env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def compiled_sparse_run(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "epochs=2", "train.compile=true", "train.precision=bf16",
                   "method.name=flying_bird", "method.density=0.5", "method.update_every=4")
    summary = train(cfg)
    state = torch.load(RunDir(cfg.run_dir).last, weights_only=True)
    assert not any("_orig_mod" in k for k in [*state["model"], *state["masks"]])
    assert set(state["masks"]) <= set(state["model"])
    for name, mask in state["masks"].items():
        assert torch.all(state["model"][name][~mask] == 0)
    assert summary["density_final"] == pytest.approx(0.5, abs=0.01) and summary["steps"] > 0


def test_compile_keeps_plain_names_and_exact_zeros(tmp_path, monkeypatch):
    # the AOTAutograd trace of the step (dynamo + joint forward/backward graphs) without inductor's
    # C++ code generation, which takes ~40 s on this tiny model (see the slow test below)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled_sparse_run(tmp_path)


@pytest.mark.slow
def test_compile_with_inductor(tmp_path):
    compiled_sparse_run(tmp_path)
