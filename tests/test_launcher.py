"""``--launcher slurm``: runs as submitit array tasks. submitit's local executor runs the same tasks as
Slurm (the same pickled ``RunTask``, signal handler and requeue path) as local processes, so training,
requeue after a stop signal and failures are real here; a fake ``sbatch`` on PATH records what a
cluster would receive."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import one_line_error
from test_grid import write_svhn
from test_reliability import ARGS, DEMO, ROOT, assert_same_run, saved_step

from sparta.cli import table
from sparta.launcher import STATUS_COLUMNS, SlurmLauncher, SlurmSettings, load_settings, run_status
from sparta.reproduce import FinalEval, PlannedRun

FINAL = FinalEval(n=8, steps=2)
LOCAL = SlurmSettings(cluster="local", time_min=30)


def planned(out: Path, name: str, *extra: str) -> PlannedRun:
    """A tiny digits run (2 epochs of 16 steps, a checkpoint after every step) named ``name``."""
    run_dir = out / "runs" / name
    return PlannedRun(name, (Path(DEMO),), (*ARGS, "name=tiny", f"out_dir={run_dir}", *extra), run_dir)


@pytest.fixture(autouse=True)
def one_thread_tasks(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tasks inherit it


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two runs and a run that fails, submitted as one array to the local executor, waited for."""
    out = tmp_path_factory.mktemp("pair")
    runs = [planned(out, "a"), planned(out, "b", "seed=1"), planned(out, "bad", "model.name=nope")]
    lines = []
    launcher = SlurmLauncher(LOCAL, out, wait=True, log=lines.append)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the tasks inherit it
        evals = launcher.run(runs, FINAL, out)
    return out, runs, launcher, evals, lines


def test_two_runs_train_and_evaluate_as_tasks_and_are_kept(pair):
    out, runs, launcher, evals, lines = pair
    assert sorted(evals) == ["a", "b"] and all(e["n"] == 8 for e in evals.values())
    # the local executor runs each task as a job of its own (Slurm: one array, test_a_fake_sbatch...)
    assert len(launcher.submitted) == 3 and lines[0].startswith("== submitted 3 runs as jobs ")
    for run in runs[:2]:
        state = json.loads((out / "launcher" / "state" / f"{run.name}.json").read_text())
        assert (state["state"], state["attempt"]) == ("done", 1)
        assert (run.run_dir / "summary.json").is_file() and (run.run_dir / "final-eval.json").is_file()
    # a second submission submits only what is missing: the failed run, not the finished ones
    more = []
    again = SlurmLauncher(LOCAL, out, wait=True, log=more.append)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    assert again.run(runs[:2], FINAL, out) == evals
    assert more == ["== nothing to submit: every run is finished, pending or running"] and not again.submitted
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == mtimes


def test_a_failing_task_is_not_requeued_and_is_named(pair):
    out, runs, launcher, _, _ = pair
    rows = {row["run"]: row for row in launcher.rows}
    assert rows["bad"]["state"] == "failed" and rows["bad"]["attempts"] == 1
    assert "nope" in rows["bad"]["error"] and rows["bad"]["error"].startswith("error: ")
    text = table(run_status(runs, out), STATUS_COLUMNS)
    (line,) = [line for line in text.splitlines() if line.startswith("bad ")]
    assert "failed" in line and "nope" in line
    assert [r["state"] for r in run_status(runs, out)] == ["done", "done", "failed"]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("target", ["training", "task"])
def test_a_stopped_task_is_requeued_and_resumes_to_the_uninterrupted_result(pair, tmp_path, target):
    """``training``: SIGTERM to the training process, as Slurm sends every process at preemption;
    ``task``: USR2 to the task, Slurm's warning signal before the time limit."""
    reference = pair[1][0].run_dir
    run = planned(tmp_path, "a")
    launcher = SlurmLauncher(LOCAL, tmp_path, log=lambda line: None)
    assert launcher.run([run], FINAL, tmp_path) == {}  # submitted, not waited for
    (job,) = launcher.jobs
    state = tmp_path / "launcher" / "state" / "a.json"
    deadline = time.monotonic() + 120
    while saved_step(run.run_dir) < 3:
        assert job.state == "RUNNING" and time.monotonic() < deadline, job.stderr()
        time.sleep(0.02)
    task = json.loads(state.read_text())["pid"]
    if target == "training":
        (child,) = children(task)
        os.kill(child, signal.SIGTERM)
    else:
        os.kill(task, signal.SIGUSR2)
    job.wait()
    stopped = [line for line in job.stderr().splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stopped) == 1, job.stderr()
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert 3 <= step < 32
    final = json.loads(state.read_text())
    assert (final["state"], final["attempt"]) == ("done", 2), final
    assert_same_run(reference, run.run_dir)
    assert json.loads((run.run_dir / "final-eval.json").read_text())["autoattack"] == pair[3]["a"]["autoattack"]


