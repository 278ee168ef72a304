"""``--launcher slurm``: the runs of ``sparta reproduce`` and ``sparta grid`` as one Slurm job array
(through submitit, ``pip install 'sparta[cluster]'``), one array task per run; preempted and timed-out
tasks resume; a later call with the same arguments gathers what has finished.

Each task (:class:`RunTask`) does what the local launcher does for one run with ``--jobs``: it trains
the run with ``sparta train`` in a child process (``--resume`` when ``checkpoints/last.pt`` exists,
``--nproc N`` = torchrun inside the task for a run of N GPUs), then evaluates the final model in a
second child (``final-eval.json``). Finished runs and evaluations are kept, so a task that runs again,
or a second submission, redoes nothing.

Preemption and time limits: Slurm sends USR2 ``signal_delay_s`` seconds before the time limit
(``#SBATCH --signal``; also at preemption on clusters with ``PreemptParameters=send_user_signal``).
submitit's handler calls :meth:`RunTask.checkpoint`, which sends SIGTERM to the training child (it saves
``last.pt`` at the next step boundary and exits, the path of ``sparta.signals``), then submitit requeues
the task (``scontrol requeue``) and the requeued task resumes. A child stopped by a SIGTERM that Slurm
sent to every process of the job ends the same way: the task raises the USR2 itself. Time limits are
requeued at most ``max_timeouts`` times (submitit's count); a task that fails for any other reason is
not requeued: its error line goes to its state file, and ``--status`` and the gathering call name it.

Files, under ``OUT/launcher/``: ``logs/`` is submitit's folder (each task's stdout and stderr as
``<job>_<task>_log.{out,err}``, its pickles and the sbatch file), ``state/<run>.json`` the run's state
(pending, running, requeued, failed with its error, done), written by the submitting call and the task.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import SpartaError
from .reproduce import FinalEval, PlannedRun, child_args, kept_final_eval, train_args
from .rundir import RunDir, dumps, write_text_atomic

LAUNCHERS = ("local", "slurm")
CLUSTERS = ("slurm", "local")  # local: submitit's local executor (the tasks as local processes)
ACTIVE = ("pending", "running", "requeued")
# Slurm states after which a task runs no more (sacct); the task's own state file may not know it
# (a task killed for memory, cancelled, or on a failed node writes nothing)
SLURM_ENDED = ("BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT")


@dataclass(frozen=True)
class SlurmSettings:
    """What each array task asks Slurm for (flags > the ``launcher:`` section of ``--launcher-config`` > these)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 24 * 60  # per task; a longer run is requeued at the limit and resumes
    gpus_per_run: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 32
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to finish a step and save
    max_timeouts: int = 3  # requeues after a time limit, per task (preemptions are not counted)
    setup: tuple[str, ...] = ()  # shell lines run before each task, e.g. "module load cuda"
    cluster: str = "slurm"

    def submitit_parameters(self, name: str, parallelism: int | None) -> dict[str, Any]:
        """``AutoExecutor.update_parameters`` keywords."""
        return {"name": name, "timeout_min": self.time_min, "gpus_per_node": self.gpus_per_run,
                "tasks_per_node": 1, "nodes": 1, "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb,
                "slurm_partition": self.partition, "slurm_account": self.account, "slurm_qos": self.qos,
                "slurm_signal_delay_s": self.signal_delay_s, "slurm_setup": list(self.setup) or None,
                "slurm_array_parallelism": parallelism}


INT_SETTINGS = {f.name for f in fields(SlurmSettings) if f.type == "int"}


