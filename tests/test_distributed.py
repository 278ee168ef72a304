"""Data-parallel training under torchrun: two CPU processes (gloo) spawned by the tests.

Each two-process run trains a small_cnn (no BatchNorm) on a few hundred 8x8 digits for 2-3 epochs.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY as BASE
from conftest import untimed

import sparta
from sparta import distributed, outcomes
from sparta.attacks import build_attack
from sparta.config import load_config, with_overrides
from sparta.data import load_dataset
from sparta.distributed import Distributed, mask_checksum, mask_layer_checksums
from sparta.errors import ConfigError
from sparta.evaluate import evaluate
from sparta.experiment import load_model, train
from sparta.netspec import build_model
from sparta.outcomes import Outcomes
from sparta.rundir import RunDir
from sparta.sparse.distributions import exact_counts, layer_densities
from sparta.sparse.select import prunable_parameters

ROOT = Path(sparta.__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")

# 499 images: the last global batch (19) splits 10 / 9, which the loss weighting must handle
TINY = with_overrides(BASE, ["data.train_subset=499", "data.augment=true", "model.base_width=8", "optim.lr=0.05",
                             "optim.warmup_epochs=0", "attack.steps=2", "eval.steps=2", "eval.test_subset=101",
                             "eval.val_subset=51", "eval.gap_subset=64"])
FLYING_BIRD = {"method": {"name": "flying_bird", "density": 0.3, "update_every": 5, "update_every_late": None,
                          "growth": "gradient"}}


def write_config(tmp_path, extra):
    path = tmp_path / "config.yaml"
    raw = {**TINY, **extra}
    path.write_text(yaml.safe_dump(raw))
    return path


def run(args, *, timeout=150):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def sparta_train(*args):
    result = run(["-m", "sparta", "train", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(run_dir):
    return untimed(RunDir(run_dir).read_metrics())


@pytest.fixture(scope="module", params=[False, True], ids=["nchw", "channels_last"])
def flying_bird_two_ranks(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("fb2")
    config = write_config(tmp, {**FLYING_BIRD, "train": {"channels_last": request.param}})
    sparta_train("--nproc", "2", str(config), f"out_dir={tmp / 'run'}")
    return config, tmp / "run"


def test_flying_bird_two_ranks_keep_identical_masks_and_exact_density(flying_bird_two_ranks):
    config, run_dir = flying_bird_two_ranks
    rd = RunDir(run_dir)
    summary = json.loads(rd.summary.read_text())
    assert summary["world_size"] == 2
    assert summary["mask_checksums"][0] == summary["mask_checksums"][1] != 0
    assert summary["weights_sha256"][0] == summary["weights_sha256"][1]  # bitwise the same model
    metrics = rd.read_metrics()
    assert [r["epoch"] for r in metrics] == [1, 2, 3]  # written once, by rank 0
    lines = rd.read_outcomes()
    assert [(o["split"], o["epoch"]) for o in lines] == [("test", 1), ("test", 2), ("test", 3), ("gap", 3)]
    final = outcomes.find(lines, split="test", epoch=3)
    assert final.n == 101 and final.accuracy("robust") == metrics[-1]["test_robust_acc"]
    test = load_dataset("digits", None).test.subset(0, 101)  # the clean outcomes of one process, image by image
    one = evaluate(load_model(rd.last), test, build_attack("none"), batch_size=64, device=torch.device("cpu"),
                   outcomes=True)
    assert final.clean == one["outcomes"].clean
    assert metrics[-1]["topology_updates"] >= 4
    state = torch.load(rd.last, weights_only=True)
    assert state["world_size"] == 2 and mask_checksum(state["masks"]) == summary["mask_checksums"][0]
    assert all(not name.startswith("module.") for name in state["masks"])  # unwrapped names
    shapes = {n: p.shape for n, p in prunable_parameters(build_model(state["model_spec"])).items()}
    expected = exact_counts(shapes, layer_densities("igq", shapes, 0.3), 0.3)
    assert {n: int(m.sum()) for n, m in state["masks"].items()} == expected
    assert all(int((state["model"][n] != 0).sum()) <= expected[n] for n in expected)  # pruned weights are 0
    again = run(["-m", "sparta", "train", "--nproc", "2", str(config), f"out_dir={run_dir}"], timeout=60)
    # rank 0 meets the error creating out_dir and sends it to every rank; all stop (none is left waiting)
    # and the user reads it once, from rank 0
    assert again.returncode == 2 and "Traceback" not in again.stderr
    errors = [line for line in again.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "already exists" in errors[0], again.stderr[-3000:]


def test_resume_of_two_ranks_equals_uninterrupted(flying_bird_two_ranks, tmp_path):
    config, full = flying_bird_two_ranks
    part = tmp_path / "run"
    # every rank raises once epoch 2 is saved (a kill), then the run is resumed under torchrun
    crashed = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(WORKER), "crash", str(config), "2", f"out_dir={part}"])
    assert crashed.returncode != 0 and [r["epoch"] for r in RunDir(part).read_metrics()] == [1, 2]
    sparta_train("--nproc", "2", "--resume", str(part))
    a, b = torch.load(RunDir(full).last, weights_only=True), torch.load(RunDir(part).last, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])
    assert records(full) == records(part)

    def last(run_dir):
        return {(o["stage"], o["epoch"], o["split"]): o for o in RunDir(run_dir).read_outcomes()}

    assert last(full) == last(part)


def test_dense_two_ranks_match_one_process(tmp_path):
    # No BatchNorm in small_cnn and no random start: the two ranks' shares of each global batch give,
    # after DDP's averaging, the gradient of the whole batch, so only float summation order differs.
    extra = {"epochs": 2, "attack": {**TINY["attack"], "random_start": False}}
    config = write_config(tmp_path, extra)
    sparta_train("--nproc", "2", str(config), f"out_dir={tmp_path / 'two'}")
    one = train(load_config(config, [f"out_dir={tmp_path / 'one'}"]))
    a = torch.load(RunDir(tmp_path / "one").last, weights_only=True)["model"]
    b = torch.load(RunDir(tmp_path / "two").last, weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    ra, rb = RunDir(tmp_path / "one").read_metrics(), RunDir(tmp_path / "two").read_metrics()
    for x, y in zip(ra, rb):  # epoch statistics are reduced over ranks; clean accuracy needs no RNG
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["train_robust_acc"] == pytest.approx(y["train_robust_acc"], abs=0.5)
        assert (x["val_clean_acc"], x["test_clean_acc"]) == (y["val_clean_acc"], y["test_clean_acc"])
        assert x["train_flops"] == y["train_flops"]  # counted for the global batch
    assert one["world_size"] == 1


def test_ranks_with_different_masks_stop_naming_the_layer():
    result = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), "mismatch"])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = re.findall(r"rank (\d): masks differ across ranks after a deliberate flip: layer features\.2\.weight ",
                       result.stdout)
    assert sorted(ranks) == ["0", "1"], result.stdout


def test_two_ranks_evaluate_the_same_outcomes_as_one_process_image_by_image():
    from ddp_worker import evaluation_outcomes

    result = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), "outcomes"])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    one = evaluation_outcomes()
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:  # every rank returns the whole vector, each image's outcome where one process puts it
        assert r["outcomes"] == one["outcomes"] and r["outcomes"]["n"] == 101
        assert (r["clean_acc"], r["robust_acc"]) == pytest.approx((one["clean_acc"], one["robust_acc"]))
    robust = Outcomes.from_json(one["outcomes"]).robust
    assert 0 < robust.bit_count() < 101  # the attack flipped some images, not all


def test_world_size_that_does_not_fit_is_one_line_exit_2(tmp_path):
    # every rank meets it; rank 0 prints it, the others wait to be stopped by torchrun (one line, always)
    config = write_config(tmp_path, {"batch_size": 33})
    result = run(["-m", "sparta", "train", "--nproc", "2", str(config), f"out_dir={tmp_path / 'run'}"], timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: batch_size 33 is the global batch and must be a multiple of the world size 2 "
                      "(each rank takes batch_size / world_size images per step)"], result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_setup_checks_the_config_against_the_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="multiple of the world size 2"):
        distributed.setup(load_config(None, ["batch_size=1", "device=cpu"]))
    with pytest.raises(ConfigError, match="sync_batchnorm needs CUDA"):
        distributed.setup(load_config(None, ["device=cpu", "distributed.sync_batchnorm=true"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="2 processes on this node but only 1 GPUs"):
        distributed.setup(load_config(None, ["device=cuda"]))


def test_nproc_under_torchrun_is_refused(monkeypatch, capsys):
    from sparta.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--nproc", "2", "configs/demo.yaml"]) == 2
    assert "leave it out" in capsys.readouterr().err


def test_shards_cover_every_item_once_and_checksums_see_positions():
    for n in (0, 1, 5, 8, 101):
        spans = [Distributed(rank=r, world_size=3).shard(n) for r in range(3)]
        assert [i for a, b in spans for i in range(a, b)] == list(range(n))
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, :2] = True
    moved = torch.zeros_like(mask)
    moved[1, :2] = True
    a, b = mask_layer_checksums({"w": mask}), mask_layer_checksums({"w": moved})
    assert a[0, 0] == b[0, 0] == 2 and a[0, 1] != b[0, 1]  # same count, different positions
    assert mask_checksum({}) == 0 and mask_checksum({"w": mask}) != mask_checksum({"w": moved})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stop_signal_on_one_rank_stops_both_mid_epoch_and_resume_is_bit_identical(tmp_path):
    # the stop saves a mid-epoch checkpoint, which must hold each rank's epoch-so-far statistics
    # PGD-8 makes a step slow enough that the signal, sent once step 18 is seen, lands before the run's
    # last step (32) even when the polling below is starved of CPU
    extra = {**FLYING_BIRD, "epochs": 2, "checkpoint": {"every_steps": 3}, "attack": {**TINY["attack"], "steps": 8}}
    config = write_config(tmp_path, extra)
    sparta_train("--nproc", "2", str(config), f"out_dir={tmp_path / 'full'}")
    part = tmp_path / "part"
    port, env = free_port(), {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-m", "sparta", "train", str(config), f"out_dir={part}"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    steps_per_epoch = 16  # 499 images, global batch 32
    deadline = time.monotonic() + 120
    while step_in(part) < steps_per_epoch + 2:  # in epoch 2
        assert all(p.poll() is None for p in ranks), [p.communicate()[1][-2000:] for p in ranks]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ranks[1].send_signal(signal.SIGTERM)  # rank 0 gets nothing: it must stop all the same
    try:
        codes = [p.wait(timeout=60) for p in ranks]
    finally:  # a rank left waiting in a collective must not outlive the test
        for p in ranks:
            p.kill()
    assert codes == [143, 143], [p.communicate()[1][-2000:] for p in ranks]
    stopped = step_in(part)
    assert steps_per_epoch + 2 <= stopped < 2 * steps_per_epoch
    sparta_train("--nproc", "2", "--resume", str(part))
    a = torch.load(RunDir(tmp_path / "full").last, weights_only=True)
    b = torch.load(RunDir(part).last, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), f"stopped after step {stopped}"
    assert records(tmp_path / "full") == records(part), f"stopped after step {stopped}"


def step_in(run_dir):
    try:
        return int(torch.load(RunDir(run_dir).last, weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1
