"""``sparta reproduce``: the claim rules against hand-computed numbers, the profiles' plans, and
one-epoch smoke runs of the paper profile on a stand-in CIFAR-100 written in the official layout."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparta import claims as C
from sparta.config import load_config
from sparta.errors import SpartaError
from sparta.reproduce import CPU_MINI_EPOCHS, PRESETS, ROLES, plan

from conftest import write_cifar100

ROOT = Path(__file__).resolve().parents[1]


def test_noise_margin_by_hand():
    # p = 0.3, n = 1000: SE of one accuracy sqrt(0.21 / 1000) = 1.449%; of a difference x sqrt(2) = 2.049%; x 2
    assert C.noise_margin(30.0, 1000) == pytest.approx(4.099, abs=1e-3)
    assert C.noise_margin(0.0, 1000) == 0.0
    assert C.noise_margin(50.0, 500) == pytest.approx(200 * math.sqrt(2 * 0.25 / 500))


def test_combine():
    assert C.combine([C.REPRODUCED] * 3) == C.REPRODUCED
    assert C.combine([C.REPRODUCED, C.INCONCLUSIVE]) == C.INCONCLUSIVE
    assert C.combine([C.REPRODUCED, C.NOT_REPRODUCED, C.INCONCLUSIVE]) == C.NOT_REPRODUCED
    assert C.combine([]) == C.INCONCLUSIVE


def stats(**kw):
    base = {"ra_best": 30.0, "ra_final": 25.0, "ra_diff": 5.0, "robust_gap": 20.0, "density": 1.0, "train_flops": 100.0}
    return {**base, **kw}


def test_smaller_than_dense_uses_the_margin():
    # margin at RA 30% on 1000 images: 4.10 points
    s = {"dense": stats(ra_diff=10.0), "robust_bird": stats(ra_diff=5.0), "flying_bird": stats(ra_diff=6.5)}
    claim = C.smaller_than_dense(s, "ra_diff", "robust overfitting", 1000)
    assert claim.verdict == C.INCONCLUSIVE  # RB: 10 - 5 > 4.1 reproduced; FB: 10 - 6.5 < 4.1 inconclusive
    assert "Robust Bird: 5.00% (reproduced)" in claim.evidence
    assert "Flying Bird: 6.50% (inconclusive)" in claim.evidence
    s["flying_bird"] = stats(ra_diff=14.2)  # larger than dense by more than the margin
    assert C.smaller_than_dense(s, "ra_diff", "robust overfitting", 1000).verdict == C.NOT_REPRODUCED
    s["flying_bird"] = stats(ra_diff=5.8)
    assert C.smaller_than_dense(s, "ra_diff", "robust overfitting", 1000).verdict == C.REPRODUCED


def test_fb_plus_needs_both_sparser_and_cheaper():
    s = {"flying_bird": stats(density=0.2, train_flops=50.0), "flying_bird_plus": stats(density=0.15, train_flops=45.0)}
    assert C.fb_plus_sparser_and_cheaper(s).verdict == C.REPRODUCED
    s["flying_bird_plus"] = stats(density=0.2, train_flops=50.0)  # the trigger never fired
    claim = C.fb_plus_sparser_and_cheaper(s)
    assert claim.verdict == C.NOT_REPRODUCED and "did not end sparser" in claim.why


def test_saves_flops_at_comparable_ra():
    s = {"dense": stats(ra_best=30.0), "robust_bird": stats(ra_best=27.0, train_flops=40.0),
         "flying_bird": stats(ra_best=31.0, train_flops=55.0)}
    claim = C.saves_flops_at_comparable_ra(s, 1000)  # 3 points below dense is within the 4.1 margin
    assert claim.verdict == C.REPRODUCED
    assert any("40% of dense" in e for e in claim.evidence)
    s["robust_bird"] = stats(ra_best=25.0, train_flops=40.0)  # 5 points below: beyond the margin
    assert C.saves_flops_at_comparable_ra(s, 1000).verdict == C.NOT_REPRODUCED
    s["robust_bird"] = stats(ra_best=30.0, train_flops=120.0)  # no saving
    assert C.saves_flops_at_comparable_ra(s, 1000).verdict == C.NOT_REPRODUCED


def test_boosting_claim():
    dense_hit = {"stage": "train", "epoch": 14, "train_flops": 100.0, "wall_time_s": 200.0}
    ticket_hit = {"stage": "train", "epoch": 9, "train_flops": 60.0, "wall_time_s": 150.0}
    claim = C.boosting_reaches_dense_ra_cheaper(30.0, 31.0, ticket_hit, dense_hit, 1000)
    assert claim.verdict == C.REPRODUCED and "60% of the baseline's training FLOPs" in claim.why and "75%" in claim.why
    # never reached, but within the 4.1-point margin of the target: inconclusive; far below: not reproduced
    assert C.boosting_reaches_dense_ra_cheaper(30.0, 28.0, None, dense_hit, 1000).verdict == C.INCONCLUSIVE
    assert C.boosting_reaches_dense_ra_cheaper(30.0, 20.0, None, dense_hit, 1000).verdict == C.NOT_REPRODUCED
    slow = {**ticket_hit, "train_flops": 130.0}
    assert C.boosting_reaches_dense_ra_cheaper(30.0, 31.0, slow, dense_hit, 1000).verdict == C.NOT_REPRODUCED


def test_autoattack_claim():
    evals = {"dense": {"autoattack": 20.0, "pgd": 22.4, "n": 500},
             "flying_bird": {"autoattack": 21.0, "pgd": 21.0, "n": 500}}
    assert C.autoattack_below_pgd(evals).verdict == C.INCONCLUSIVE
    evals["flying_bird"]["autoattack"] = 21.2
    assert C.autoattack_below_pgd(evals).verdict == C.NOT_REPRODUCED
    evals["flying_bird"]["autoattack"] = 19.0
    assert C.autoattack_below_pgd(evals).verdict == C.REPRODUCED


def test_cpu_mini_plan_is_one_protocol(tmp_path):
    runs = plan("cpu-mini", "cifar10", tmp_path / "data", tmp_path / "out")
    assert [r.role for r in runs] == list(ROLES)
    cfgs = {r.role: load_config(r.preset, list(r.overrides)) for r in runs}
    for role, cfg in cfgs.items():
        assert cfg.run_dir == tmp_path / "out" / "runs" / role
        # the shared protocol: data, model, attack, evaluation, precision are the same for every run
        assert (cfg.data.train_subset, cfg.data.val_size, cfg.model.name, cfg.model.base_width) == (1000, 1000, "preact_resnet18", 16)
        assert (cfg.attack.steps, cfg.attack.eps, cfg.eval.steps, cfg.eval.test_subset) == (3, 8 / 255, 10, 500)
        assert cfg.attack.alpha == pytest.approx(2.5 * cfg.attack.eps / 3)
        assert cfg.train.precision == "auto"
    assert cfgs["dense"].epochs == CPU_MINI_EPOCHS and cfgs["boosting_dense"].epochs == CPU_MINI_EPOCHS // 2
    assert cfgs["robust_bird_channel"].method.pruning == "channel"
    assert cfgs["flying_bird_plus"].method.adapt_from_epoch == CPU_MINI_EPOCHS // 2
    # the boosting pair differ only in the method: the ticket's retraining matches its baseline
    a, b = cfgs["boosting_dense"].to_dict(), cfgs["boosting_ticket"].to_dict()
    assert {k for k in a if a[k] != b[k]} == {"name", "out_dir", "method"}


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "tinyimagenet"])
def test_paper_plan_is_the_presets(tmp_path, dataset):
    for run in plan("paper", dataset, tmp_path, tmp_path / "out"):
        cfg = load_config(run.preset, list(run.overrides))
        assert run.preset.parent == PRESETS and cfg.data.name == dataset
        assert cfg.model.name == "preact_resnet18" and cfg.attack.steps == 10 and cfg.eval.steps == 20
        assert cfg.epochs == (100 if "boosting" in run.role else 200)
        if run.role != "dense" and run.role != "boosting_dense":
            assert cfg.method.density == 0.2


def test_bad_plans(tmp_path):
    with pytest.raises(SpartaError, match="cpu-mini profile is defined on cifar10 only"):
        plan("cpu-mini", "cifar100", tmp_path, tmp_path)
    with pytest.raises(SpartaError, match="unknown run fb; valid: dense,"):
        plan("paper", "cifar10", tmp_path, tmp_path, only=["fb"])


def test_reproduce_refuses_a_data_root_without_the_dataset(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparta", "reproduce", "--profile", "cpu-mini", "--data-root",
                             str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: --data-root {tmp_path} has no cifar-10-batches-py/ folder; give the "
                                     "folder that holds the official cifar10 files")
    assert not (tmp_path / "out").exists()


def test_a_second_reproduce_on_the_same_folder_is_refused(tmp_path):
    import fcntl

    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # as a running `sparta reproduce` holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = subprocess.run([sys.executable, "-m", "sparta", "reproduce", "--profile", "cpu-mini", "--data-root",
                                 str(tmp_path / "data"), "--out", str(out)], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: another sparta reproduce is writing {out}; wait for it, or give another --out"
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.fixture
def cifar100(tmp_path):
    """A stand-in CIFAR-100 in the official layout: enough images for the smoke's splits and evaluations."""
    write_cifar100(tmp_path / "cifar100", n_train=100, n_test=40)
    return tmp_path / "cifar100"


