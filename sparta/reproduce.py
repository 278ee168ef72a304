"""``sparta reproduce``: every method of the papers under one protocol, evaluated, with the claims checked.

A profile is a list of runs, each a preset of ``sparta/configs/`` plus overrides, trained one after
the other by ``sparta train`` (through torchrun with ``--nproc``); then every final model is
evaluated with AutoAttack and PGD-20 on the same test images, and one report is written: the
``sparta report`` tables and plots of all runs, preceded by the protocol, the commands and the
claims of ``sparta.claims`` with their verdicts.

* ``cpu-mini``: a scaled-down CIFAR-10 protocol (``CPU_MINI`` below, with the reasons for each
  number): about 70 minutes a seed on 2 CPU cores with bf16, two runs side by side (``--jobs 2``).
* ``paper``: the papers' protocols unchanged (200 epochs, preact_resnet18, density 0.2, PGD-10
  training, PGD-20 and AutoAttack on the full test set), for GPUs.

Everything is resumable: a finished run (``summary.json``) and a finished evaluation
(``final-eval.json`` in the run directory) are kept, an unfinished run is resumed from its last checkpoint, so the
same command continues after a kill. The runs train here (``--jobs`` at once) or, with a launcher
(``sparta.launcher``: ``--launcher slurm``), as tasks of a Slurm job array that write the same files.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import claims as C
from . import outcomes as O
from .config import load_config, smoke_settings
from .errors import SpartaError
from .outcomes import encode, pack
from .report import load_run, write_report
from .rundir import RunDir, dumps, write_text_atomic

PRESETS = Path(__file__).with_name("configs")
PROFILES = ("cpu-mini", "paper")
DATASETS = ("cifar10", "cifar100", "tinyimagenet")  # the papers' datasets (their facts: sparta.data)

# role -> preset name (``{dataset}_<preset>.yaml``); the order is the order of training
ROLES = {"dense": "pgd", "robust_bird": "robust_bird", "robust_bird_channel": "robust_bird_channel",
         "flying_bird": "flying_bird", "flying_bird_plus": "flying_bird_plus",
         "boosting_ticket": "boosting_ticket", "boosting_control": "boosting_ticket"}
# runs that are a preset changed in one setting: the boosting paper's control trains the ticket's mask
# from a fresh random initialisation (the same finder, so the same mask on a deterministic device)
ROLE_OVERRIDES: dict[str, list[str]] = {"boosting_control": ["method.reinit=random"]}

# cpu-mini: one protocol for every run, about 70 minutes a seed on 2 CPU cores with bf16 and --jobs 2
# (docs/reproduce.md gives the reasons and the measured cost)
CPU_MINI_EPOCHS = 160
CPU_MINI: list[str] = [
    # 500 training images seen 160 times each: robust overfitting needs a model that can memorise
    # its adversarial training set, and shows sooner the smaller the set (Rice et al. 2020). Earlier
    # versions did not overfit: 4,000 images for 20 epochs, 1,000 images for 80 epochs at width 16,
    # 500 images for 100 epochs at width 8 or 16 (best-by-validation and final test RA within 1 point)
    "data.val_size=1000", "data.train_subset=500",
    # preact_resnet18 at a quarter of its width (16-32-64-128 channels): 1/16 of its FLOPs, same
    # topology, 700k weights; at width 8 the dense run's train RA stayed at 36% after 100 epochs
    "model.base_width=16",
    f"epochs={CPU_MINI_EPOCHS}",
    # the papers' step schedule: lr 0.1, x0.1 at 50% and 75% of training
    "optim.milestones=[80,120]",
    # PGD-3 with Madry's step 2.5 eps / steps instead of PGD-10: a third of the attack cost, the same
    # threat model (eps 8/255)
    "attack.steps=3", "attack.alpha=20/765",
    # bf16 autocast for training where the CPU runs it fast (fp32 elsewhere); evaluation stays fp32
    "train.precision=auto",
    # evaluation every 20th epoch: PGD-10, step 2/255, on all 1,000 validation images (the best epoch
    # is picked on them: 250 picked epochs 3 points past the test peak) and 500 test images, the
    # robust gap on 500 training images; one evaluation costs about 14 training epochs, so evaluating
    # every 10th epoch would cost more than the training itself
    "eval.every=20", "eval.steps=10", "eval.val_subset=1000", "eval.test_subset=500", "eval.gap_subset=500",
    "progress=lines",
]
# boosting, budgeted as Li et al. judge it: the ticket retrains on half the dense schedule with its lr
# steps compressed (paper: 100 of 200 epochs) after a finder of a fifth of it (<= 25%), and is judged
# against the full dense run; evaluated every 10th epoch (8 evaluations, as the dense run)
BOOSTING_MINI = ["epochs=80", "optim.milestones=[40,60]", "optim.warmup_epochs=4", "eval.every=10",
                 f"method.finder_epochs={CPU_MINI_EPOCHS // 5}",
                 f"method.search_milestones=[{CPU_MINI_EPOCHS // 10},{3 * CPU_MINI_EPOCHS // 20}]"]
# the paper profile: the presets' finder (Li et al.'s 100 epochs) would cost half the 200-epoch dense
# schedule; a fifth of it, with its lr steps at the same fractions, keeps the ticket's budget below dense's
PAPER_ROLE: dict[str, list[str]] = {role: ["method.finder_epochs=40", "method.search_milestones=[20,30]"]
                                    for role in ("boosting_ticket", "boosting_control")}
# Robust Bird: the search is at most a third of the adversarial epochs (paper: 50 of 200 allowed).
# With 4 SGD steps an epoch, masks compared after every epoch are 4 steps apart and differ in under
# 8% of positions from the 5th epoch on, so the criterion could not fail; 12 steps apart (the window
# spans 48 steps) the distance starts at 0.096 and fell below 0.08 at epoch 24 in a probe
RB_SEARCH_MINI = [f"method.max_search_epochs={CPU_MINI_EPOCHS // 3}", "method.min_search_epochs=16",
                  "method.eb_every_steps=12"]
CPU_MINI_ROLE: dict[str, list[str]] = {
    "robust_bird": RB_SEARCH_MINI,
    "robust_bird_channel": RB_SEARCH_MINI,
    # paper: an update every 900 (later 1200) iterations = 2.6 (3.4) epochs of 352 iterations, ~68
    # updates in 200 epochs; here every 5 epochs of 4 iterations (7 in the second half), 27 updates
    "flying_bird": ["method.update_every_epochs=5", "method.update_every_late_epochs=7"],
    # FB+'s window (5 epochs, 3% of training) gets an entry after every epoch: the evaluation attack
    # (PGD-10) on the first 250 validation images, the same every epoch, whatever eval.every is; it
    # costs about twice a training epoch (5.2 s against 2.4 s on one thread of a Xeon with AMX)
    "flying_bird_plus": ["method.update_every_epochs=5", "method.update_every_late_epochs=7",
                         f"method.adapt_from_epoch={CPU_MINI_EPOCHS // 2}", "method.window_val_subset=250"],
    "boosting_ticket": BOOSTING_MINI,
    "boosting_control": BOOSTING_MINI,
}

# a one-epoch run of any profile on a few images: checks that every stage runs, nothing more
SMOKE: list[str] = ["epochs=1", "data.val_size=32", "data.train_subset=64", "batch_size=32", "attack.steps=2",
                    "eval.steps=2", "eval.val_subset=32", "eval.test_subset=32", "eval.gap_subset=32",
                    "optim.milestones=[1]", "optim.warmup_epochs=0", "progress=none"]
# (plus the method's own SMOKE: one epoch of each of its stages; sparta.method_config)


@dataclass(frozen=True)
class FinalEval:
    """AutoAttack (standard) of each final model on the first ``n`` test images (None: all) and
    PGD-``steps`` on the first ``n_pgd`` (None: the same ``n``), at ``eps`` (None: the run's own
    evaluation eps). PGD's per-image outcomes are kept in ``final-eval.json``."""

    n: int | None
    steps: int = 20
    eps: float | None = None
    n_pgd: int | None = None

    @property
    def pgd_images(self) -> int | None:
        return self.n if self.n_pgd is None else self.n_pgd