def load_settings(path: str | Path | None = None, **flags: Any) -> SlurmSettings:
    """Defaults, then the ``launcher:`` section of the YAML file ``path``, then ``flags`` (None: not given)."""
    given: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SpartaError(f"--launcher-config {path}: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict) or not isinstance(data.get("launcher"), dict):
            raise SpartaError(f"--launcher-config {path} has no 'launcher:' section (a mapping such as "
                              "'launcher: {partition: gpu, time_min: 1440}')")
        given = dict(data["launcher"])
    given.update({k: v for k, v in flags.items() if v is not None})
    valid = [f.name for f in fields(SlurmSettings)]
    unknown = [k for k in given if k not in valid]
    if unknown:
        raise SpartaError(f"launcher settings: unknown {', '.join(map(str, unknown))}; valid: {', '.join(valid)}")
    for key in INT_SETTINGS & set(given):
        if (not isinstance(given[key], int) or isinstance(given[key], bool)
                or given[key] < (0 if key == "max_timeouts" else 1)):
            raise SpartaError(f"launcher setting {key} must be a whole number >= "
                              f"{0 if key == 'max_timeouts' else 1}, got {given[key]!r}")
    if "setup" in given:
        setup = given["setup"]
        if isinstance(setup, str):
            setup = [setup]
        if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
            raise SpartaError(f"launcher setting setup must be a list of shell lines, got {given['setup']!r}")
        given["setup"] = tuple(setup)
    if given.get("cluster", "slurm") not in CLUSTERS:
        raise SpartaError(f"launcher setting cluster must be one of {', '.join(CLUSTERS)}, got {given['cluster']!r}")
    return replace(SlurmSettings(), **given)


def require_submitit() -> Any:
    try:
        import submitit  # noqa: PLC0415 (optional dependency: submitit)
    except ImportError:
        raise SpartaError("--launcher slurm needs submitit: pip install 'sparta[cluster]'") from None
    return submitit


def job_name(out: Path) -> str:
    return f"sparta-{out.resolve().name}"


def dry_run_lines(settings: SlurmSettings, out: Path, n_runs: int, parallelism: int | None) -> list[str]:
    """The settings and the ``#SBATCH`` lines a submission of ``n_runs`` runs would use."""
    require_submitit()
    from submitit.slurm import slurm  # noqa: PLC0415 (optional dependency: submitit)

    # what SlurmExecutor.update_parameters makes of the parameters (without its check for srun on PATH)
    params = {k: v for k, v in settings.submitit_parameters(job_name(out), parallelism).items() if v is not None}
    # submitit's parameter names -> sbatch's (a TypedDict of str values: a plain dict for .get on any name)
    renamed = {k: str(v) for k, v in (slurm.SlurmExecutor._equivalence_dict() or {}).items()}
    sbatch_params = {renamed.get(k, k): v for k, v in params.items() if not k.startswith("slurm_")}
    sbatch_params["mem"] = slurm._convert_mem(sbatch_params["mem"])
    sbatch_params.update({k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")})
    sbatch = slurm._make_sbatch_string(command="<python> -u -m submitit.core._submit <folder>",
                                       folder=logs_folder(out), map_count=n_runs, **sbatch_params)
    shown = ", ".join(f"{k}={v}" for k, v in asdict(settings).items() if v not in (None, ()))
    return [f"launcher: slurm ({shown}); logs in {logs_folder(out)}",
            *[line for line in sbatch.splitlines() if line.startswith("#SBATCH")]]


def logs_folder(out: Path) -> Path:
    return (out / "launcher" / "logs").resolve()


def state_path(out: Path, name: str) -> Path:
    return (out / "launcher" / "state" / f"{name}.json").resolve()


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_state(path: Path, **fields_: Any) -> None:

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, dumps({**fields_, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}))


def _executor(settings: SlurmSettings, out: Path, parallelism: int | None) -> Any:
    submitit = require_submitit()
    if settings.cluster == "slurm" and not shutil.which("srun"):
        raise SpartaError("--launcher slurm submits with sbatch and srun, and there is no srun on PATH: "
                          "run this on a machine of the Slurm cluster (a login node)")
    executor = submitit.AutoExecutor(folder=logs_folder(out), cluster=settings.cluster,
                                     slurm_max_num_timeout=settings.max_timeouts,
                                     local_max_num_timeout=settings.max_timeouts)
    params = settings.submitit_parameters(job_name(out), parallelism)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


class RunFailed(SpartaError):
    """A task's run stopped for a reason other than preemption: not requeued."""


class RunTask:
    """One array task: train the run (or resume it, or keep it), then evaluate its final model.

    submitit calls it, and calls :meth:`checkpoint` on Slurm's warning signal."""

    def __init__(self, run: PlannedRun, nproc: int | None, final: FinalEval, data_root: Path, state: Path):
        self.run, self.nproc, self.final, self.data_root, self.state = run, nproc, final, data_root, state
        self.child: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:  # pickled by submitit; a process does not travel
        return {**self.__dict__, "child": None}

    def _record(self, state: str, **extra: Any) -> None:
        old = read_state(self.state)
        write_state(self.state, **{**old, "state": state, **extra})

    def __call__(self) -> str:
        import submitit  # noqa: PLC0415 (optional dependency: submitit)

        old = read_state(self.state)
        env = submitit.JobEnvironment()
        self._record("running", job=env.job_id, host=socket.gethostname(), pid=os.getpid(),
                     attempt=int(old.get("attempt", 0)) + 1, error=None)
        rd = self.run.run_dir
        if not (rd / "summary.json").is_file():
            args, what = train_args(self.run, self.nproc)
            print(f"== {self.run.name}: {what}", flush=True)
            self._step([sys.executable, "-m", "sparta", *args])
        if kept_final_eval(rd, self.final) is None:
            self._step(child_args(rd, self.final, self.data_root))
        self._record("done")
        return "done"

    def _step(self, argv: list[str]) -> None:
        """Run ``argv`` to its end; its stderr is kept for the error line, then copied to the task's log."""
        with open(self.state.with_suffix(".stderr"), "w") as handle:
            self.child = subprocess.Popen(argv, stderr=handle)
            while self.child.poll() is None:  # polling, not wait(): the signal handler may run meanwhile
                time.sleep(0.2)
        code, self.child = self.child.returncode, None
        text = self._child_stderr()
        if code == 0:
            return
        if code in (128 + signal.SIGTERM, -signal.SIGTERM):  # stopped by Slurm's SIGTERM, last.pt saved
            self._record("requeued")
            os.kill(os.getpid(), _preempt_signal())  # submitit's handler requeues this task and exits
        lines = [line for line in text.splitlines() if line.strip()]
        line = lines[-1].strip() if lines else f"exit code {code}"
        if code < 0:
            line = f"killed by {signal.Signals(-code).name}" + (f" ({line})" if lines else "")
        self._record("failed", error=line)
        raise RunFailed(f"run {self.run.name} failed: {line}")

    def _child_stderr(self) -> str:
        """The last child's stderr, copied to the task's log."""
        text = self.state.with_suffix(".stderr").read_text(errors="replace")
        sys.stderr.write(text)
        sys.stderr.flush()
        return text

    def checkpoint(self) -> Any:
        """Slurm's warning signal: stop the training child (it saves ``last.pt``), requeue this same task."""
        from submitit.helpers import DelayedSubmission  # noqa: PLC0415 (optional dependency: submitit)

        child = self.child
        if child is not None and child.returncode is None:
            child.send_signal(signal.SIGTERM)
            try:  # wait for its end without reaping it: the interrupted poll() may hold Popen's lock
                os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass
            self._child_stderr()
        self._record("requeued")
        return DelayedSubmission(self)


def _preempt_signal() -> int:
    from submitit.core.job_environment import JobEnvironment  # noqa: PLC0415 (optional dependency: submitit)

    return JobEnvironment._usr_sig()


def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    """``sacct``'s state of each job (``1234_5`` for array tasks); {} where sacct cannot tell."""
    if not job_ids:
        return {}
    try:
        text = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j",
                               ",".join(sorted({j.split("_")[0] for j in job_ids}))],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) >= 2:
            states[parts[0].strip()] = parts[1].split()[0] if parts[1].split() else ""
    return states


