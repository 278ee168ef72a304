"""A run written by an earlier version of sparta still resumes, and ends where an uninterrupted run
of this version ends.

``tests/data/boosting_run_v1`` is a boosting-ticket run (finder, prune and rewind, then the ticket's
training) killed after the first epoch of its second stage: its checkpoint holds the stage-to-stage
state (initial weights, the ticket's masks) in the format of that version.
``tests/data/robust_bird_run_887528d`` is a Robust Bird run written by commit 887528d (the version
before each method's class held its defaults), stopped after the first epoch of its train stage: its
config.yaml saves the method defaults that depend on other settings as null (``bn_l1``,
``eb_threshold``, ``channel_density``, ``search_attack``, ``search_lr``), read now as their rules' values.
"""
import math
import shutil
from pathlib import Path

from conftest import tiny_cfg, untimed

from sparta.experiment import prepare_resume, train
from sparta.rundir import RunDir

V1 = Path(__file__).resolve().parent / "data" / "boosting_run_v1"
V1_SETTINGS = ["method.name=boosting_ticket", "method.density=0.2", "method.finder_epochs=1", "data.train_subset=128",
               "data.val_size=64", "model.base_width=4", "eval.test_subset=64", "attack.steps=2", "eval.steps=2",
               "eval.gap_subset=64"]


def same_to_rounding(a: dict, b: dict) -> bool:
    """The same keys and values, floats equal to 1e-5 relative."""
    return a.keys() == b.keys() and all(
        math.isclose(v, b[k], rel_tol=1e-5) if isinstance(v, float) else v == b[k] for k, v in a.items())


def resumes_to_the_same_end(tmp_path: Path, folder: Path, settings: list[str]) -> tuple[RunDir, RunDir, list[str]]:
    """Resume a copy of the old run ``folder`` with this version, train the same settings fresh, check
    that both end with the same numbers and metrics; the two run folders and the resumed stage names.

    The fixture's epochs before its checkpoint were computed on the machine that wrote it: another CPU
    kind sums in another order, so its weights differ from a fresh run's here by ~1e-8 and the two
    agree to rounding, not bit for bit (bit-identical resumes on one machine: test_reliability,
    test_recipes)."""
    shutil.copytree(folder, tmp_path / "old")
    resumed = train(prepare_resume(tmp_path / "old", [], force=False), resume=True)
    fresh_cfg = tiny_cfg(tmp_path / "fresh", *settings, epochs=2)
    fresh = train(fresh_cfg)
    keys = ("ra_final", "sa_final", "ra_best", "density_final", "train_flops", "steps")
    assert same_to_rounding({k: resumed[k] for k in keys}, {k: fresh[k] for k in keys})
    old, new = RunDir(tmp_path / "old"), RunDir(fresh_cfg.run_dir)
    old_rows, new_rows = untimed(old.read_metrics()), untimed(new.read_metrics())
    assert len(RunDir(folder).read_metrics()) < len(old_rows) == len(new_rows)  # the resume added epochs
    for before, after in zip(old_rows, new_rows):
        assert same_to_rounding(before, after), (before, after)
    return old, new, [s["name"] for s in resumed["stages"]]


def test_a_boosting_run_checkpointed_by_an_earlier_version_resumes_to_the_same_end(tmp_path):
    _, _, stages = resumes_to_the_same_end(tmp_path, V1, V1_SETTINGS)
    assert stages == ["finder", "train"]


def test_the_checkpoint_schema_reads_old_and_refuses_newer_formats(tmp_path):
    import pytest
    import torch

    from sparta import checkpoint
    from sparta.errors import CheckpointError

    old = checkpoint.load(V1 / "checkpoints" / "last.pt")
    assert (old.format == 1 and old.stage == "train" and old.stage_index == 1
            and set(old.run["carry"]) == {"initial", "ticket"})
    checkpoint.save(old, tmp_path / "again.pt")  # written back in the current format, tensors unchanged
    again = checkpoint.load(tmp_path / "again.pt")
    assert again.format == 1 and torch.equal(again.model["body.features.0.weight"], old.model["body.features.0.weight"])
    newer = {**old.to_dict(), "format": checkpoint.FORMAT + 1}
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="written by a newer sparta") as e:
        checkpoint.load(tmp_path / "newer.pt")
    assert "\n" not in str(e.value)
    current = checkpoint.RunCheckpoint(model={}, model_spec={})
    assert current.format == checkpoint.FORMAT and set(current.to_dict()) == set(torch.load(
        V1 / "checkpoints" / "last.pt", weights_only=True)) | {"format"}


RB_887528D = Path(__file__).resolve().parent / "data" / "robust_bird_run_887528d"
RB_SETTINGS = ["method.name=robust_bird", "method.density=0.2", "method.max_search_epochs=1", "data.train_subset=128",
               "data.val_size=64", "model.base_width=4", "eval.test_subset=64", "attack.steps=2", "eval.steps=2",
               "eval.gap_subset=64"]


def test_a_robust_bird_run_saved_with_null_defaults_resumes_to_the_same_end(tmp_path):
    cfg = prepare_resume(RB_887528D, [], force=False)  # reads only
    assert (cfg.method.bn_l1, cfg.method.eb_threshold, cfg.method.search_attack, cfg.method.search_lr) == \
        (0.0, 0.08, "none", 0.1)
    old, new, stages = resumes_to_the_same_end(tmp_path, RB_887528D, RB_SETTINGS)
    assert stages == ["search", "train"]
    assert old.read_outcomes() == new.read_outcomes()
