"""``sparta grid``: the sparsity grid of the adversarial pruning benchmark as sparta runs, with their
training cost.

Piras et al. 2024 ("Adversarial Pruning: A Survey and Benchmark of Pruning Methods for Adversarial
Robustness") rank clean and AutoAttack accuracy (eps 0.031) of ResNet-18 and VGG-16 on CIFAR-10 and
SVHN at 90/95/99% unstructured and 50/75/90% structured sparsity; the benchmark trains nothing and
tracks no cost. Its base models are kuangliu's post-activation ResNet-18 (sparta's ``resnet18``) and
HYDRA's VGG-16-BN (``vgg16_bn_hydra``); ``--model resnet18|vgg16`` trains those, ``preact_resnet18``
the Flying Bird paper's network. Here each grid point is one ``sparta train`` run: the dataset's dense
protocol (``<dataset>_pgd.yaml``: PGD-10 training, 200 epochs) plus one method file of
``configs/methods/`` at one sparsity, then the final model is evaluated with AutoAttack and PGD-20 at
the benchmark's eps 0.031 on the same test images and exported as a submission folder
(``submissions/<run>/``, see ``sparta export``); ``leaderboard.md`` is the cell in the benchmark's
leaderboard format (clean/AutoAttack per sparsity) plus sparta's training FLOPs and wall time, and
``sparta report`` shows robust accuracy against training FLOPs (every stage counted, pretraining
included).

Differences from the papers' own protocols, on purpose: every method trains under the same dataset
protocol, so the boosting ticket is retrained on the full schedule (its paper's shortened schedule
is a claim of its own, ``sparta reproduce``), and 80% sparsity (the Flying Bird paper's density 0.2)
is added to the benchmark's unstructured levels. The benchmark's structured levels count weights, as
its unstructured ones do (HARP, its structured reference, sets a target share of the parameters):
structured sparsity ``s`` means that a share ``s`` of the conv + linear weights is gone. Channel Robust
Bird runs with ``method.density = 1 - s`` and ``method.channel_budget = weights``: its early-bird
search compares channel masks at ``sqrt(1 - s)`` of the channels (about ``1 - s`` of the weights when
every layer loses the same share), and the ticket keeps as many of the highest-|gamma| channels as
leave the share of the weights closest to ``1 - s``; ``leaderboard.md`` and each submission give the
measured share beside the level.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import load_config, smoke_settings
from .errors import SpartaError
from .fmt import eps as format_eps
from .method_config import SparseConfig, method_as
from .report import load_run, write_report
from .reproduce import PRESETS, SMOKE, SMOKE_EVAL, FinalEval, PlannedRun, check_existing, exclusive, train_and_evaluate
from .rundir import dumps, write_text_atomic

UNSTRUCTURED_METHODS = ("magnitude", "hydra", "flying_bird", "flying_bird_plus", "robust_bird", "boosting_ticket")
CHANNEL_METHODS = ("robust_bird_channel",)
METHODS = UNSTRUCTURED_METHODS + CHANNEL_METHODS
UNSTRUCTURED_SPARSITIES = (0.8, 0.9, 0.95, 0.99)  # the benchmark's 90/95/99% and the Flying Bird paper's 80%
CHANNEL_SPARSITIES = (0.5, 0.75, 0.9)
# --model -> sparta model: the benchmark's base models, and the Flying Bird paper's network
MODELS = {"resnet18": "resnet18", "vgg16": "vgg16_bn_hydra", "preact_resnet18": "preact_resnet18"}
# the FMN distances of each submission, shrunk for --smoke (sparta.attacks.fmn; defaults: the benchmark's)
FMN_SMOKE = ["eval.fmn.trials=2", "eval.fmn.tune_steps=5", "eval.fmn.tune_batch=8", "eval.fmn.steps=10"]
BENCHMARK_EPS = 0.031  # the benchmark's AutoAttack budget (8/255 = 0.0314 elsewhere in sparta)
DATASETS = ("cifar10", "svhn")  # the benchmark's datasets (what a data root must hold: sparta.data)


def sparsity_settings(method: str, sparsity: float) -> list[str]:
    """The overrides that set ``method`` to ``sparsity``, a share of the conv + linear weights removed:
    the kept share as ``method.density``, which channel tickets meet by the number of channels they
    keep (``channel_budget: weights``; module docstring)."""
    if not 0 < sparsity < 1:
        raise SpartaError(f"sparsity must be in (0, 1), got {sparsity:g}")
    density = f"method.density={round(1 - sparsity, 6):g}"
    return [density, "method.channel_budget=weights"] if method in CHANNEL_METHODS else [density]


def run_name(method: str, sparsity: float) -> str:
    return f"{method}-s{round(sparsity * 100, 2):g}"


def plan_grid(dataset: str, model: str, data_root: str | Path, out: str | Path, *, methods: list[str] | None = None,
              sparsities: list[float] | None = None, smoke: bool = False,
              overrides: list[str] | tuple[str, ...] = ()) -> list[PlannedRun]:
    """The runs of one (dataset, model) cell of the grid: every method at each of its sparsities
    (``sparsities`` given: those, for every method)."""
    if dataset not in DATASETS:
        raise SpartaError(f"unknown grid dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if model not in MODELS:
        raise SpartaError(f"unknown grid model {model!r}; valid: {', '.join(MODELS)}")
    network = MODELS[model]
    unknown = [m for m in methods or [] if m not in METHODS]
    if unknown:
        raise SpartaError(f"--methods: unknown method {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    runs = []
    for method in methods or METHODS:
        levels = sparsities or (CHANNEL_SPARSITIES if method in CHANNEL_METHODS else UNSTRUCTURED_SPARSITIES)
        for s in levels:
            name = run_name(method, s)
            run_dir = Path(out) / "runs" / name
            configs = (PRESETS / f"{dataset}_pgd.yaml", PRESETS / "methods" / f"{method}.yaml")
            # (the boosting finder's VGG lr, 0.01, is the method's own default for a VGG model)
            args = [f"data.root={data_root}", f"name={name}", f"out_dir={run_dir}", f"model.name={network}",
                    *sparsity_settings(method, s), *(SMOKE + smoke_settings(configs) if smoke else [])]
            runs.append(PlannedRun(method, configs, (*args, *overrides), run_dir))
    return runs


def run_grid(dataset: str, model: str, data_root: str | Path, out: str | Path, *, methods: list[str] | None = None,
             sparsities: list[float] | None = None, final_n: int | None = None, nproc: int | None = None,
             smoke: bool = False, overrides: list[str] | tuple[str, ...] = (), jobs: int = 1, launcher: Any = None,
             log: Callable[[str], None] = lambda line: None) -> Path | None:
    """Train (or resume, or keep) every run of the cell, evaluate each final model with AutoAttack and
    PGD-20 on the first ``final_n`` test images (None: all), write ``OUT/grid.json`` and the report;
    returns the report's path. ``jobs`` runs train at once; ``launcher``: as in ``reproduce.reproduce``
    (the report of the runs finished so far; None when none has)."""
    from .attacks.autoattack import require_autoattack  # noqa: PLC0415 (CLI start-up: imports torch; sparta.cli imports this module)
    from .data import require_release  # noqa: PLC0415 (CLI start-up: imports torch; sparta.cli imports this module)
    from .export import export_checkpoint  # noqa: PLC0415 (CLI start-up: imports torch; sparta.cli imports this module)

    data_root, out = Path(data_root), Path(out)
    planned = plan_grid(dataset, model, data_root, out, methods=methods, sparsities=sparsities, smoke=smoke,
                        overrides=overrides)
    require_release(dataset, data_root)
    if out.exists() and not out.is_dir():
        raise SpartaError(f"--out {out} exists and is not a folder")
    require_autoattack()
    configs = [load_config(run.configs, list(run.overrides)) for run in planned]  # all valid before any run
    final = replace(SMOKE_EVAL if smoke else FinalEval(n=final_n), eps=BENCHMARK_EPS)
    with exclusive(out, "grid"):
        for run, cfg in zip(planned, configs):
            check_existing(run, cfg)
        evals = train_and_evaluate(planned, final, data_root, nproc=nproc, jobs=jobs, launcher=launcher, log=log)
    planned, configs = [r for r in planned if r.name in evals], [c for r, c in zip(planned, configs) if r.name in evals]
    if not planned:
        return None
    rows: list[dict[str, Any]] = []
    for run, cfg in zip(planned, configs):
        summary = load_run(run.run_dir).summary or {}
        level = round(1 - method_as(cfg, SparseConfig).density, 6)  # the planned share (sparsity_settings)
        ev = evals[run.name]
        card = export_checkpoint(run.run_dir / "checkpoints" / "last.pt", out / "submissions" / run.name, attack=False,
                                 level=round(100 * level), autoattack=ev, min_norm=True, n_examples=final.n,
                                 overrides=[f"data.root={data_root}", *(FMN_SMOKE if smoke else [])], log=log)
        rows.append({"run": run.name, "method": run.role, "sparsity": level,
                     "weights_pruned": round(card["sparsity"]["overall"], 6),
                     "model_key": card["submission"]["model_key"],
                     "density_final": summary.get("density_final"), "train_flops": summary.get("train_flops"),
                     "wall_time_s": summary.get("wall_time_s"), "clean": ev["clean"], "autoattack": ev["autoattack"],
                     "pgd": ev["pgd"], "eps": ev.get("eps"), "n": ev["n"],
                     "fmn_robust_acc": card["submission"]["hofmn"]["robust_acc_at"].get(format_eps(BENCHMARK_EPS)),
                     "command": ["sparta", *run.command(nproc)]})
    report = write_report([run.run_dir for run in planned], out / "report")
    write_text_atomic(out / "leaderboard.md", leaderboard(dataset, model, rows))
    write_text_atomic(out / "grid.json", dumps({"dataset": dataset, "model": model, "network": MODELS[model],
                                                "smoke": smoke, "runs": rows,
                                                "robustness_per_flop": report.per_flop}))  # with on_front flags
    return report.path


def leaderboard(dataset: str, model: str, rows: list[dict[str, Any]]) -> str:
    """The cell in the benchmark's leaderboard format (``clean/AutoAttack`` per method and sparsity,
    unstructured and structured apart), then sparta's cost columns, which the benchmark lacks."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    arch = {"resnet18": "ResNet18", "vgg16": "VGG16", "preact_resnet18": "PreActResNet18"}[model]
    lines = [f"# {dataset} {arch}: clean / AutoAttack accuracy (%)", ""]
    for title, methods in (("US pruning", UNSTRUCTURED_METHODS), ("S pruning", CHANNEL_METHODS)):
        mine = [r for r in rows if r["method"] in methods]
        if not mine:
            continue
        levels = sorted({r["sparsity"] for r in mine})
        lines += [f"## {dataset} {title}", "", "| Name | " + " | ".join(f"{arch} {100 * s:g}%" for s in levels) + " |",
                  "|---" * (len(levels) + 1) + "|"]
        for method in dict.fromkeys(r["method"] for r in mine):
            cells = {r["sparsity"]: f"{fmt(r['clean'])}/{fmt(r['autoattack'])}" for r in mine if r["method"] == method}
            lines.append(f"| {method} | " + " | ".join(cells.get(s, "-") for s in levels) + " |")
        lines.append("")
    eps = {r["eps"] for r in rows} - {None}
    lines += [f"AutoAttack (standard, Linf) at eps {', '.join(f'{e:g}' for e in sorted(eps)) or '?'} on the first "
              f"{', '.join(str(n) for n in sorted({r['n'] for r in rows}))} test images.", "",
              "## Cost (sparta)", "", "| run | model key | weights pruned (%) | FMN robust (%) | training FLOPs | "
              "wall time (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        flops = "-" if r["train_flops"] is None else f"{r['train_flops']:.3e}"
        wall = "-" if r["wall_time_s"] is None else f"{r['wall_time_s']:.0f}"
        lines.append(f"| {r['run']} | {r['model_key'] or '-'} | {100 * r['weights_pruned']:.2f} | "
                     f"{fmt(r.get('fmn_robust_acc'))} | {flops} | {wall} |")
    return "\n".join(lines) + "\n"
