"""The ``sparta`` command (train, eval, export, flops, report, reproduce, grid, demo): parse arguments, call the
library or the command layer (``sparta.commands``), print. Library modules never print and never parse
flags; what they have to say comes back as values (or through a ``log`` callback) and is printed here or
in ``sparta.commands``.

Bad input (a ``SpartaError``) is one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .commands.console import table
from .config import load_config
from .errors import Interrupted, SpartaError
from .grid import DATASETS as GRID_DATASETS
from .grid import METHODS, MODELS, plan_grid, run_grid
from .launcher import STATUS_COLUMNS, SlurmLauncher, dry_run_lines, load_settings, run_status
from .report import write_report
from .reproduce import DATASETS, PROFILES, ROLES, check_jobs, plan, reproduce

T = TypeVar("T")


class ConsoleProgress:
    """A tqdm bar over each epoch's batches on a terminal (``progress: bar``, or ``auto`` on a tty);
    nothing per batch otherwise (``lines``, ``none``: epoch lines come from ``on_epoch``)."""

    def __init__(self, mode: str, stream=sys.stderr):
        self.stream = stream
        self.bar = mode == "bar" or (mode == "auto" and stream.isatty())

    def batches(self, it: Iterator[T], total: int, epoch: int) -> Iterable[T]:
        if not self.bar:
            return it
        from tqdm import tqdm  # noqa: PLC0415 (CLI start-up: tqdm takes ~60 ms to import, only a bar needs it)

        return tqdm(it, total=total, desc=f"epoch {epoch + 1}", unit="batch", file=self.stream, leave=False,
                    dynamic_ncols=True)


def epoch_line(record: dict[str, Any]) -> str:
    def pct(key: str) -> str:
        value = record.get(key)
        return "  -  " if value is None else f"{value:5.1f}"

    return (f"epoch {record['epoch']:>3}  loss {record['train_loss']:.3f}  train_ra {pct('train_robust_acc')}  "
            f"val sa/ra {pct('val_clean_acc')}/{pct('val_robust_acc')}  test sa/ra {pct('test_clean_acc')}/"
            f"{pct('test_robust_acc')}  density {record.get('density', 1.0):.3f}  {record['epoch_time_s']:.1f}s")


def launch_torchrun(nproc: int, child: list[str]) -> int:
    """``sparta train|eval --nproc N ...``: the ``child`` command (``sparta`` arguments, without --nproc)
    as N local processes under torchrun (``torch.distributed.run --standalone``); returns the workers'
    exit code (2 for bad input)."""
    from torch.distributed import run as torchrun  # noqa: PLC0415 (CLI start-up: imports torch)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: PLC0415 (CLI start-up: imports torch)

    if "WORLD_SIZE" in os.environ:
        raise SpartaError("--nproc starts torchrun itself; under torchrun (WORLD_SIZE is set) leave it out")
    # the workers print their own one-line errors; torchrun's failure report would repeat them as a traceback
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.get_args_parser().parse_args(
            ["--standalone", f"--nproc_per_node={nproc}", "--module", "sparta", *child]))
    except ChildFailedError as e:  # rank 0's code (2 for bad input); ranks stopped by torchrun have negative ones
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), 1)
    return 0


def processes(nproc: int | None) -> int:
    """The number of processes ``--nproc`` asks for (1 when not given); below 1 is bad input."""
    if nproc is not None and nproc < 1:
        raise SpartaError(f"--nproc must be >= 1, got {nproc}")
    return nproc or 1


def rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints progress and results."""
    return int(os.environ.get("RANK", "0"))