GRID = ["grid", "--dataset", "svhn", "--model", "preact_resnet18", "--methods", "magnitude,hydra",
        "--sparsities", "0.9"]


def test_dry_run_prints_the_submission(tmp_path, capsys):
    from sparta.cli import main

    (tmp_path / "cluster.yaml").write_text("launcher:\n  account: lab\n  time_min: 600\n  partition: cpu\n"
                                           "  setup: [module load cuda]\n")
    assert main([*GRID, "--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "--launcher", "slurm",
                 "--launcher-config", str(tmp_path / "cluster.yaml"), "--partition", "gpu", "--gpus-per-run", "2",
                 "--mem-gb", "64", "--jobs", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("launcher: slurm (partition=gpu, account=lab, time_min=600, gpus_per_run=2, "
                             "cpus_per_task=8, mem_gb=64, signal_delay_s=120, max_timeouts=3")
    sbatch = {line for line in out if line.startswith("#SBATCH")}
    for flag in ("--partition=gpu", "--account=lab", "--time=600", "--gpus-per-node=2", "--cpus-per-task=8",
                 "--mem=64GB", "--array=0-1%1", "--signal=USR2@120", "--ntasks-per-node=1", "--nodes=1"):
        assert f"#SBATCH {flag}" in sbatch, sbatch
    commands = [line for line in out if line.startswith("sparta ")]
    assert len(commands) == 2 and all(c.startswith("sparta train --nproc 2 ") for c in commands)
    assert not (tmp_path / "out").exists()


def fake_cluster(tmp_path: Path, sacct: str = "") -> dict[str, str]:
    """``sbatch`` that records its arguments and the submission file and answers job 4242; ``sacct``
    that prints ``sacct`` (a Slurm state table)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    (bin_ / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch.args\ncp "$1" {tmp_path}/job.sh\n'
                                 'echo "Submitted batch job 4242"\n')
    (bin_ / "sacct").write_text(f"#!/bin/sh\nprintf '{sacct}'\n")
    (bin_ / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it on PATH; the fake sbatch runs nothing
    for tool in ("sbatch", "sacct", "srun"):
        (bin_ / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}


def test_a_fake_sbatch_receives_the_array_and_a_second_call_submits_nothing(tmp_path):
    write_svhn(tmp_path)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sparta", *GRID, "--data-root", str(tmp_path), "--out", str(out),
            "--launcher", "slurm", "--partition", "gpu", "--smoke"]
    first = subprocess.run(argv, capture_output=True, text=True, env=fake_cluster(tmp_path), timeout=120)
    assert first.returncode == 0, first.stderr
    assert "as job 4242 (magnitude-s90, hydra-s90)" in first.stdout
    assert "not finished yet" in first.stderr
    job = (tmp_path / "job.sh").read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --time=1440", "#SBATCH --job-name=sparta-out"):
        assert line in job.splitlines(), job
    assert f"-u -m submitit.core._submit {out.resolve() / 'launcher' / 'logs'}" in job
    assert sorted(p.name for p in (out / "launcher" / "logs").glob("*_submitted.pkl")) == \
        ["4242_0_submitted.pkl", "4242_1_submitted.pkl"]
    states = {p.stem: json.loads(p.read_text()) for p in (out / "launcher" / "state").glob("*.json")}
    assert {k: (s["state"], s["job"]) for k, s in states.items()} == {"magnitude-s90": ("pending", "4242_0"),
                                                                       "hydra-s90": ("pending", "4242_1")}
    second = subprocess.run(argv, capture_output=True, text=True, env=fake_cluster(tmp_path), timeout=120)
    assert second.returncode == 0 and "nothing to submit" in second.stdout
    assert len((tmp_path / "sbatch.args").read_text().splitlines()) == 1
    # Slurm killed one task for memory: the status names it, and the next call submits it again
    env = fake_cluster(tmp_path, sacct="4242_0|RUNNING\\n4242_1|OUT_OF_MEMORY\\n")
    status = subprocess.run([*argv, "--status"], capture_output=True, text=True, env=env, timeout=120)
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[2:]}
    assert "pending" in rows["magnitude-s90"]
    assert "failed" in rows["hydra-s90"] and "Slurm ended job 4242_1: OUT_OF_MEMORY" in rows["hydra-s90"]
    third = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert third.returncode == 0 and "submitted 1 run as job 4242 (hydra-s90)" in third.stdout, third.stderr
    assert len((tmp_path / "sbatch.args").read_text().splitlines()) == 2


def test_launcher_settings_are_checked(tmp_path):
    (tmp_path / "a.yaml").write_text("launcher: {partition: gpu, gpus: 2}\n")
    with pytest.raises(Exception, match="unknown gpus; valid: partition"):
        load_settings(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("partition: gpu\n")
    with pytest.raises(Exception, match="has no 'launcher:' section"):
        load_settings(tmp_path / "b.yaml")
    with pytest.raises(Exception, match="time_min must be a whole number >= 1, got 0"):
        load_settings(time_min=0)
    assert load_settings(None, partition="x").partition == "x"


@pytest.mark.parametrize("args,expect", [
    (["--wait"], "--wait: only with --launcher slurm"),
    (["--gpus-per-run", "2"], "--gpus-per-run: only with --launcher slurm"),
    (["--launcher", "slurm", "--nproc", "2"], "with --launcher slurm give --gpus-per-run N"),
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
])
def test_bad_launcher_input_is_one_line(tmp_path, capsys, args, expect):
    one_line_error(capsys, [*GRID, "--data-root", str(tmp_path), "--out", str(tmp_path / "out"), *args], expect)


def test_without_submitit_the_slurm_launcher_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    one_line_error(capsys, [*GRID, "--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "--launcher",
                            "slurm"], "needs submitit: pip install 'sparta[cluster]'")


def test_grid_smoke_through_the_local_executor_waits_and_reports(tmp_path, capsys):
    """One cell trained, evaluated and reported through tasks (two methods in one cell, in process:
    test_grid's smoke test)."""
    from sparta.cli import main

    write_svhn(tmp_path)
    (tmp_path / "local.yaml").write_text("launcher: {cluster: local, time_min: 30}\n")
    out = tmp_path / "out"
    argv = ["grid", "--dataset", "svhn", "--model", "preact_resnet18", "--data-root", str(tmp_path), "--out", str(out),
            "--methods", "magnitude", "--sparsities", "0.9", "--smoke", "model.base_width=4",
            "--launcher", "slurm", "--launcher-config", str(tmp_path / "local.yaml")]
    assert main([*argv, "--wait"]) == 0
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(str(out / "report" / "report.md"))
    grid = json.loads((out / "grid.json").read_text())
    assert [r["run"] for r in grid["runs"]] == ["magnitude-s90"] and grid["runs"][0]["n"] == 8
    assert (out / "submissions" / "magnitude-s90" / "submission.json").is_file()
    assert main([*argv, "--status"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split()[:2] for row in rows] == [["magnitude-s90", "done"]]


def test_reproduce_dry_run_prints_the_array(tmp_path, capsys):
    from sparta.cli import main

    assert main(["reproduce", "--profile", "paper", "--dataset", "cifar100", "--data-root", str(tmp_path), "--out",
                 str(tmp_path / "out"), "--launcher", "slurm", "--time-min", "240", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "#SBATCH --array=0-6%7" in out and "#SBATCH --time=240" in out
    assert len([line for line in out if line.startswith("sparta train configs/") or "sparta train /" in line]) == 7


def test_a_refused_submission_is_one_line_and_recorded(tmp_path, capsys, monkeypatch):
    write_svhn(tmp_path)
    env = fake_cluster(tmp_path)
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\n"
                                             "exit 1\n")
    monkeypatch.setenv("PATH", env["PATH"])
    out = tmp_path / "out"
    from sparta.cli import main

    assert main([*GRID, "--data-root", str(tmp_path), "--out", str(out), "--launcher", "slurm",
                 "--partition", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # sbatch's own line (its stderr is the terminal's), then ours
    assert err[-1] == "error: the submission failed: sbatch: error: invalid partition specified: nope", err
    assert "Traceback" not in "".join(err)
    state = json.loads((out / "launcher" / "state" / "hydra-s90.json").read_text())
    assert state["state"] == "failed" and state["error"].startswith("not submitted: ")
