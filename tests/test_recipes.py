"""Multi-stage methods end to end on the digits: Robust Bird (unstructured, channel), boosting tickets."""
import functools

import pytest
import torch
from conftest import Crash, checkpoint_of, crash_after, crash_at_step, tiny_cfg, untimed

from sparta.data import load_dataset
from sparta.experiment import load_model, prepare_resume, train
from sparta.methods import build_recipe
from sparta.netspec import build_model, model_spec
from sparta.rundir import RunDir
from sparta.stages import RunContext

RB = ["method.name=robust_bird", "method.density=0.2", "method.max_search_epochs=3", "method.eb_window=2",
      "method.eb_threshold=1.0"]  # threshold 1: the ticket is drawn as soon as two masks exist
RB_CHANNEL = [*RB, "method.pruning=channel", "model.name=preact_resnet18", "model.base_width=8"]
BOOST = ["method.name=boosting_ticket", "method.density=0.2", "method.finder_epochs=2"]


cfg_for = functools.partial(tiny_cfg, epochs=2)  # TINY writing to a path, 2 epochs unless a test says otherwise


def exact_density(masks):
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def test_robust_bird_unstructured(tmp_path):
    cfg = cfg_for(tmp_path / "run", *RB)
    summary = train(cfg)
    records = RunDir(cfg.run_dir).read_metrics()
    assert [(r["stage"], r["epoch"]) for r in records] == [("search", 1), ("search", 2), ("train", 1), ("train", 2)]
    assert summary["eb_epoch"] == 2 and "early-bird epoch 2" in summary["ticket_weights"]
    assert summary["search_ended_by"] == "early_bird" and summary["eb_step"] == 2 * 16  # 512 images / 32 a batch
    assert [s["name"] for s in summary["stages"]] == ["search", "train"] and summary["stages"][0]["epochs"] == 2
    masks = checkpoint_of(cfg)["masks"]
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)
    assert records[0]["density"] == 1.0 and records[-1]["density"] == pytest.approx(exact_density(masks))
    # FLOPs: cumulative over both stages, and the sparse stage is cheaper per step than dense
    assert records[-1]["train_flops"] > records[1]["train_flops"] > records[0]["train_flops"] > 0
    assert summary["train_flops"] == pytest.approx(records[-1]["train_flops"])
    assert summary["inference_flops"] < summary["inference_flops_dense"]
    assert summary["best_epoch"] in (1, 2) and summary["epochs"] == 2


def test_robust_bird_without_early_bird_uses_last_search_weights(tmp_path):
    cfg = cfg_for(tmp_path / "run", *RB, "method.eb_threshold=0.0", "method.max_search_epochs=2", "epochs=1")
    summary = train(cfg)
    assert summary["eb_epoch"] is None and "no early bird within 2 search epochs" in summary["ticket_weights"]
    assert summary["search_ended_by"] == "cap" and summary["eb_step"] is None
    assert summary["stages"][0]["epochs"] == 2