# AutoAttack standard costs ~1 s an image on the cpu-mini models (Square's 5,000 queries on every
# image still robust dominate): 100 images each keeps the evaluations of a seed to ~10 minutes; PGD-20
# is cheap enough for 2,000 (2 SE of a paired difference of final RAs: about 1.5 points)
FINAL_EVAL = {"cpu-mini": FinalEval(n=100, n_pgd=2000), "paper": FinalEval(n=None)}
SMOKE_EVAL = FinalEval(n=8, steps=2)


@dataclass(frozen=True)
class PlannedRun:
    role: str
    configs: tuple[Path, ...]  # YAML files merged in order: a preset, or a protocol and a method file
    overrides: tuple[str, ...]
    run_dir: Path
    seed: int = 0

    @property
    def name(self) -> str:
        """The run's name: its role, with ``-seed<k>`` for the seeds after the first."""
        return self.run_dir.name

    def command(self, nproc: int | None = None) -> list[str]:
        """The ``sparta train`` arguments of this run (the config paths as the user would type them)."""
        return ["train", *_nproc_args(nproc), *map(str, self.configs), *self.overrides]


def _nproc_args(nproc: int | None) -> list[str]:
    return ["--nproc", str(nproc)] if nproc and nproc > 1 else []


def plan(profile: str, dataset: str, data_root: str | Path, out: str | Path, *, seeds: int = 1, smoke: bool = False,
         only: list[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> list[PlannedRun]:
    """The runs of ``profile``, ``seeds`` of each: preset + the role's change + profile overrides (+ ``SMOKE``)
    + the caller's ``overrides``. Seed k > 0 of a role runs in ``runs/<role>-seed<k>``, so that a call
    with more seeds keeps the runs of an earlier one."""
    if seeds < 1:
        raise SpartaError(f"--seeds must be >= 1, got {seeds}")
    if profile not in PROFILES:
        raise SpartaError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    if dataset not in DATASETS:
        raise SpartaError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if profile == "cpu-mini" and dataset != "cifar10":
        raise SpartaError("the cpu-mini profile is defined on cifar10 only; use --dataset cifar10 (or --profile paper)")
    roles = list(ROLES)
    if only:
        unknown = [r for r in only if r not in ROLES]
        if unknown:
            raise SpartaError(f"--only: unknown run {', '.join(unknown)}; valid: {', '.join(ROLES)}")
        roles = [r for r in roles if r in only]
    runs = []
    for role in roles:
        for seed in range(seeds):
            name = role if seed == 0 else f"{role}-seed{seed}"
            run_dir = Path(out) / "runs" / name
            args = [f"data.root={data_root}", f"name={name}", f"out_dir={run_dir}",
                    *([f"seed={seed}"] if seeds > 1 else []), *ROLE_OVERRIDES.get(role, [])]
            if profile == "cpu-mini":
                args += CPU_MINI + CPU_MINI_ROLE.get(role, [])
            else:
                args += PAPER_ROLE.get(role, [])
            configs = (PRESETS / f"{dataset}_{ROLES[role]}.yaml",)
            if smoke:
                args += SMOKE + smoke_settings(configs)
            runs.append(PlannedRun(role, configs, (*args, *overrides), run_dir, seed))
    return runs


# settings a kept or resumed run may differ in from the plan: they do not change what it computes
# (out_dir: a run folder moved or copied since it was trained, e.g. into a committed results folder;
# a resumed run writes where it lies, not to its saved out_dir)
MAY_DIFFER = ("data.root", "progress", "out_dir")


def check_existing(run: PlannedRun, wanted: Any) -> None:
    """A run directory left by an earlier call must hold the run this plan asks for (``wanted``: its Config)."""
    from .experiment import changed_keys  # noqa: PLC0415 (CLI start-up: imports torch; sparta.cli imports this module)

    if not (run.run_dir / "config.yaml").is_file():
        return
    saved = load_config(run.run_dir / "config.yaml", saved=True)
    changed = [k for k in changed_keys(saved.to_dict(), wanted.to_dict()) if k not in MAY_DIFFER]
    if changed:
        raise SpartaError(f"{run.run_dir} holds a {run.name} run with other settings ({', '.join(changed)}); "
                          "give another --out, or delete that folder to train it again")


@contextlib.contextmanager
def exclusive(out: Path, command: str = "reproduce") -> Iterator[None]:
    """Hold ``out/.lock`` (an flock, released when the process ends however it ends): two calls
    writing one folder would train the same runs twice and tear each other's checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpartaError(f"another sparta {command} is writing {out}; wait for it, "
                              "or give another --out") from None
        yield


def train_run(run: PlannedRun, *, nproc: int | None, log: Callable[[str], None], threads: int | None = None,
              tag: bool = False) -> None:
    """Train ``run`` with ``sparta train`` in a child process, or resume it, or keep it if finished.

    ``threads``: the child's torch threads (``OMP_NUM_THREADS``; None: torch's default). ``tag``: its
    output goes through ``log``, each line prefixed with ``[run name]`` (runs trained side by side)."""
    if (run.run_dir / "summary.json").is_file():
        log(f"== {run.name}: finished earlier, kept ({run.run_dir})")
        return
    args, what = train_args(run, nproc)
    log(f"== {run.name}: {what}")
    code = _child([sys.executable, "-m", "sparta", *args], threads, run.name if tag else None, log)
    if code != 0:
        raise SpartaError(f"run {run.name} stopped with exit code {code} (its error is above); "
                          "rerun the same command to resume: finished runs are kept")


def train_args(run: PlannedRun, nproc: int | None) -> tuple[list[str], str]:
    """The ``sparta`` arguments that train ``run`` from where it stands, and what they do in words."""
    rd = run.run_dir
    if (rd / "checkpoints" / "last.pt").is_file():
        return ["train", *_nproc_args(nproc), "--resume", str(rd)], f"resuming {rd}"
    # a folder without a checkpoint holds nothing a rerun would not rewrite
    args = [*run.command(nproc), *(["--overwrite"] if rd.exists() else [])]
    return args, f"sparta {shlex.join(args)}"


def _child(argv: list[str], threads: int | None, tag: str | None, log: Callable[[str], None]) -> int:
    """Run ``argv`` at ``threads`` torch threads; its output goes through ``log`` with each line
    prefixed ``[tag]``, or straight to this process's stdout and stderr when ``tag`` is None."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if tag is None:
        return subprocess.call(argv, env=env)
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
        assert child.stdout is not None  # stdout=PIPE
        for line in child.stdout:
            log(f"[{tag}] {line.rstrip()}")
    return child.returncode


def threads_per_job(jobs: int) -> int | None:
    """Torch threads for each of ``jobs`` runs trained at once: the usable cores shared out (at least 1),
    unless ``OMP_NUM_THREADS`` is set (kept, None) or one run trains at a time (torch's default, None)."""
    if jobs == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs)


