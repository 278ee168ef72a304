"""A run written by an earlier version of sparta still resumes, and ends where an uninterrupted run
of this version ends.

``tests/data/boosting_run_v1`` is a boosting-ticket run (finder, prune and rewind, then the ticket's
training) killed after the first epoch of its second stage: its checkpoint holds the stage-to-stage
state (initial weights, the ticket's masks) in the format of that version.
"""
import shutil
from pathlib import Path

from conftest import tiny_cfg, untimed
from sparta.experiment import prepare_resume, train
from sparta.rundir import RunDir

V1 = Path(__file__).resolve().parent / "data" / "boosting_run_v1"
V1_SETTINGS = ["method.name=boosting_ticket", "method.density=0.2", "method.finder_epochs=1", "data.train_subset=128",
               "data.val_size=64", "model.base_width=4", "eval.test_subset=64", "attack.steps=2", "eval.steps=2",
               "eval.gap_subset=64"]


def test_a_boosting_run_checkpointed_by_an_earlier_version_resumes_to_the_same_end(tmp_path):
    shutil.copytree(V1, tmp_path / "old")
    resumed = train(prepare_resume(tmp_path / "old", [], force=False), resume=True)
    fresh_cfg = tiny_cfg(tmp_path / "fresh", *V1_SETTINGS, epochs=2)
    fresh = train(fresh_cfg)
    assert [s["name"] for s in resumed["stages"]] == ["finder", "train"]
    for key in ("ra_final", "sa_final", "ra_best", "density_final", "train_flops", "steps"):
        assert resumed[key] == fresh[key], key
    assert untimed(RunDir(tmp_path / "old").read_metrics()) == untimed(RunDir(fresh_cfg.run_dir).read_metrics())