def test_robust_bird_channel_trains_a_physically_smaller_network(tmp_path):
    cfg = cfg_for(tmp_path / "run", *RB_CHANNEL, "epochs=1", "method.channel_density=0.5")
    summary = train(cfg)
    assert summary["params_after_slimming"] < summary["params_before_slimming"]
    assert summary["params"] == summary["params_after_slimming"]
    assert summary["inference_flops"] < summary["inference_flops_dense"]
    model = load_model(RunDir(cfg.run_dir).best)  # rebuilt small from model_spec's channel plan
    assert sum(p.numel() for p in model.parameters()) == summary["params_after_slimming"]
    out = model(torch.rand(4, 1, 8, 8))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_robust_bird_masks_every_n_steps_with_a_minimum_search_length(tmp_path):
    """16 steps an epoch; masks every 5 steps (after 5, 10, 15, 20, ...), window 2, any distance: the
    ticket is found at step 10 in epoch 1, or with min_search_epochs=2 at step 20, the first
    observation of epoch 2 (steps 17..32)."""
    cfg = cfg_for(tmp_path / "a", *RB, "epochs=1", "method.eb_every_steps=5")
    summary = train(cfg)
    assert (summary["eb_epoch"], summary["eb_step"], summary["search_ended_by"]) == (1, 10, "early_bird")
    assert summary["stages"][0]["epochs"] == 1 and summary["stages"][0]["steps"] == 16  # to the epoch's end
    cfg = cfg_for(tmp_path / "b", *RB, "epochs=1", "method.eb_every_steps=5", "method.min_search_epochs=2")
    summary = train(cfg)
    assert (summary["eb_epoch"], summary["eb_step"], summary["search_ended_by"]) == (2, 20, "early_bird")
    assert summary["stages"][0]["epochs"] == 2
    # the ticket may not be drawn before max_search_epochs either: min 3 = max 3, so epoch 3
    cfg = cfg_for(tmp_path / "c", *RB, "epochs=1", "method.min_search_epochs=3")
    assert train(cfg)["eb_epoch"] == 3


def test_robust_bird_search_milestones_decay_the_search_lr(tmp_path):
    """lr 0.1, x optim.gamma=0.5 at search epochs 1 and 2; an epoch's record holds the lr of its last step."""
    cfg = cfg_for(tmp_path / "run", *RB, "epochs=1", "method.eb_threshold=0.0", "method.search_milestones=[1, 2]",
                  "optim.gamma=0.5")
    summary = train(cfg)
    search = [r for r in RunDir(cfg.run_dir).read_metrics() if r["stage"] == "search"]
    assert [r["lr"] for r in search] == [0.1, 0.05, 0.025]
    assert summary["search_ended_by"] == "cap"
    # [] keeps the constant search lr; the second stage has its own schedule (cosine with warm-up here)
    constant = cfg_for(tmp_path / "c", *RB, "method.eb_threshold=0.0")
    stages = build_recipe(constant)
    assert stages[0].cfg.optim.schedule == "constant" and stages[1].cfg.optim.schedule == "cosine"
    decayed = build_recipe(cfg)[0].cfg.optim
    assert (decayed.schedule, decayed.milestones, decayed.warmup_epochs) == ("multistep", [1.0, 2.0], 0.0)


@pytest.mark.parametrize("pruning,expected", [("unstructured", 0.0), ("channel", 1e-4)])
def test_robust_bird_bn_l1_defaults(tmp_path, pruning, expected):
    extra = RB_CHANNEL if pruning == "channel" else RB
    for setting, want in ((None, expected), (0.5, 0.5)):
        cfg = cfg_for(tmp_path, *extra, *([f"method.bn_l1={setting}"] if setting is not None else []))
        net = build_model(model_spec(cfg, load_dataset("digits", None)))
        run = RunContext(net, {}, torch.device("cpu"))
        controller = build_recipe(cfg)[0].controller(cfg, run, torch.optim.SGD(net.parameters(), lr=0.1), 10)
        assert controller.bn_l1 == want


def test_robust_bird_step_search_resumes_mid_epoch(tmp_path):
    """Channel search with the L1 penalty and masks every 3 steps (16 steps an epoch), no ticket before
    epoch 2: found at step 18; a crash at step 23 resumes from the step-20 checkpoint, after the
    ticket was found but before its epoch ended, and finishes that epoch as the uninterrupted run."""
    method = [*RB_CHANNEL, "method.eb_every_steps=3", "method.min_search_epochs=2", "method.bn_l1=1e-3",
              "checkpoint.every_steps=5", "epochs=1"]
    a = cfg_for(tmp_path / "a", *method)
    sa = train(a)
    b = cfg_for(tmp_path / "b", *method)
    with crash_at_step(23):
        train(b)
    saved = checkpoint_of(b)
    assert saved["stage"] == "search" and saved["step"] == 20 and saved["controller"]["steps"] == 20
    assert saved["controller"]["detector"]["found"] and saved["controller"]["eb_epoch"] is None
    sb = train(prepare_resume(b.run_dir, [], force=False), resume=True)
    ca, cb = checkpoint_of(a), checkpoint_of(b)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert (sa["eb_epoch"], sa["eb_step"], sa["stages"][0]["steps"]) == (2, 18, 32)
    assert [s["steps"] for s in sa["stages"]] == [s["steps"] for s in sb["stages"]]
    for key in ("ra_final", "sa_final", "eb_epoch", "eb_step", "search_ended_by", "params_after_slimming"):
        assert sa[key] == sb[key], key