def cmd_train(args: argparse.Namespace) -> int:
    from .experiment import prepare_resume, train  # noqa: PLC0415 (CLI start-up: imports torch)

    if processes(args.nproc) > 1:
        return launch_torchrun(args.nproc, [
            "train", *([args.config] if args.config else []), *args.overrides,
            *(["--resume", args.resume] if args.resume else []), *(["--overwrite"] if args.overwrite else []),
            *(["--force"] if args.force else [])])
    if args.resume:
        if args.config:  # `sparta train --resume DIR key=value`: the first word is an override
            args.overrides = [args.config, *args.overrides]
        cfg = prepare_resume(args.resume, args.overrides, force=args.force)
    else:
        if not args.config:
            raise SpartaError("sparta train needs a CONFIG file (see configs/) or --resume RUN_DIR")
        configs, overrides = config_files(args.config, args.overrides)
        cfg = load_config(configs, overrides)
    main_rank = rank() == 0
    if main_rank:
        print(f"run directory: {cfg.run_dir}", flush=True)
    summary = train(cfg, resume=bool(args.resume), overwrite=args.overwrite,
                    progress=ConsoleProgress(cfg.progress if main_rank else "none"),
                    on_epoch=lambda r: print(epoch_line(r), flush=True)
                    if cfg.progress != "none" and main_rank else None)
    if main_rank:
        print(table([summary], SUMMARY_COLUMNS))
    return 0


def config_files(first: str, rest: list[str]) -> tuple[list[str], list[str]]:
    """``sparta train a.yaml b.yaml key=value ...``: the YAML files (merged in order) and the overrides."""
    n = 0
    while n < len(rest) and "=" not in rest[n] and rest[n].endswith((".yaml", ".yml")):
        n += 1
    return [first, *rest[:n]], rest[n:]


SUMMARY_COLUMNS = [("name", "run"), ("method", "method"), ("density_final", "density"), ("sa_best", "SA best"),
                   ("ra_best", "RA best"), ("sa_final", "SA final"), ("ra_final", "RA final"),
                   ("robust_overfitting", "RA best-final"), ("wall_time_s", "time s")]


def cmd_eval(args: argparse.Namespace) -> int:
    from .commands.evaluate import evaluate_checkpoint, print_evaluation  # noqa: PLC0415 (CLI start-up: imports torch)

    if processes(args.nproc) > 1:
        return launch_torchrun(args.nproc, [
            "eval", args.checkpoint, *args.overrides, "--attack", args.attack,
            *(["--n-examples", str(args.n_examples)] if args.n_examples is not None else []),
            *(["--eps-list", args.eps_list] if args.eps_list is not None else [])])
    result = evaluate_checkpoint(args.checkpoint, attack=args.attack, overrides=args.overrides,
                                 n_examples=args.n_examples, eps_list=args.eps_list)
    if rank() == 0:  # every rank holds the merged result; rank 0 prints it
        print_evaluation(result, args.attack)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``sparta export``: the export folder's files on stdout, one per line; the card's headline on stderr."""
    from .export import export_checkpoint  # noqa: PLC0415 (CLI start-up: imports torch)

    card = export_checkpoint(args.checkpoint, args.out, fmt=args.format, n_examples=args.n_examples,
                             attack=not args.no_attack, overrides=args.overrides, ap_key=args.ap_key, level=args.level,
                             min_norm=not (args.no_attack or args.no_fmn),
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    pct = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    robust = "  ".join(f"AutoAttack {eps}: {pct(r and r['robust_acc'])}" for eps, r in card["autoattack"].items())
    print(f"{card['model']} ({card['structure']}): sparsity {100 * card['sparsity']['overall']:.2f}%  "
          f"clean: {pct(card['clean_acc'])}  {robust}", file=sys.stderr)
    print(f"benchmark key: {card['submission']['model_key'] or '-'} ({card['submission']['model_key_note']})",
          file=sys.stderr)
    for path in card["written"]:
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import comparison, run_demo  # noqa: PLC0415 (CLI start-up: imports torch)

    rows = run_demo(Path(args.out_dir), epochs=args.epochs, log=lambda line: print(line, flush=True))
    print()
    print(table(rows, SUMMARY_COLUMNS))
    print()
    print(comparison(rows))
    return 0


def add_flops_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sparta flops CONFIG|CHECKPOINT [overrides]``."""
    parser.add_argument("source", help="a YAML config (configs/...) or a checkpoint (.pt)")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides, e.g. attack.steps=7 method.density=0.1 (applied to a checkpoint's "
                             "config too)")