def smoke(out, data_root, *extra, only=None):
    argv = [sys.executable, "-m", "sparta", "reproduce", "--profile", "paper", "--dataset", "cifar100",
            "--data-root", str(data_root), "--out", str(out), "--smoke", *(["--only", only] if only else []),
            *extra]
    return argv, subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                timeout=900)


def check_smoke(out, roles, n_claims):
    assert (out / "report" / "report.md").read_text().startswith("# Reproduction: profile `paper` on cifar100")
    found = json.loads((out / "claims.json").read_text())
    assert len(found["claims"]) == n_claims
    assert all(c["verdict"] in (C.REPRODUCED, C.NOT_REPRODUCED, C.INCONCLUSIVE) for c in found["claims"])
    for role in roles:
        summary = json.loads((out / "runs" / role / "summary.json").read_text())
        assert summary["epochs"] == 1 and role in found["final_eval"]
        assert found["final_eval"][role]["n"] == 8


def test_smoke_trains_evaluates_reports_and_keeps_finished_runs(tmp_path, cifar100):
    """Two runs of the paper profile for one epoch, AutoAttack, report and claims; a second call retrains
    nothing and other settings are refused. (The seven presets each train in-process below; all seven
    through the whole pipeline: the slow test after it.)"""
    pytest.importorskip("pyautoattack")
    out, env = tmp_path / "out", {**os.environ, "PYTHONPATH": str(ROOT)}
    argv, result = smoke(out, cifar100, "model.base_width=4", only="dense,flying_bird")
    assert result.returncode == 0, result.stderr[-3000:]
    # robust overfitting, the robust gap, FLOPs at comparable RA and AutoAttack below PGD
    check_smoke(out, ["dense", "flying_bird"], n_claims=4)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == before
    assert again.stdout.count("finished earlier, kept") == 2
    # the same folder with other settings is refused before anything runs
    other = subprocess.run([*argv[:-1], "model.base_width=8"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert other.returncode == 2 and "holds a dense run with other settings (model.base_width)" in other.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == before


@pytest.mark.parametrize("role", list(ROLES))
def test_every_paper_preset_trains_with_the_smoke_settings(tmp_path, cifar100, role):
    from sparta.experiment import train

    (run,) = plan("paper", "cifar100", cifar100, tmp_path / "out", smoke=True, only=[role],
                  overrides=["model.base_width=4", "device=cpu"])
    summary = train(load_config(run.preset, list(run.overrides)))
    assert summary["epochs"] == 1 and summary["steps"] > 0


@pytest.mark.slow  # seven training processes and seven AutoAttack evaluations: over 2 minutes on 2 CPU cores
def test_paper_smoke_of_all_seven_runs(tmp_path, cifar100):
    pytest.importorskip("pyautoattack")
    _, result = smoke(tmp_path / "out", cifar100, "model.base_width=4")
    assert result.returncode == 0, result.stderr[-3000:]
    check_smoke(tmp_path / "out", list(ROLES), n_claims=6)