def test_boosting_finder_milestones_decay_the_finder_lr(tmp_path):
    """The paper's finder steps its lr down (x optim.gamma at each of method.search_milestones); the
    retraining keeps the run's own schedule."""
    cfg = cfg_for(tmp_path / "run", *BOOST, "method.finder_epochs=3", "method.search_milestones=[1, 2]",
                  "optim.gamma=0.5", "method.search_lr=0.04")
    train(cfg)
    finder = [r for r in RunDir(cfg.run_dir).read_metrics() if r["stage"] == "finder"]
    assert [r["lr"] for r in finder] == [0.04, 0.02, 0.01]
    stages = build_recipe(cfg)
    assert stages[0].cfg.optim.milestones == [1.0, 2.0] and stages[1].cfg.optim == cfg.optim


@pytest.mark.parametrize("rewind", ["none", "init"])
def test_boosting_ticket_and_rewind(tmp_path, rewind):
    extra = ["method.reinit=random"] if rewind == "none" else []
    cfg = cfg_for(tmp_path / "run", *BOOST, *extra)
    summary = train(cfg)
    assert [s["name"] for s in summary["stages"]] == ["finder", "train"]
    assert summary["stages"][0]["epochs"] == 2
    masks = checkpoint_of(cfg)["masks"]
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)


def test_boosting_rewinds_survivors_to_the_initialisation(tmp_path):
    """After the finder, the ticket's surviving weights equal the saved initial weights bit for bit."""
    cfg = cfg_for(tmp_path / "run", *BOOST)
    with pytest.raises(Crash):
        train(cfg, on_epoch=crash_after(1, stage="train"))
    ckpt = checkpoint_of(cfg)
    initial = ckpt["run"]["carry"]["initial"]
    # rebuild the moment right after the transition: resume would redo epoch 1 of "train"; instead
    # check the invariant on the ticket masks against the initial weights of pruned positions
    masks = ckpt["run"]["carry"]["ticket"]
    for name, mask in masks.items():
        assert torch.all(ckpt["model"][name][~mask] == 0)
        assert not torch.equal(initial[name][mask], torch.zeros_like(initial[name][mask]))


@pytest.mark.parametrize("method,crash", [
    (RB, ("search", 1)), (RB, ("search", 2)), (RB, ("train", 1)),
    (BOOST, ("finder", 2)), (RB_CHANNEL, ("search", 2)),
], ids=["rb-search1", "rb-search-end", "rb-train", "boost-finder-end", "rb-channel-search-end"])
def test_multi_stage_resume_equals_uninterrupted(tmp_path, method, crash):
    a = cfg_for(tmp_path / "a", *method)
    sa = train(a)
    b = cfg_for(tmp_path / "b", *method)
    stage, epoch = crash
    with pytest.raises(Crash):
        train(b, on_epoch=crash_after(epoch, stage=stage))
    sb = train(prepare_resume(b.run_dir, [], force=False), resume=True)
    ca, cb = checkpoint_of(a), checkpoint_of(b)
    assert ca["model"].keys() == cb["model"].keys()
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert all(torch.equal(ca["masks"][k], cb["masks"][k]) for k in ca["masks"])
    assert untimed(RunDir(a.run_dir).read_metrics()) == untimed(RunDir(b.run_dir).read_metrics())
    for key in ("ra_final", "sa_final", "train_flops", "eb_epoch", "best_epoch"):
        assert sa.get(key) == sb.get(key), key