def cmd_flops(args: argparse.Namespace) -> int:
    """``sparta flops``: print the per-layer table, inference and training FLOPs; returns 0."""
    from .commands.flops import print_flops  # noqa: PLC0415 (CLI start-up: imports torch)

    print_flops(args.source, list(getattr(args, "overrides", []) or []))
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sparta report RUN_DIR... --out DIR [--target-ra X]``."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories, or folders holding run directories")
    parser.add_argument("--out", required=True, metavar="DIR", help="where report.md and plots/ are written")
    parser.add_argument("--target-ra", type=float, default=None, metavar="X",
                        help="add a 'time to test RA >= X%%' table (default: the dense run's final RA when "
                             "exactly one dense config is present)")


def cmd_report(args: argparse.Namespace) -> int:
    """``sparta report``: write the report; its notes (skipped plots, skipped runs) on stderr, its path on stdout."""
    report = write_report(args.run_dirs, args.out, target_ra=args.target_ra)
    for note in report.notes:
        print(note, file=sys.stderr)
    print(report.path)
    return 0


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sparta reproduce --profile P --data-root DIR [overrides]``."""
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides applied to every run after the profile's, e.g. device=cuda")
    parser.add_argument("--profile", required=True, choices=PROFILES,
                        help="cpu-mini: the scaled-down CIFAR-10 protocol (~20 min a seed with --jobs 2 on 2 CPU "
                             "cores with bf16); paper: the papers' full protocols (GPUs)")
    parser.add_argument("--data-root", required=True, metavar="DIR",
                        help="folder with the dataset's official files (cifar-10-batches-py/, cifar-100-python/ "
                             "or tiny-imagenet-200/)")
    parser.add_argument("--dataset", default="cifar10", choices=DATASETS)
    parser.add_argument("--out", default=None, metavar="DIR", help="default: results/<profile>-<dataset>")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="train every run with seeds 0..N-1 (seed k > 0 in runs/<run>-seed<k>; runs kept from a "
                             "call with fewer seeds are reused); the claims use the mean and the seed spread")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="train each run with N local processes (torchrun, DistributedDataParallel)")
    parser.add_argument("--only", default=None, metavar="RUN,RUN",
                        help=f"a subset of the runs: {','.join(ROLES)}")
    parser.add_argument("--smoke", action="store_true",
                        help="one epoch on a few images per run: checks the whole pipeline, measures nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the runs' commands (and the submission) and stop")
    add_launcher_arguments(parser)


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the runs of ``reproduce`` and ``grid`` train: here (``--jobs`` at once) or as a Slurm job array."""
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="runs at once. local: N runs side by side, each on its share of the cores "
                             "(OMP_NUM_THREADS, unless set; default 1); slurm: at most N array tasks running "
                             "(default: all)")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="local: train here; slurm: one Slurm array task per run, through submitit "
                             "(pip install 'sparta[cluster]'), requeued on preemption and time limits")
    parser.add_argument("--launcher-config", default=None, metavar="YAML",
                        help="a file with a 'launcher:' section: partition, account, qos, time_min, gpus_per_run, "
                             "cpus_per_task, mem_gb, signal_delay_s, max_timeouts, setup (flags win over it)")
    for flag, kind, what in (("--partition", str, "Slurm partition"), ("--account", str, "Slurm account"),
                             ("--time-min", int, "time limit of each task in minutes (default 1440; a longer run "
                                                 "is requeued at the limit and resumes)"),
                             ("--gpus-per-run", int, "GPUs of each task (default 1); N > 1 trains the run with "
                                                     "torchrun on N processes inside the task"),
                             ("--cpus-per-task", int, "CPUs of each task (default 8)"),
                             ("--mem-gb", int, "memory of each task in GB (default 32)")):
        parser.add_argument(flag, type=kind, default=None, metavar="N" if kind is int else "NAME",
                            help=f"with --launcher slurm: {what}")
    parser.add_argument("--wait", action="store_true",
                        help="with --launcher slurm: wait for the array, then report (without it: print the job "
                             "id; the same command later reports what has finished)")
    parser.add_argument("--status", action="store_true",
                        help="print the state of each run (done, running, pending, failed with its error) and stop")