def train_runs(planned: list[PlannedRun], *, nproc: int | None, jobs: int, log: Callable[[str], None],
               final: tuple[FinalEval, Path] | None = None) -> None:
    """Train the planned runs in order, ``jobs`` at a time. A run that fails does not stop the others
    (they are hours of work); the failures are reported together at the end. ``final`` (the final
    evaluation and the data root): with ``jobs`` > 1, each run is evaluated right after its training,
    in a child process at the job's threads, while the other jobs train."""
    if jobs == 1:
        for run in planned:
            train_run(run, nproc=nproc, log=log)
        return
    lock = threading.Lock()

    def locked(line: str) -> None:  # one line at a time from the worker threads
        with lock:
            log(line)

    threads = threads_per_job(jobs)
    def job(run: PlannedRun) -> None:
        train_run(run, nproc=nproc, log=locked, threads=threads, tag=True)
        if final is not None:
            evaluate_in_child(run, *final, locked, threads)

    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(job, run) for run in planned]
    errors = {run.name: e for run, f in zip(planned, futures) if (e := f.exception()) is not None}
    for error in errors.values():
        if not isinstance(error, SpartaError):  # a defect, not a run that stopped: its traceback
            raise error
    if errors:
        raise SpartaError(f"run{'s' if len(errors) > 1 else ''} {', '.join(errors)} failed (errors above, each line "
                          "tagged with its run); rerun the same command to resume: finished runs are kept")


