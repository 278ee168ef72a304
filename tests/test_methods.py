"""Sparse methods end to end on the digits: exact densities, zero pruned weights, exact resume."""
import functools

import pytest
import torch
from conftest import Crash, checkpoint_of, crash_after, tiny_cfg, untimed

from sparta.experiment import load_model, prepare_resume, train
from sparta.rundir import RunDir
from sparta.sparse.masks import MaskSet

FB = ["method.name=flying_bird", "method.density=0.2", "method.update_every=4", "method.update_every_late=6"]
FBPLUS = ["method.name=flying_bird_plus", "method.density=0.3", "method.update_every=4", "method.update_every_late=4",
          "method.adapt_from_epoch=0", "method.window=2"]


cfg_for = functools.partial(tiny_cfg, epochs=4)  # TINY writing to a path, 4 epochs unless a test says otherwise


@pytest.mark.parametrize("method", [["method.name=static", "method.density=0.2", "method.distribution=erk"], FB,
                                    [*FB, "train.channels_last=true"]],
                         ids=["static", "flying_bird", "fb_channels_last"])
def test_density_is_exact_and_pruned_weights_are_zero(tmp_path, method):
    cfg = cfg_for(tmp_path / "run", *method)
    summary = train(cfg)
    ckpt = checkpoint_of(cfg)
    masks = ckpt["masks"]
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round(0.2 * total)
    assert summary["density_final"] == pytest.approx(kept / total)
    assert set(summary["layer_densities_final"]) == set(masks)
    for name, mask in masks.items():
        assert torch.all(ckpt["model"][name][~mask] == 0), name
    model = load_model(RunDir(cfg.run_dir).last)
    params = dict(model.named_parameters())
    assert all(torch.all(params[n][~m] == 0) for n, m in masks.items())
    records = RunDir(cfg.run_dir).read_metrics()
    assert all(r["density"] == pytest.approx(kept / total) for r in records)


def test_flying_bird_changes_topology_at_fixed_per_layer_counts(tmp_path):
    cfg = cfg_for(tmp_path / "run", *FB)
    train(cfg)
    torch.manual_seed(cfg.seed)
    from sparta.experiment import build_model
    ckpt = checkpoint_of(cfg)
    initial = MaskSet.random(build_model(ckpt["model_spec"]), 0.2, "igq", seed=cfg.seed)
    final = ckpt["masks"]
    assert all(int(final[n].sum()) == c for n, c in initial.counts().items())  # per-layer counts kept
    assert any(not torch.equal(final[n], initial.masks[n]) for n in final)  # the topology moved
    records = RunDir(cfg.run_dir).read_metrics()
    steps_per_epoch = records[0]["step"]
    expected = len([s for s in range(1, 4 * steps_per_epoch) if s % (4 if s < 2 * steps_per_epoch else 6) == 0])
    assert records[-1]["topology_updates"] == expected


@pytest.mark.parametrize("method", [FB, FBPLUS, [*FB, "train.channels_last=true"]],
                         ids=["flying_bird", "flying_bird_plus", "fb_channels_last"])
def test_resume_equals_uninterrupted(tmp_path, method):
    a = cfg_for(tmp_path / "a", *method)
    train(a)
    b = cfg_for(tmp_path / "b", *method)
    with pytest.raises(Crash):
        train(b, on_epoch=crash_after(2))
    train(prepare_resume(b.run_dir, [], force=False), resume=True)
    ca, cb = checkpoint_of(a), checkpoint_of(b)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert all(torch.equal(ca["masks"][k], cb["masks"][k]) for k in ca["masks"])
    assert ca["controller"]["topology_updates"] == cb["controller"]["topology_updates"] > 0
    if method is FBPLUS:
        assert ca["controller"]["decisions"] == cb["controller"]["decisions"] != []
    assert untimed(RunDir(a.run_dir).read_metrics()) == untimed(RunDir(b.run_dir).read_metrics())


def test_flying_bird_plus_logs_decisions_and_moves_density(tmp_path):
    cfg = cfg_for(tmp_path / "run", *FBPLUS, "epochs=5")
    summary = train(cfg)
    ckpt = checkpoint_of(cfg)
    decisions = ckpt["controller"]["decisions"]
    assert decisions, "with adapt_from_epoch=0 and window=2 the rule is active from the 2nd evaluated epoch"
    records = RunDir(cfg.run_dir).read_metrics()
    assert records[-1]["fbplus_prune_more_total"] == sum(d["prune_more"] for d in decisions)
    assert records[-1]["fbplus_grow_more_total"] == sum(d["grow_more"] for d in decisions)
    if any(d["prune_more"] or d["grow_more"] for d in decisions):
        assert summary["density_final"] != pytest.approx(0.3, abs=1e-6)


def test_flying_bird_plus_window_gets_an_entry_every_epoch_on_the_same_images(tmp_path, monkeypatch):
    # eval.every=3: epochs 1 and 2 are not evaluated; the window still gets their statistics, measured on
    # the first 40 validation images after every epoch (the full validation set has 100)
    import sparta.epoch

    seen = []
    real = sparta.epoch.evaluate
    monkeypatch.setattr(sparta.epoch, "evaluate",
                        lambda model, data, *a, **k: seen.append(data) or real(model, data, *a, **k))
    cfg = cfg_for(tmp_path / "run", *FBPLUS, "epochs=4", "eval.every=3", "method.window_val_subset=40")
    train(cfg)
    history = checkpoint_of(cfg)["controller"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    window = [d for d in seen if len(d) == 40]
    assert len(window) == 4 and all(torch.equal(d.images, window[0].images) for d in window)
    records = RunDir(cfg.run_dir).read_metrics()
    assert [r["epoch"] for r in records] == [3, 4]  # one line per evaluated epoch, as before
    for r, h in zip(records, history[2:]):
        assert h["robust_gap"] == pytest.approx(r["train_robust_acc"] - r["window_val_robust_acc"])
        assert h["val_robust_loss"] == r["window_val_robust_loss"]