def make_launcher(args: argparse.Namespace, out: str) -> Any:
    """The ``SlurmLauncher`` the arguments ask for (None: the local launcher); bad combinations refused."""
    slurm_only = {"--launcher-config": args.launcher_config, "--partition": args.partition,
                  "--account": args.account, "--time-min": args.time_min, "--gpus-per-run": args.gpus_per_run,
                  "--cpus-per-task": args.cpus_per_task, "--mem-gb": args.mem_gb, "--wait": args.wait or None}
    check_jobs(1 if args.jobs is None else args.jobs, args.nproc if args.launcher == "local" else None)
    if args.launcher == "local":
        given = [flag for flag, value in slurm_only.items() if value is not None]
        if given:
            raise SpartaError(f"{', '.join(given)}: only with --launcher slurm (locally, --nproc N trains a run "
                              "on N processes and --jobs N runs at once)")
        return None
    if args.nproc is not None:
        raise SpartaError("--nproc is the local launcher's; with --launcher slurm give --gpus-per-run N")
    settings = load_settings(args.launcher_config, partition=args.partition, account=args.account,
                             time_min=args.time_min, gpus_per_run=args.gpus_per_run,
                             cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb)
    return SlurmLauncher(settings, Path(out), wait=args.wait, parallelism=args.jobs,
                         log=lambda line: print(line, flush=True))