def run_status(planned: list[PlannedRun], out: Path, *, cluster: str | None = None,
               final: FinalEval | None = None) -> list[dict[str, Any]]:
    """One row per run: its state (done, trained, running, pending, requeued, failed, stopped, not started),
    last epoch, job, attempts and error line, and the kept final evaluation of a done run (``final_eval``,
    else None; not a table column). ``cluster`` "slurm": sacct corrects tasks that ended unseen."""

    states = {run.name: read_state(state_path(out, run.name)) for run in planned}
    slurm = _slurm_states([s["job"] for s in states.values() if s.get("job") and s.get("state") in ACTIVE]) \
        if cluster == "slurm" else {}
    rows = []
    for run in planned:
        st, rd = states[run.name], run.run_dir
        records = RunDir(rd).read_metrics()
        kept = kept_final_eval(rd, final or FinalEval(n=None)) if (rd / "summary.json").is_file() else None
        row = {"run": run.name, "epoch": records[-1]["epoch"] if records else None, "job": st.get("job"),
               "attempts": st.get("attempt"), "error": None, "final_eval": kept}
        if kept is not None:
            row["state"] = "done"
        elif st.get("state") == "failed":
            row.update(state="failed", error=st.get("error"))
        elif st.get("state") in ACTIVE and slurm.get(st.get("job", "")) in SLURM_ENDED:
            row.update(state="failed", error=f"Slurm ended job {st['job']}: {slurm[st['job']]}")
        elif st.get("state") in ACTIVE:
            row["state"] = st["state"]
        elif (rd / "summary.json").is_file():
            row["state"] = "trained"  # its final evaluation is missing
        elif (rd / "checkpoints" / "last.pt").is_file():
            row["state"] = "stopped"
        else:
            row["state"] = "not started"
        rows.append(row)
    return rows


