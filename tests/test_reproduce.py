"""``sparta reproduce``: the claim rules against hand-computed numbers, the profiles' plans, and
one-epoch smoke runs of the paper profile on a stand-in CIFAR-100 written in the official layout."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_cifar100

from sparta import claims as C
from sparta import reproduce as R
from sparta.config import load_config
from sparta.errors import SpartaError
from sparta.reproduce import CPU_MINI_EPOCHS, PRESETS, PROFILES, ROLES, plan

ROOT = Path(__file__).resolve().parents[1]


class FakeRun:
    """What the boosting budget reads of a run: its metrics records."""

    def __init__(self, records):
        self.records = records


def test_boosting_budget_counts_the_finder_in_dense_epochs():
    # a finder that cost 250 FLOPs (2.5 dense epochs at 100 each), then 6 retraining epochs
    ticket = FakeRun([{"stage": "finder", "epoch": 2, "train_flops": 250.0},
                      *({"stage": "train", "epoch": e, "train_flops": 20.0 * e} for e in (2, 4, 6))])
    cost = R.budget([ticket], 100.0)
    assert (cost.epochs, cost.finder_epochs, cost.total) == (6.0, 2.5, 8.5)
    assert R.budget([FakeRun([{"stage": "train", "epoch": 10, "train_flops": 1000.0}])], 100.0).total == 10.0


def test_cpu_mini_plan_is_one_protocol(tmp_path):
    runs = plan("cpu-mini", "cifar10", tmp_path / "data", tmp_path / "out")
    assert [r.role for r in runs] == list(ROLES)
    cfgs = {r.role: load_config(r.configs, list(r.overrides)) for r in runs}
    for role, cfg in cfgs.items():
        assert cfg.run_dir == tmp_path / "out" / "runs" / role
        # the shared protocol: data, model, attack, evaluation, precision are the same for every run
        assert ((cfg.data.train_subset, cfg.data.val_size, cfg.model.name, cfg.model.base_width)
                == (500, 1000, "preact_resnet18", 16))
        assert (cfg.attack.steps, cfg.attack.eps, cfg.eval.steps, cfg.eval.test_subset) == (3, 8 / 255, 10, 500)
        # the best epoch is picked on the whole validation split
        assert cfg.eval.val_subset == cfg.data.val_size
        assert cfg.attack.alpha == pytest.approx(2.5 * cfg.attack.eps / 3)
        assert cfg.train.precision == "auto"
    assert cfgs["dense"].epochs == CPU_MINI_EPOCHS and cfgs["boosting_ticket"].epochs == CPU_MINI_EPOCHS // 2
    # evaluated 8 times in either schedule
    assert {role: cfg.epochs // cfg.eval.every for role, cfg in cfgs.items()} == dict.fromkeys(ROLES, 8)
    assert cfgs["robust_bird_channel"].method.pruning == "channel"
    # the masks compared 12 steps apart, the search a third of training
    for role in ("robust_bird", "robust_bird_channel"):
        assert (cfgs[role].method.eb_every_steps, cfgs[role].method.max_search_epochs) == (12, CPU_MINI_EPOCHS // 3)
    assert cfgs["flying_bird_plus"].method.adapt_from_epoch == CPU_MINI_EPOCHS // 2
    # the ticket retrains on the dense schedule compressed to half, after a finder of a fifth of it
    t = cfgs["boosting_ticket"]
    assert (t.optim.milestones, t.method.finder_epochs, t.method.search_milestones) == ([40, 60], 32, [16, 24])
    # the control is the ticket from a random initialisation
    b, c = t.to_dict(), cfgs["boosting_control"].to_dict()
    assert {k for k in b if b[k] != c[k]} == {"name", "out_dir", "method"}
    assert ({k for k in b["method"] if b["method"][k] != c["method"][k]} == {"reinit"}
            and c["method"]["reinit"] == "random")


@pytest.mark.parametrize("profile", PROFILES)
def test_the_boosting_finder_costs_at_most_a_quarter_of_the_dense_schedule(tmp_path, profile):
    runs = {r.role: load_config(r.configs, list(r.overrides))
            for r in plan(profile, "cifar10", tmp_path, tmp_path / "o")}
    dense = runs["dense"]
    for role in ("boosting_ticket", "boosting_control"):
        ticket = runs[role]
        assert ticket.method.finder_epochs <= 0.25 * dense.epochs
        # the budget: finder and shortened schedule together below the dense schedule's epochs
        assert ticket.method.finder_epochs + ticket.epochs < dense.epochs
        # the lr steps compressed with the schedule: at the same fractions of it as dense's
        assert ([m / ticket.epochs for m in ticket.optim.milestones]
                == [m / dense.epochs for m in dense.optim.milestones])


def test_seeds_are_runs_of_their_own(tmp_path):
    runs = plan("cpu-mini", "cifar10", tmp_path, tmp_path / "out", seeds=3, only=["dense", "flying_bird"])
    assert [(r.role, r.seed, r.name) for r in runs] == [
        ("dense", 0, "dense"), ("dense", 1, "dense-seed1"), ("dense", 2, "dense-seed2"),
        ("flying_bird", 0, "flying_bird"), ("flying_bird", 1, "flying_bird-seed1"),
        ("flying_bird", 2, "flying_bird-seed2")]
    cfgs = [load_config(r.configs, list(r.overrides)) for r in runs]
    assert [c.seed for c in cfgs] == [0, 1, 2] * 2 and cfgs[1].run_dir == tmp_path / "out" / "runs" / "dense-seed1"
    # seed 0 is the run a one-seed call trains, so more seeds later keep it
    (one,) = plan("cpu-mini", "cifar10", tmp_path, tmp_path / "out", only=["dense"])
    assert load_config(one.configs, list(one.overrides)).to_dict() == cfgs[0].to_dict()
    assert C.label("dense-seed2") == "dense PGD-AT (seed 2)" and C.label("flying_bird") == "Flying Bird"
    with pytest.raises(SpartaError, match="--seeds must be >= 1, got 0"):
        plan("paper", "cifar10", tmp_path, tmp_path, seeds=0)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "tinyimagenet"])
def test_paper_plan_is_the_presets(tmp_path, dataset):
    for run in plan("paper", dataset, tmp_path, tmp_path / "out"):
        cfg = load_config(run.configs, list(run.overrides))
        assert run.configs[0].parent == PRESETS and cfg.data.name == dataset
        assert cfg.model.name == "preact_resnet18" and cfg.attack.steps == 10 and cfg.eval.steps == 20
        assert cfg.epochs == (100 if "boosting" in run.role else 200)
        if run.role in ("boosting_ticket", "boosting_control"):  # a fifth of the dense schedule, lr steps at 50%, 75%
            assert (cfg.method.finder_epochs, cfg.method.search_milestones) == (40, [20, 30])
        if run.role != "dense":
            assert cfg.method.density == 0.2


@pytest.mark.parametrize("profile", PROFILES)
def test_flying_bird_plus_window_is_a_few_epochs_of_every_plan(tmp_path, profile):
    # the window holds one entry per epoch (tests/test_methods.py), so it spans `window` epochs
    (run,) = plan(profile, "cifar10", tmp_path, tmp_path / "out", only=["flying_bird_plus"])
    cfg = load_config(run.configs, list(run.overrides))
    assert cfg.method.window / cfg.epochs <= 0.05, (cfg.method.window, cfg.epochs)
    if profile == "cpu-mini":
        assert cfg.method.window_val_subset == 250 and cfg.eval.every == 20


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


def test_a_moved_run_folder_is_kept_and_other_settings_are_refused(tmp_path):
    from sparta.config import dump_yaml

    (run,) = plan("cpu-mini", "cifar10", tmp_path / "data", tmp_path / "out", only=["dense"])
    wanted = load_config(run.configs, list(run.overrides))
    # trained elsewhere, with the data elsewhere, then moved here
    moved = load_config(run.configs, [*run.overrides, "out_dir=/elsewhere/runs/dense", "data.root=/elsewhere/data"])
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.yaml").write_text(dump_yaml(moved))
    R.check_existing(run, wanted)
    other = load_config(run.configs, [*run.overrides, "model.base_width=8"])
    (run.run_dir / "config.yaml").write_text(dump_yaml(other))
    with pytest.raises(SpartaError, match=r"holds a dense run with other settings \(model.base_width\)"):
        R.check_existing(run, wanted)


@pytest.mark.parametrize("extra, message", [
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--jobs", "2", "--nproc", "2"], "--jobs trains several one-process runs side by side and --nproc one run on "
                                      "several processes; give one of them")])
def test_reproduce_refuses_bad_jobs(tmp_path, extra, message):
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "sparta", "reproduce", "--profile", "cpu-mini", "--data-root",
                             str(tmp_path / "data"), "--out", str(tmp_path / "out"), *extra], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and result.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_threads_per_job_shares_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert [R.threads_per_job(j) for j in (1, 2, 3, 8, 16)] == [None, 4, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice is kept
    assert R.threads_per_job(2) is None


def test_runs_side_by_side_all_train_when_one_fails(tmp_path, monkeypatch):
    planned = plan("cpu-mini", "cifar10", tmp_path, tmp_path / "out", only=["dense", "robust_bird", "flying_bird"])
    trained, lines = [], []

    def fake(run, *, nproc, log, threads, tag):
        assert tag and nproc is None
        log(f"[{run.name}] epoch 1")
        if run.role == "robust_bird":
            raise SpartaError(f"run {run.name} stopped with exit code 1")
        trained.append(run.name)

    monkeypatch.setattr(R, "train_run", fake)
    with pytest.raises(SpartaError, match=r"^run robust_bird failed \(errors above, each line tagged with its run\); "
                                          "rerun the same command to resume"):
        R.train_runs(planned, nproc=None, jobs=2, log=lines.append)
    assert sorted(trained) == ["dense", "flying_bird"]
    assert sorted(lines) == ["[dense] epoch 1", "[flying_bird] epoch 1", "[robust_bird] epoch 1"]

    def defect(run, **kw):
        raise ZeroDivisionError("a bug, not a run that stopped")

    monkeypatch.setattr(R, "train_run", defect)
    with pytest.raises(ZeroDivisionError):  # a defect keeps its traceback
        R.train_runs(planned, nproc=None, jobs=2, log=lines.append)


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
    assert result.stderr.strip() == (f"error: another sparta reproduce is writing {out}; "
                                     "wait for it, or give another --out")
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
    assert all(c["verdict"] in C.VERDICTS for c in found["claims"])
    for role in roles:
        summary = json.loads((out / "runs" / role / "summary.json").read_text())
        assert summary["epochs"] == 1 and role in found["final_eval"]
        assert found["final_eval"][role]["n"] == 8
    # robustness per training FLOP ranks the runs by their final AutoAttack accuracy (final-eval.json)
    section = (out / "report" / "report.md").read_text().split("## Robustness per training FLOP", 1)[1]
    assert "compared was measured with AutoAttack, ε = 8/255, 8 test images." in section.split("\n## ", 1)[0]
    rows = found["robustness_per_flop"]
    assert sorted(r["label"] for r in rows) == sorted(roles) and any(r["on_front"] for r in rows)
    assert all(r["attack"] == "AutoAttack" and r["n"] == 8 and r["sources"] == ["final-eval.json"] for r in rows)
    assert [r["robust_acc"] for r in rows] == [found["final_eval"][r["label"]]["autoattack"] for r in rows]


def test_smoke_trains_evaluates_reports_and_keeps_finished_runs(tmp_path, cifar100):
    """Two runs of the paper profile for one epoch, trained side by side, AutoAttack, report and claims; a
    second call retrains nothing and other settings are refused. (The seven runs each train in-process
    below; all seven through the whole pipeline: the slow test after it.)"""
    pytest.importorskip("pyautoattack")
    out, env = tmp_path / "out", {**os.environ, "PYTHONPATH": str(ROOT)}
    argv, result = smoke(out, cifar100, "--jobs", "2", "model.base_width=4", only="dense,flying_bird")
    assert result.returncode == 0, result.stderr[-3000:]
    # trained side by side: each training line is tagged with its run
    assert f"[dense] run directory: {out / 'runs' / 'dense'}" in result.stdout.splitlines()
    assert f"[flying_bird] run directory: {out / 'runs' / 'flying_bird'}" in result.stdout.splitlines()
    # ... and evaluated right after, in a process of its own, which gives what an evaluation here gives
    assert "[dense] == dense: AutoAttack and PGD-2 of the final model on the first 8 test images" in result.stdout
    child = json.loads((out / "runs" / "dense" / "final-eval.json").read_text())
    (out / "runs" / "dense" / "final-eval.json").rename(tmp_path / "child-eval.json")
    with pytest.warns(UserWarning, match="md5 of train, test differs"):
        here = R.evaluate_final(out / "runs" / "dense", R.SMOKE_EVAL, cifar100, lambda line: None)
    assert ([here[k] for k in ("clean", "autoattack", "pgd", "n")]
            == [child[k] for k in ("clean", "autoattack", "pgd", "n")])
    # robust overfitting, the robust gap, FLOPs at comparable RA; AutoAttack below PGD is a sanity check
    check_smoke(out, ["dense", "flying_bird"], n_claims=3)
    assert [c["claim"] for c in json.loads((out / "claims.json").read_text())["sanity_checks"]] == [
        "AutoAttack is below PGD-2 for every final model"]
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

    (planned,) = plan("paper", "cifar100", cifar100, tmp_path / "out", smoke=True, only=[role],
                      overrides=["model.base_width=4", "device=cpu"])
    with pytest.warns(UserWarning, match="md5 of train, test differs"):  # the stand-in is not the release
        summary = train(load_config(planned.configs, list(planned.overrides)))
    assert summary["epochs"] == 1 and summary["steps"] > 0


@pytest.mark.slow  # seven training processes and seven AutoAttack evaluations: over 2 minutes on 2 CPU cores
def test_paper_smoke_of_all_seven_runs(tmp_path, cifar100):
    pytest.importorskip("pyautoattack")
    _, result = smoke(tmp_path / "out", cifar100, "model.base_width=4")
    assert result.returncode == 0, result.stderr[-3000:]
    check_smoke(tmp_path / "out", list(ROLES), n_claims=13)


def test_a_kept_final_evaluation_at_another_eps_is_not_kept(tmp_path):
    from sparta.reproduce import FinalEval, kept_final_eval

    assert kept_final_eval(tmp_path, FinalEval(n=8)) is None  # nothing evaluated yet
    kept = {"eps": 8 / 255, "autoattack": 40.0, "n_pgd": 8}
    (tmp_path / "final-eval.json").write_text(json.dumps(kept))
    assert kept_final_eval(tmp_path, FinalEval(n=8)) is None  # an older version's: no per-image PGD outcomes
    (tmp_path / "final-eval.json").write_text(json.dumps({**kept, "pgd_outcomes": {"n": 8, "robust": "AA=="}}))
    assert kept_final_eval(tmp_path, FinalEval(n=8))["autoattack"] == 40.0  # no eps asked: the run's own
    assert kept_final_eval(tmp_path, FinalEval(n=8, eps=8 / 255)) is not None
    assert kept_final_eval(tmp_path, FinalEval(n=8, eps=0.031)) is None  # the grid's 0.031: evaluated again
    assert kept_final_eval(tmp_path, FinalEval(n=8, n_pgd=2000)) is None  # PGD on more images asked