def launch(args: argparse.Namespace, out: str, planned: list, run: Any) -> int:
    """The shared end of ``reproduce`` and ``grid``: ``--status``, ``--dry-run`` (the commands, and the
    submission), or ``run(launcher, nproc, jobs)`` (the report's path or None) with what the launcher
    has to say."""
    launcher = make_launcher(args, out)
    nproc = launcher.nproc if launcher else args.nproc
    if args.status:
        print(table(run_status(planned, Path(out), cluster=launcher.settings.cluster if launcher else None),
                    STATUS_COLUMNS))
        return 0
    if args.dry_run:
        if launcher:
            print("\n".join(dry_run_lines(launcher.settings, Path(out), len(planned), args.jobs)))
        for run in planned:
            print("sparta " + " ".join(run.command(nproc)))
        return 0
    path = run(launcher, nproc, 1 if launcher else args.jobs or 1)  # a launcher runs its tasks itself
    if launcher:
        print(table(launcher.rows, STATUS_COLUMNS))
    if path is not None:
        print(path)
    if launcher:
        failed = [row for row in launcher.rows if row["state"] == "failed"]
        if failed:
            raise SpartaError("; ".join(f"run {row['run']} failed: {row['error']}" for row in failed)
                              + " (the same command submits them again)")
        if any(row["state"] != "done" for row in launcher.rows):
            print(f"not finished yet: the same command{' without --wait' if args.wait else ''} reports what has "
                  "finished; --status shows each run", file=sys.stderr)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """``sparta reproduce``: train, evaluate and report; progress lines on stdout, then the report's path."""
    processes(args.nproc)
    out = args.out or f"results/{args.profile}-{args.dataset}" + ("-smoke" if args.smoke else "")
    only = [r.strip() for r in args.only.split(",") if r.strip()] if args.only else None
    command = "sparta " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] else ""
    planned = plan(args.profile, args.dataset, args.data_root, out, seeds=args.seeds, smoke=args.smoke, only=only,
                   overrides=args.overrides)
    return launch(args, out, planned, lambda launcher, nproc, jobs: reproduce(
        args.profile, args.data_root, out, dataset=args.dataset, seeds=args.seeds, nproc=nproc, jobs=jobs,
        smoke=args.smoke, only=only, overrides=args.overrides, command=command, launcher=launcher,
        log=lambda line: print(line, flush=True)))


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sparta grid --dataset D --model M --data-root DIR [overrides]``."""
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run, e.g. device=cuda")
    parser.add_argument("--dataset", required=True, choices=list(GRID_DATASETS))
    parser.add_argument("--model", default="resnet18", choices=list(MODELS),
                        help="the benchmark's base_resnet18 / base_vgg16 (HYDRA's VGG-16), or the Flying Bird paper's "
                             "PreActResNet-18 (default: resnet18)")
    parser.add_argument("--data-root", required=True, metavar="DIR",
                        help="folder with the dataset's official files (cifar-10-batches-py/ or train_32x32.mat)")
    parser.add_argument("--methods", default=None, metavar="M,M", help=f"a subset of {','.join(METHODS)}")
    parser.add_argument("--sparsities", default=None, metavar="S,S",
                        help="fractions removed, for every method (default: 0.8,0.9,0.95,0.99 unstructured, "
                             "0.5,0.75,0.9 channels)")
    parser.add_argument("--final-n", type=int, default=None, metavar="N",
                        help="AutoAttack and PGD-20 of each final model on the first N test images (default: all)")
    parser.add_argument("--out", default=None, metavar="DIR", help="default: results/grid-<dataset>-<model>")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="train each run with N local processes (torchrun, DistributedDataParallel)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs' commands (and the submission) and stop")
    parser.add_argument("--smoke", action="store_true",
                        help="one epoch of each stage on a few images per run: checks the pipeline, measures nothing")
    add_launcher_arguments(parser)


def cmd_grid(args: argparse.Namespace) -> int:
    """``sparta grid``: one (dataset, model) cell of the adversarial pruning benchmark's grid."""
    def split(text: str | None) -> list[str] | None:
        return [w.strip() for w in text.split(",") if w.strip()] if text else None

    try:
        sparsities = [float(s) for s in split(args.sparsities) or []] or None
    except ValueError:
        raise SpartaError(f"--sparsities must be numbers such as 0.9,0.95; got {args.sparsities}") from None
    if args.final_n is not None and args.final_n < 1:
        raise SpartaError(f"--final-n must be >= 1, got {args.final_n}")
    processes(args.nproc)
    out = args.out or f"results/grid-{args.dataset}-{args.model}" + ("-smoke" if args.smoke else "")
    kw = dict(methods=split(args.methods), sparsities=sparsities, smoke=args.smoke, overrides=args.overrides)
    return launch(args, out, plan_grid(args.dataset, args.model, args.data_root, out, **kw),
                  lambda launcher, nproc, jobs: run_grid(args.dataset, args.model, args.data_root, out,
                                                         final_n=args.final_n, nproc=nproc, jobs=jobs,
                                                         launcher=launcher, log=lambda line: print(line, flush=True),
                                                         **kw))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other bad input), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sparta", description="Sparse adversarial training in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config (plus key=value overrides)")
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/mnist_pgd.yaml; more YAML files may "
                                             "follow (merged in order, e.g. configs/cifar10_pgd.yaml "
                                             "configs/methods/hydra.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 attack.eps=8/255")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--force", action="store_true", help="with --resume: accept overrides that change the config")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train with N local processes (DistributedDataParallel) by launching torchrun; "
                        "batch_size stays the global batch")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="clean and robust accuracy of a checkpoint on the test set")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*",
                   help="overrides of the checkpoint's config, e.g. eval.steps=50 data.root=DIR")
    p.add_argument("--attack", choices=["pgd", "cw", "autoattack", "sweep", "fmn"], default="pgd",
                   help="pgd: PGD-k with restarts (eval.*); cw: PGD on the CW margin; autoattack: AutoAttack standard "
                        "(pip install 'sparta[autoattack]'); sweep: PGD over --eps-list and over steps; fmn: each "
                        "image's minimal L∞ distance (tuned FMN of secml-torch, eval.fmn.*) and a security curve")
    p.add_argument("--n-examples", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--eps-list", default=None, metavar="EPS,EPS,...",
                   help="with --attack sweep: budgets, fractions allowed (default 0,2/255,4/255,8/255,16/255; "
                        "0 and the config's eps are always added)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="attack with N local processes (torchrun): each takes a contiguous run of whole chunks of "
                        "eval.batch_size test images; counts are merged exactly")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="a checkpoint as a plain state_dict with standard layer names, its standalone "
                                      "architecture and a result card (clean + AutoAttack accuracy, sparsity, cost)")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", help="overrides of the checkpoint's config, e.g. data.root=DIR device=cuda")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for model.pt, architecture.py/.json, card.json/.md, submission.json "
                        "and the FMN distances")
    p.add_argument("--format", choices=["benchmark"], default="benchmark",
                   help="benchmark: the adversarial pruning benchmark's base-model names (resnet18, vgg16_bn_hydra), "
                        "the Flying Bird entry's PreActResNet-18, kuangliu's VGG-16 (docs/export.md)")
    p.add_argument("--n-examples", type=int, default=None, metavar="N",
                   help="measure the card's accuracies on the first N test images (default: all; recorded in the card)")
    p.add_argument("--no-attack", action="store_true",
                   help="write the card without clean/AutoAttack accuracy (those fields null, with the reason)")
    p.add_argument("--no-fmn", action="store_true",
                   help="leave out the FMN distances (the submission's HO-FMN part; CPU only, slow on full test sets)")
    p.add_argument("--ap-key", default=None, metavar="NAME_REF",
                   help="the method's taxonomy key in the benchmark, e.g. HYDRA_Sehwag2020Hydra "
                        "(default: <Method>_sparta)")
    p.add_argument("--level", type=int, default=None, metavar="PERCENT",
                   help="the benchmark sparsity level for the model key (default: the measured sparsity, rounded)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("flops", help="inference and training FLOPs of a config or checkpoint (densities included)")
    add_flops_arguments(p)
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("report", help="markdown tables and PNG plots from run directories")
    add_report_arguments(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("reproduce", help="train every method of the papers under one protocol, evaluate them with "
                                         "AutoAttack and PGD-20, and report which claims reproduce")
    add_reproduce_arguments(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("grid", help="the adversarial pruning benchmark's sparsity grid for one dataset and model: "
                                    "train, evaluate with AutoAttack, report robustness against training FLOPs")
    add_grid_arguments(p)
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("demo", help="train dense and sparse models on the embedded 8x8 digits and compare")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`sparta eval CKPT --attack cw eval.steps=50`)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    where = f" (rank {rank()})" if rank() else ""
    warnings.showwarning = lambda message, category, *rest, **kw: None if where else print(
        f"warning: {message}", file=sys.stderr)
    clean = False  # bad input and stop signals end every rank at the same point; a bug may not
    try:
        code, clean = args.func(args), True
        return code
    except Interrupted as e:  # a stop signal: checkpoint saved, resumable; the shell's 128 + signal code
        print(f"{e}", file=sys.stderr)
        clean = True
        return 128 + e.signum
    except SpartaError as e:
        clean = True
        if where:  # rank > 0: rank 0 reports the error; this rank speaks only if the error is its own
            await_rank0_report()
        # one write, so ranks sharing the pipe under PYTHONUNBUFFERED cannot splice their lines together
        sys.stderr.write(f"error{where}: {e}\n")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:  # after printing: torchrun stops the other workers as soon as one has exited
        leave_process_group(clean=clean)


# how long a rank > 0 that met bad input waits for rank 0 to report it (rank 0 meets the same checks
# within a second or two; its exit makes torchrun stop this rank before it prints)
RANK0_REPORT_WAIT_S = 60.0


def await_rank0_report() -> None:
    """Under torchrun, after bad input on a rank > 0: leave the process group together with rank 0 (a
    no-op before it was joined), then wait for torchrun to stop this process once rank 0 has printed the
    error and exited. Bad input is met on every rank alike, so the user reads it once, from rank 0;
    only an error rank 0 never met (a file missing on this node) is printed by this rank, after the wait."""
    leave_process_group(clean=True)
    time.sleep(RANK0_REPORT_WAIT_S)


def leave_process_group(*, clean: bool) -> None:
    """Under torchrun: leave together after a clean end (waiting for the other ranks), at once otherwise."""
    if "torch.distributed" in sys.modules:  # never imports torch for commands that did not
        from .distributed import shutdown  # noqa: PLC0415 (CLI start-up: torch only where the command loaded it)

        shutdown(clean=clean)


if __name__ == "__main__":
    sys.exit(main())