STATUS_COLUMNS = [("run", "run"), ("state", "state"), ("epoch", "epoch"), ("job", "job"), ("attempts", "attempts"),
                  ("error", "error")]


class SlurmLauncher:
    """Submits the runs that are not finished (and not pending or running) as one job array, waits for
    it when asked, and returns the final evaluations of the runs finished so far.

    After :meth:`run`: ``submitted`` (the job ids of this call), ``jobs`` (submitit's) and ``rows``
    (:func:`run_status`)."""

    def __init__(self, settings: SlurmSettings, out: Path, *, wait: bool = False, parallelism: int | None = None,
                 log: Callable[[str], None] = lambda line: None):
        require_submitit()
        self.settings, self.out, self.wait, self.parallelism, self.log = settings, Path(out), wait, parallelism, log
        self.submitted: list[str] = []
        self.jobs: list[Any] = []  # submitit's Job of each task submitted by this launcher
        self.rows: list[dict[str, Any]] = []

    @property
    def nproc(self) -> int | None:
        return self.settings.gpus_per_run if self.settings.gpus_per_run > 1 else None

    def run(self, planned: list[PlannedRun], final: FinalEval, data_root: Path) -> dict[str, dict[str, Any]]:
        rows = {row["run"]: row for row in run_status(planned, self.out, cluster=self.settings.cluster, final=final)}
        todo = [run for run in planned if rows[run.name]["state"] not in ("done", *ACTIVE)]
        for run in todo:
            if rows[run.name]["state"] == "failed":
                self.log(f"== {run.name}: failed earlier ({rows[run.name]['error']}); submitted again")
        jobs = self.submit(todo, final, data_root) if todo else []
        if not todo:
            self.log("== nothing to submit: every run is finished, pending or running")
        if self.wait:
            for job in jobs:
                job.wait()
            # runs of an earlier submission: wait for their state files
            while any(r["state"] in ACTIVE for r in run_status(planned, self.out, cluster=self.settings.cluster,
                                                                final=final)):
                time.sleep(10)
        self.rows = run_status(planned, self.out, cluster=self.settings.cluster, final=final)
        return {row["run"]: row["final_eval"] for row in self.rows if row["state"] == "done"}

    def submit(self, runs: list[PlannedRun], final: FinalEval, data_root: Path) -> list[Any]:
        executor = _executor(self.settings, self.out, self.parallelism)
        tasks = [RunTask(replace(run, run_dir=run.run_dir.resolve()), self.nproc, final, data_root.resolve(),
                         state_path(self.out, run.name)) for run in runs]
        for run in runs:  # before the tasks exist: a task that starts at once records itself over it
            write_state(state_path(self.out, run.name), state="pending", job=None, attempt=0, error=None)
        try:
            jobs = executor.submit_array(tasks)
        except Exception as e:  # sbatch refused the array (a partition or account it does not know...)
            line = next((line for line in str(e).splitlines() if line.strip()), e.__class__.__name__)
            for run in runs:
                write_state(state_path(self.out, run.name), state="failed", job=None, attempt=0,
                            error=f"not submitted: {line}")
            raise SpartaError(f"the submission failed: {line}") from None
        self.jobs += jobs
        for run, job in zip(runs, jobs):
            path = state_path(self.out, run.name)
            if read_state(path).get("state") == "pending":
                write_state(path, state="pending", job=job.job_id, attempt=0, error=None)
        ids = sorted({str(job.job_id).split("_")[0] for job in jobs})
        self.submitted = ids
        self.log(f"== submitted {len(runs)} run{'s' if len(runs) > 1 else ''} as job{'s' if len(ids) > 1 else ''} "
                 f"{', '.join(ids)} "
                 f"({', '.join(run.name for run in runs)}); logs in {logs_folder(self.out)}")
        return jobs