def train_and_evaluate(planned: list[PlannedRun], final: FinalEval, data_root: Path, *, nproc: int | None, jobs: int,
                       launcher: Any, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The final evaluation of every planned run, trained here (``jobs`` at a time) or, with a
    ``launcher``, of those its cluster has finished (the launcher submits the others)."""
    if launcher is not None:
        return launcher.run(planned, final, data_root)
    train_runs(planned, nproc=nproc, jobs=jobs, log=log, final=(final, data_root))
    return {run.name: evaluate_final(run.run_dir, final, data_root, log) for run in planned}


def kept_final_eval(run_dir: Path, final: FinalEval) -> dict[str, Any] | None:
    """The run's ``final-eval.json`` when it answers ``final`` (one evaluated at another eps does not)."""
    cache = run_dir / "final-eval.json"
    if not cache.is_file():
        return None
    kept = json.loads(cache.read_text())
    if final.eps is not None and kept.get("eps") != final.eps:
        return None
    # PGD on other images, or without its per-image outcomes (an older version's): evaluated again
    other_images = final.pgd_images is not None and kept.get("n_pgd") != final.pgd_images
    return None if other_images or "pgd_outcomes" not in kept else kept


def evaluate_final(run_dir: Path, final: FinalEval, data_root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """AutoAttack and PGD-``final.steps`` of the run's final model on the same test images (cached in
    ``final-eval.json``)."""
    from .commands.evaluate import evaluate_checkpoint  # noqa: PLC0415 (CLI start-up: imports torch; sparta.cli imports this module)

    last = run_dir / "checkpoints" / "last.pt"
    cache = run_dir / "final-eval.json"
    kept = kept_final_eval(run_dir, final)
    if kept is not None:
        return kept
    log(f"== {run_dir.name}: AutoAttack and PGD-{final.steps} of the final model on "
        f"{_images(final.n)}{'' if final.pgd_images == final.n else f' (PGD on {_images(final.pgd_images)})'}")
    # the PGD reference of the AutoAttack evaluation is PGD-<steps> (eval.restarts 1) on the same images
    at_eps = [] if final.eps is None else [f"eval.eps={final.eps!r}"]
    overrides = [f"eval.steps={final.steps}", "eval.restarts=1", f"data.root={data_root}", *at_eps]
    result = evaluate_checkpoint(last, attack="autoattack", n_examples=final.n, overrides=overrides)
    rows = {r["kind"]: r for r in result["rows"]}
    # PGD on its own images (at least AutoAttack's), with its per-image outcomes
    pgd_result = evaluate_checkpoint(last, attack="pgd", n_examples=final.pgd_images, overrides=overrides)
    pgd = {**pgd_result["rows"][0], "flags": pgd_result["robust_flags"]}
    out = {"autoattack": rows["autoattack"]["robust_acc"], "pgd": pgd["robust_acc"],
           "pgd_on_autoattack_images": result["pgd_robust_acc"], "clean": rows["autoattack"]["clean_acc"],
           "n": rows["autoattack"]["n"], "n_autoattack": rows["autoattack"]["n"], "n_pgd": pgd["n"],
           "pgd_steps": final.steps, "eps": result["eps"],
           "pgd_outcomes": {"n": pgd["n"], "robust": encode(pack(f == "1" for f in pgd["flags"]), pgd["n"])},
           "checks": result["checks"], "warnings": result["warnings"], "written": result["written"]}
    write_text_atomic(cache, dumps(out))
    return out


def _images(n: int | None) -> str:
    return "all test images" if n is None else f"the first {n} test images"


def evaluate_in_child(run: PlannedRun, final: FinalEval, data_root: Path, log: Callable[[str], None],
                      threads: int | None) -> None:
    """``evaluate_final`` of a trained run in a child process (``child_args``): the
    attacks draw from torch's global RNG, re-seeded per evaluation, which evaluations in threads of one
    process would share, so their numbers would depend on the interleaving."""
    if kept_final_eval(run.run_dir, final) is not None:
        return
    argv = child_args(run.run_dir, final, data_root)
    code = _child(argv, threads, run.name, log)
    if code != 0:
        raise SpartaError(f"the final evaluation of run {run.name} stopped with exit code {code} (its error is "
                          "above); rerun the same command: finished runs and evaluations are kept")


def scores(run: Any, n_test: int) -> C.Scores:
    """What the claims read of one run (a ``sparta.report.Run``): its table numbers and the per-image
    outcomes of its best and final test evaluations and of its gap subset (None where it recorded none)."""

    s, recorded = run.stats(), RunDir(run.path).read_outcomes()
    last = run.records[-1]
    stage, final_epoch = last.get("stage", "train"), last["epoch"]
    return C.Scores(s["ra_best"], s["ra_final"], n_test, s["train_robust_acc"], s["gap_subset"],
                    best=O.find(recorded, split="test", epoch=s["best_epoch"], stage=s["best_stage"]),
                    final=O.find(recorded, split="test", epoch=final_epoch, stage=stage),
                    gap=O.find(recorded, split="gap", epoch=final_epoch, stage=stage),
                    train_flops=s["train_flops"], density=s["density"])


def check_claims(runs: dict[str, list[Any]], seeds: dict[str, list[C.Scores]],
                 dataset: str = "cifar10") -> list[C.Claim]:
    """The papers' claims that the present runs allow (``runs``: role -> its ``sparta.report.Run`` per seed;
    ``seeds``: role -> their ``scores``)."""
    out = []
    if "dense" in seeds:
        for quantity in ("overfitting", "gap"):
            out += [C.smaller_than(seeds, role, "dense", quantity, dataset) for role in C.PAPER_SPARSE_ROLES
                    if role in seeds]
        out += [C.comparable_ra_at_fewer_flops(seeds, role, dataset) for role in ("robust_bird", "flying_bird")
                if role in seeds]
    if "flying_bird" in seeds and "flying_bird_plus" in seeds:
        out += [C.smaller_than(seeds, "flying_bird_plus", "flying_bird", q, dataset) for q in ("gap", "overfitting")]
    if "flying_bird_plus" in seeds and "dense" in seeds:
        out.append(C.highest_final_ra(seeds, "flying_bird_plus", dataset))
    if "dense" in seeds and "boosting_ticket" in seeds:
        dense_epoch_flops = statistics.fmean(s.train_flops / run.records[-1]["epoch"]
                                             for s, run in zip(seeds["dense"], runs["dense"]))
        out.append(C.boosting_budgeted(seeds["boosting_ticket"], seeds["dense"],
                                       budget(runs["boosting_ticket"], dense_epoch_flops),
                                       budget(runs["dense"], dense_epoch_flops)))
        if "boosting_control" in seeds:
            out.append(C.boosting_beats_control(seeds["boosting_ticket"], seeds["boosting_control"]))
    return out


def budget(group: list[Any], dense_epoch_flops: float) -> C.Budget:
    """A run's cost in dense-equivalent epochs, mean over its seeds: its last stage's epochs (at the
    dense cost per epoch: no sparse kernels) plus its earlier stages (a boosting finder) as the dense
    epochs their training FLOPs would buy (``dense_epoch_flops``: the dense run's FLOPs per epoch)."""
    epochs, finder = [], []
    for run in group:
        last = run.records[-1].get("stage")
        earlier = [r for r in run.records if r.get("stage") != last]
        epochs.append(float(run.records[-1]["epoch"]))
        finder.append((earlier[-1].get("train_flops") or 0.0) / dense_epoch_flops if earlier else 0.0)
    return C.Budget(statistics.fmean(epochs), statistics.fmean(finder))


def dense_target(runs: dict[str, list[Any]]) -> float:
    """The robustness target of the report's time-to-robustness table: the dense run's final test RA,
    mean over its seeds."""
    return statistics.fmean(run.stats()["ra_final"] for run in runs["dense"])


def sanity_checks(seeds: dict[str, list[C.Scores]], evals: dict[str, dict[str, Any]]) -> list[C.Claim]:
    """Checks of the pipeline, not of the papers: AutoAttack below PGD, FB+'s adaptation at work
    (``seeds``: role -> the ``scores`` of its runs)."""
    out = [C.autoattack_below_pgd(evals)] if evals else []
    if "flying_bird" in seeds and "flying_bird_plus" in seeds:
        out.append(C.fb_plus_sparser_and_cheaper(seeds))
    return out


def check_jobs(jobs: int, nproc: int | None) -> None:
    if jobs < 1:
        raise SpartaError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and nproc and nproc > 1:
        raise SpartaError("--jobs trains several one-process runs side by side and --nproc one run on several "
                          "processes; give one of them")


def reproduce(profile: str, data_root: str | Path, out: str | Path, *, dataset: str = "cifar10", seeds: int = 1,
              nproc: int | None = None, jobs: int = 1, smoke: bool = False, only: list[str] | None = None,
              overrides: list[str] | tuple[str, ...] = (), command: str = "", launcher: Any = None,
              log: Callable[[str], None] = lambda line: None) -> Path | None:
    """Train, evaluate and report ``profile``; returns the path of the report. ``launcher``: a
    ``sparta.launcher.SlurmLauncher`` (None: train here); the report then holds the runs finished so
    far (None: no run has finished)."""
    from .attacks.autoattack import require_autoattack  # noqa: PLC0415 (CLI start-up: imports torch; sparta.cli imports this module)
    from .data import require_release  # noqa: PLC0415 (CLI start-up: imports torch; sparta.cli imports this module)

    data_root, out = Path(data_root), Path(out)
    check_jobs(jobs, nproc)
    require_release(dataset, data_root)
    if out.exists() and not out.is_dir():
        raise SpartaError(f"--out {out} exists and is not a folder")
    planned = plan(profile, dataset, data_root, out, seeds=seeds, smoke=smoke, only=only, overrides=overrides)
    require_autoattack()  # before an hour of training, not after
    configs = [load_config(run.configs, list(run.overrides)) for run in planned]  # all valid before any run
    final = SMOKE_EVAL if smoke else FINAL_EVAL[profile]
    with exclusive(out):
        for run, cfg in zip(planned, configs):  # every earlier run is the one planned, before anything starts
            check_existing(run, cfg)
        evals = train_and_evaluate(planned, final, data_root, nproc=nproc, jobs=jobs, launcher=launcher, log=log)
    planned = [run for run in planned if run.name in evals]
    if not planned:
        return None
    loaded = {run.name: load_run(run.run_dir) for run in planned}
    runs: dict[str, list[Any]] = {}
    for run in planned:
        runs.setdefault(run.role, []).append(loaded[run.name])
    n_test = _test_images(loaded[planned[0].name])
    scored = {role: [scores(run, n_test) for run in group] for role, group in runs.items()}
    found, checks = check_claims(runs, scored, dataset), sanity_checks(scored, evals)
    target = dense_target(runs) if "dense" in runs else None
    written = _dt.datetime.now(_dt.timezone.utc)
    preamble = _preamble(profile, dataset, planned, found, checks, evals, final, n_test, command, written, nproc, seeds)
    # the planned run directories only: runs of an earlier call with more seeds stay out of this report
    report = write_report([run.run_dir for run in planned], out / "report", target_ra=target, preamble=preamble)
    write_text_atomic(out / "claims.json", dumps({
        "profile": profile, "dataset": dataset, "smoke": smoke, "command": command,
        "written_utc": written.isoformat(timespec="seconds"), "machine": _machine(),
        "claims": [c.to_dict() for c in found], "sanity_checks": [c.to_dict() for c in checks], "final_eval": evals,
        "robustness_per_flop": report.per_flop,  # the report's table: one row per config, with its on_front flag
        "seeds": seeds, "runs": {run.name: {"role": run.role, "seed": run.seed,
                                            "command": ["sparta", *run.command(nproc)],
                                            "stats": loaded[run.name].stats()} for run in planned}}))
    return report.path


def _test_images(run: Any) -> int:
    """Test images of the per-epoch evaluation: eval.test_subset, else the whole test set (10,000 images
    in each of the profile datasets)."""
    return int((run.config.get("eval") or {}).get("test_subset") or 10_000)


def _machine() -> str:
    import torch  # noqa: PLC0415 (CLI start-up: imports torch; sparta.cli imports this module)

    from .precision import cpu_name  # noqa: PLC0415 (CLI start-up: imports torch; sparta.cli imports this module)

    cpu = cpu_name()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} logical CPUs{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def _preamble(profile: str, dataset: str, planned: list[PlannedRun], found: list[C.Claim], checks: list[C.Claim],
              evals: dict[str, dict[str, Any]], final: FinalEval, n_test: int, command: str,
              written: _dt.datetime, nproc: int | None, seeds: int) -> str:
    counts = ", ".join(f"{sum(c.verdict == v for c in found)} {v}" for v in C.VERDICTS)
    lines = [f"# Reproduction: profile `{profile}` on {dataset}", "",
             f"- Command: `{command}`" if command else "- Command: (library call)",
             f"- Written {written:%Y-%m-%d %H:%M} UTC on {_machine()} (each run's own date and device are "
             "in its summary.json)",
             f"- Verdicts: {counts} (rules fixed in `sparta/claims.py` before the runs; "
             + ("one seed per run, so a claim that holds is *evidence*, never *reproduced*" if seeds == 1 else
                f"{seeds} seeds per run, differences paired image by image within a seed, then judged over the "
                f"seeds with Student's t at {seeds - 1} degrees of freedom")
             + f"; per-epoch RA on {n_test} test images; docs/reproduce.md gives each rule's verdict rates on "
             "simulated reproductions)", "",
             "## Claims", ""]
    for c in found:
        lines += [f"### {c.claim}: **{c.shown}**", ""] + [f"- {e}" for e in c.evidence] + ["", f"Rule: {c.why}.", ""]
    if "robust_bird_channel" in {r.role for r in planned}:
        lines += ["Robust Bird (channel) is sparta's extension (the papers' released code has no working channel "
                  "mode): it is in the tables below, not in the verdicts.", ""]
    lines += ["## Sanity checks", ""]
    for c in checks:
        status = {C.REPRODUCED: "passed", C.NOT_REPRODUCED: "failed"}.get(c.verdict, c.verdict)
        lines += [f"- {c.claim}: **{status}**. "
                  + "; ".join(c.evidence) + f". Rule: {c.why}.", ""]
    lines += [f"## Final models: AutoAttack and PGD-{final.steps}", "",
              f"AutoAttack standard (pyautoattack) on {_images(final.n)} and PGD-{final.steps} (step 2/255, 1 restart) "
              f"on {_images(final.pgd_images)}, fp32, the final checkpoint of each run; AutoAttack - PGD compares "
              "them on AutoAttack's images.", "",
              "| run | clean % | PGD % | AutoAttack % | AutoAttack - PGD | sanity checks |",
              "| --- | --- | --- | --- | --- | --- |"]
    for role, e in evals.items():
        failed = [ch["name"] for ch in e["checks"] if not ch["passed"]]
        lines.append(f"| {C.label(role)} | {e['clean']:.2f} | {e['pgd']:.2f} | {e['autoattack']:.2f} | "
                     f"{e['autoattack'] - e.get('pgd_on_autoattack_images', e['pgd']):+.2f} | "
                     f"{'failed: ' + ', '.join(failed) if failed else 'all passed'} |")
    lines += ["", "## Runs", "", "Each run is this `sparta train` command (`--resume RUN_DIR` continues one):", ""]
    lines += [f"- {C.LABELS.get(r.role, r.role)}{f' (seed {r.seed})' if seeds > 1 else ''}: "
              f"`sparta {shlex.join(r.command(nproc))}`" for r in planned]
    return "\n".join(lines) + "\n"


def child_args(run_dir: Path, final: FinalEval, data_root: Path) -> list[str]:
    """The ``python -m sparta.commands.final_eval`` command that runs ``evaluate_final`` in a child process
    (its arguments: RUN_DIR DATA_ROOT N|None STEPS EPS|None N_PGD|None, read back there)."""
    return [sys.executable, "-m", "sparta.commands.final_eval", str(run_dir), str(data_root), str(final.n),
            str(final.steps), str(final.eps), str(final.n_pgd)]
