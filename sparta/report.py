"""``sparta report``: markdown tables and PNG plots from one or many run directories.

Reads only what a run directory promises (README, "The run directory"): ``config.yaml``,
``metrics.jsonl`` and, once the run finished, ``summary.json``. Writes only under ``out``:

::

    out/report.md                          tables (per config: mean ± std over seeds; per run), how measured
    out/plots/<run>/accuracy.png           train RA, val RA, test SA/RA per epoch; best epoch, stages
    out/plots/<run>/density.png            density per epoch with FB+ decisions (sparse runs whose density moves)
    out/plots/ra_vs_wall_time.png          test RA against cumulative wall time, one line per run
    out/plots/ra_vs_train_flops.png        ... against cumulative training FLOPs (when the runs log them)

Runs that share a config up to ``GROUP_IGNORED`` (seed, name, out_dir, ...) form one row of the
per-config table, as in the tables of Chen et al. 2022 ("Sparsity Winning Twice"): RA/SA at the best
epoch (highest *validation* RA) and at the final epoch, their difference, training and inference
FLOPs, the robust generalization gap, density and wall time.

matplotlib is optional (``pip install sparta[report]``): without it the tables are still written and
the report says in one line that the plots were skipped. Library code never prints; ``cli_main`` does.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from .errors import SpartaError

# config keys that do not change what a run computes: runs equal up to these are seeds of one config
GROUP_IGNORED = ("seed", "name", "out_dir", "progress", "data.root")
PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (pip install 'sparta[report]')"
_MAX_SEARCH_DEPTH = 4  # how deep under a parent folder run directories are looked for


# ---------------------------------------------------------------- loading


@dataclass
class Run:
    """One run directory as read from disk. ``summary`` is None while the run has not finished."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    records: list[dict[str, Any]]
    label: str = ""  # unique name within one report (set by ``write_report``)

    @property
    def name(self) -> str:
        return str((self.summary or {}).get("name") or self.config.get("name") or self.path.name)

    @property
    def method(self) -> str:
        m = (self.summary or {}).get("method") or (self.config.get("method") or {}).get("name")
        return str(m or "?")

    @property
    def seed(self) -> Any:
        return (self.summary or {}).get("seed", self.config.get("seed"))

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def stats(self) -> dict[str, Any]:
        """The numbers of the tables: from summary.json, or derived from metrics.jsonl while unfinished."""
        return run_stats(self)


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def load_run(path: str | Path) -> Run:
    """Read a run directory (needs ``config.yaml`` and ``metrics.jsonl``; ``summary.json`` if finished)."""
    from .rundir import RunDir

    path = Path(path)
    if not path.is_dir():
        raise SpartaError(f"{path} is not a run directory: the folder does not exist")
    if not is_run_dir(path):
        missing = [f for f in ("config.yaml", "metrics.jsonl") if not (path / f).is_file()]
        raise SpartaError(f"{path} is not a run directory: it has no {' and no '.join(missing)}")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise SpartaError(f"{path / 'config.yaml'} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise SpartaError(f"{path / 'config.yaml'} does not hold a mapping of config keys")
    records = [r for r in RunDir(path).read_metrics() if isinstance(r, dict)]
    if not records:
        raise SpartaError(f"{path} has no evaluated epoch yet (metrics.jsonl is empty)")
    summary = None
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as e:
            raise SpartaError(f"{path / 'summary.json'} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return Run(path=path, config=config, summary=summary, records=records)


def find_runs(paths: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Run directories named by ``paths``: each path is a run, or a folder holding runs below it.

    Returns (run paths in order, notes). A run found below a parent folder that has a config but no
    evaluated epoch yet is skipped with a note; a path that holds no run at all is a ``SpartaError``.
    """
    found: list[Path] = []
    notes: list[str] = []
    for p in map(Path, paths):
        if is_run_dir(p):
            found.append(p)
            continue
        if not p.is_dir():
            raise SpartaError(f"{p} is not a run directory: the folder does not exist")
        if (p / "config.yaml").is_file():
            raise SpartaError(f"{p} is not a run directory yet: it has config.yaml but no metrics.jsonl")
        below = []
        for root, dirs, files in os.walk(p):
            root_path = Path(root)
            depth = len(root_path.relative_to(p).parts)
            if "config.yaml" in files and root_path != p:
                if "metrics.jsonl" in files:
                    below.append(root_path)
                else:
                    notes.append(f"skipped {root_path}: config.yaml but no metrics.jsonl yet")
                dirs.clear()  # a run's own subfolders (checkpoints, plots) hold no further runs
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < _MAX_SEARCH_DEPTH else []
        if not below:
            raise SpartaError(f"{p} is not a run directory (needs config.yaml and metrics.jsonl) "
                              f"and holds none below it")
        found += sorted(below)
    unique, seen = [], set()
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, notes


# ---------------------------------------------------------------- numbers


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _segments(records: list[dict[str, Any]]) -> list[tuple[str, list[int]]]:
    """Consecutive records of one stage: [(stage name, record indices)], in run order."""
    segments: list[tuple[str, list[int]]] = []
    for i, r in enumerate(records):
        stage = str(r.get("stage") or "train")
        if not segments or segments[-1][0] != stage:
            segments.append((stage, []))
        segments[-1][1].append(i)
    return segments


def stage_axis(records: list[dict[str, Any]], summary: dict[str, Any] | None = None
               ) -> tuple[list[float], list[tuple[float, str]]]:
    """x of each record as the cumulative epoch over all stages, and [(x where a stage starts, name)].

    A stage lasts its ``epochs`` from summary ``stages`` when given (matched by name, in order, so a
    stage that logged no evaluated epoch still takes its place), else its last logged epoch (the last
    epoch of a stage that runs to its end is always evaluated).
    """
    planned = [st for st in ((summary or {}).get("stages") or []) if isinstance(st, dict)]
    xs = [0.0] * len(records)
    starts: list[tuple[float, str]] = []
    offset, p = 0.0, 0
    for stage, idx in _segments(records):
        length = None
        j = next((k for k in range(p, len(planned)) if str(planned[k].get("name")) == stage), None)
        if j is not None:
            for skipped in planned[p:j]:  # finished stages without an evaluated epoch
                starts.append((offset, str(skipped.get("name", "?"))))
                offset += _num(skipped.get("epochs")) or 0.0
            length, p = _num(planned[j].get("epochs")), j + 1
        starts.append((offset, stage))
        last = max((_num(records[i].get("epoch")) or 0.0) for i in idx)
        for i in idx:
            xs[i] = offset + (_num(records[i].get("epoch")) or 0.0)
        offset += max(length or 0.0, last)
    return xs, starts


def cumulative(records: list[dict[str, Any]], key: str) -> list[float | None]:
    """``key`` (e.g. wall_time_s, train_flops) as a run-long cumulative value.

    The run directory logs these cumulative over the whole run already; should a stage restart its
    count (a value at a stage's first record below the previous stage's last), the earlier stages'
    total is added, so earlier stages are always counted.
    """
    out: list[float | None] = [None] * len(records)
    offset, last = 0.0, None
    for _, idx in _segments(records):
        first = True
        for i in idx:
            v = _num(records[i].get(key))
            if v is None:
                continue
            if first and last is not None and v < last - offset:
                offset = last
            first = False
            out[i] = v + offset
            last = out[i]
    return out


def time_to_robustness(records: list[dict[str, Any]], target_ra: float) -> dict[str, Any] | None:
    """Cost at which the run's model first has test RA >= ``target_ra`` (percent), or None if never.

    Only epochs of the last stage count: it trains the model the run produces, while an earlier
    stage's network (a boosting finder's dense FGSM model, a search) is pruned or discarded. Returns
    ``{"wall_time_s", "train_flops", "epoch", "stage"}``: cumulative wall time (training plus
    per-epoch evaluation, as logged) and training FLOPs at that evaluated epoch, *including every
    earlier stage* (ticket search, finder); ``train_flops`` is None when the run does not log it.
    """
    wall = cumulative(records, "wall_time_s")
    flops = cumulative(records, "train_flops")
    for i in _segments(records)[-1][1] if records else []:
        r = records[i]
        ra = _num(r.get("test_robust_acc"))
        if ra is not None and ra >= target_ra:
            return {"wall_time_s": wall[i], "train_flops": flops[i], "epoch": r.get("epoch"),
                    "stage": r.get("stage", "train")}
    return None


def _best_record(records: list[dict[str, Any]], summary: dict[str, Any] | None) -> int:
    """Index of the best epoch: summary's best_epoch (in the last stage, or ``best_stage``), else
    the highest validation RA of the last stage (earliest on ties, as training selects), else final."""
    segments = _segments(records)
    if summary and summary.get("best_epoch") is not None:
        stage = summary.get("best_stage") or segments[-1][0]
        for name, idx in reversed(segments):
            if name == stage:
                for i in idx:
                    if records[i].get("epoch") == summary["best_epoch"]:
                        return i
    idx = segments[-1][1]
    best, best_value = idx[-1], None
    for i in idx:
        v = _num(records[i].get("val_robust_acc"))
        if v is not None and (best_value is None or v > best_value):
            best, best_value = i, v
    return best


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def run_stats(run: Run) -> dict[str, Any]:
    """Table numbers of one run (accuracies in percent; None where not measured)."""
    s = run.summary or {}
    recs = run.records
    best_i = _best_record(recs, run.summary)
    best, final = recs[best_i], recs[-1]
    pick = lambda key, record_key, record: _num(s[key]) if key in s else _num(record.get(record_key))
    out = {
        "ra_best": pick("ra_best", "test_robust_acc", best), "ra_final": pick("ra_final", "test_robust_acc", final),
        "sa_best": pick("sa_best", "test_clean_acc", best), "sa_final": pick("sa_final", "test_clean_acc", final),
        "train_flops": _num(s["train_flops"]) if "train_flops" in s else cumulative(recs, "train_flops")[-1],
        "inference_flops": _num(s.get("inference_flops")),
        "inference_flops_dense": _num(s.get("inference_flops_dense")),
        "train_flops_dense": _num(s.get("train_flops_dense")),
        "robust_gap": _num(s.get("robust_gap")),
        "train_robust_acc": _num(s.get("train_robust_acc")),  # on the gap subset of gap_subset training images
        "gap_subset": s.get("gap_subset"),
        "density": pick("density_final", "density", final),
        "wall_time_s": _num(s["wall_time_s"]) if "wall_time_s" in s else cumulative(recs, "wall_time_s")[-1],
        "best_epoch": s.get("best_epoch", best.get("epoch")),
        "best_stage": s.get("best_stage", best.get("stage", "train")),
        "eb_epoch": s.get("eb_epoch"),
        "best_index": best_i,
    }
    out["ra_diff"] = _num(s.get("robust_overfitting")) if "robust_overfitting" in s else _sub(out["ra_best"], out["ra_final"])
    out["sa_diff"] = _num(s.get("sa_overfitting")) if "sa_overfitting" in s else _sub(out["sa_best"], out["sa_final"])
    if out["density"] is None and run.method == "dense":
        out["density"] = 1.0
    return out


# ---------------------------------------------------------------- grouping


def _without(config: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for dotted in keys:
        node, *parents = config, *dotted.split(".")[:-1]
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(dotted.split(".")[-1], None)
    return config


def config_key(config: dict[str, Any]) -> str:
    """Runs with equal keys differ only in ``GROUP_IGNORED`` (seed, name, out_dir, ...)."""
    return json.dumps(_without(config, GROUP_IGNORED), sort_keys=True, default=str)


def group_runs(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs grouped by config up to ``GROUP_IGNORED``, groups in order of first appearance."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(config_key(run.config), []).append(run)
    return list(groups.values())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, default=str) if isinstance(v, (list, dict)) else v
    return out


def _differences(groups: list[list[Run]], limit: int = 5) -> list[str]:
    """Per group, the config settings that tell it apart from the other groups (``key=value``)."""
    flats = [_flatten(_without(g[0].config, GROUP_IGNORED)) for g in groups]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if len({repr(f.get(k, "<unset>")) for f in flats}) > 1]
    varying.sort(key=lambda k: (not k.startswith("method."), k))  # what the method is first
    out = []
    for f in flats:
        items = [f"{k}={_setting(f.get(k, '-'))}" for k in varying]
        out.append(", ".join(items[:limit]) + (f", … (+{len(items) - limit})" if len(items) > limit else ""))
    return out


def _setting(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def _group_label(group: list[Run]) -> str:
    bases = {re.sub(rf"[-_.]?(seed|s)?{re.escape(str(r.seed))}$", "", r.name) if r.seed is not None else r.name
             for r in group}
    if len(bases) == 1 and next(iter(bases)):
        return next(iter(bases))
    prefix = os.path.commonprefix([r.name for r in group]).rstrip("-_. ")
    return prefix or group[0].method


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def _run_labels(runs: Sequence[Run]) -> list[str]:
    names = [r.name for r in runs]
    labels = [n if names.count(n) == 1 else f"{n}-s{r.seed}" for n, r in zip(names, runs)]
    labels = [lab if labels.count(lab) == 1 else f"{lab}-{r.path.name}" for lab, r in zip(labels, runs)]
    return _unique(labels)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "run"


# ---------------------------------------------------------------- formatting


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: Sequence[float | None], unit_of, group_size: int | None = None) -> str:
    """mean ± sample std of the present values, in the unit ``unit_of(mean) -> (scale, fmt, suffix)``."""
    present = _present(values)
    if not present:
        return "-"
    mean, std = _mean_std(present)
    scale, fmt, suffix = unit_of(mean)
    text = format(mean / scale, fmt) + ("" if std is None else " ± " + format(std / scale, fmt)) + suffix
    if group_size is not None and len(present) < group_size:
        text += f" (n={len(present)})"
    return text


def _pct_unit(_: float):
    return 1.0, ".2f", ""


def _density_unit(_: float):
    return 1.0, ".3f", ""


def _flops_unit(mean: float):
    for exp, prefix in ((18, "E"), (15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k")):
        if abs(mean) >= 10 ** exp:
            return 10.0 ** exp, ".3g", f" {prefix}FLOP"
    return 1.0, ".3g", " FLOP"


def _with_dense_share(text: str, stats: Sequence[dict[str, Any]], key: str) -> str:
    """``text`` + `` (N% of dense)``: the mean of ``key / key_dense`` over the runs that recorded both."""
    ratios = _present(s[key] / s[f"{key}_dense"] if s[key] is not None and s[f"{key}_dense"] else None
                      for s in stats)
    return text + f" ({100 * statistics.fmean(ratios):.0f}% of dense)" if ratios and text != "-" else text


def _time_unit(mean: float):
    if mean >= 2 * 3600:
        return 3600.0, ".2f", " h"
    if mean >= 120:
        return 60.0, ".1f", " min"
    return 1.0, ".1f", " s"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(lines)


def _eps_text(eps: Any) -> str:
    v = _num(eps)
    if v is None:
        return str(eps)
    k = v * 255
    return f"{round(k)}/255" if v > 0 and abs(k - round(k)) < 1e-6 else f"{v:g}"


def describe_protocol(p: dict[str, Any]) -> str:
    """One line for an ``eval_protocol`` dict of summary.json."""
    attack = str(p.get("attack", "?"))
    if attack == "none":
        head = "no attack (clean accuracy only)"
    else:
        name = {"pgd": f"PGD-{p.get('steps', '?')}", "fgsm": "FGSM"}.get(attack, attack)
        norm = {"linf": "L∞", "l2": "L2"}.get(str(p.get("norm")), str(p.get("norm")))
        parts = [norm, f"ε = {_eps_text(p.get('eps'))}"]
        if attack != "fgsm" and p.get("alpha") is not None:
            parts.append(f"step {_eps_text(p.get('alpha'))}")
        if p.get("restarts") is not None:
            parts.append(f"{p['restarts']} restart{'s' if p['restarts'] != 1 else ''}")
        if p.get("random_start"):
            parts.append("random start")
        head = f"{name} ({', '.join(parts)})"
    subset = lambda n: "all" if n is None else f"first {n}"
    tail = f"validation images: {subset(p.get('val_subset'))}, test images: {subset(p.get('test_subset'))}"
    extra = ([f"BatchNorm in {p['bn']} mode"] if p.get("bn") else []) + ([str(p["precision"])] if p.get("precision") else [])
    return f"{head}; {tail}" + (f"; {', '.join(extra)}" if extra else "")


def _protocol_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The eval protocol of an unfinished run, from its config (same defaults as training uses)."""
    e, a = config.get("eval") or {}, config.get("attack") or {}
    return {"attack": e.get("attack", "pgd"), "norm": e.get("norm") or a.get("norm"),
            "eps": a.get("eps") if e.get("eps") is None else e.get("eps"), "alpha": e.get("alpha"),
            "steps": e.get("steps"), "restarts": e.get("restarts"), "random_start": True,
            "val_subset": e.get("val_subset"), "test_subset": e.get("test_subset"), "bn": "eval"}


def _describe_train_attack(a: dict[str, Any]) -> str:
    name = str(a.get("name", "?"))
    if name in ("none", "clean"):
        return "clean training (no attack)"
    steps = f"-{a['steps']}" if name == "pgd" and a.get("steps") is not None else ""
    bits = [f"ε = {_eps_text(a.get('eps'))}"]
    if a.get("alpha") is not None:
        bits.append(f"step {_eps_text(a['alpha'])}")
    if a.get("bn_mode"):
        bits.append(f"BN in {a['bn_mode']} mode while attacking")
    return f"{name.upper()}{steps} ({', '.join(bits)})"


# ---------------------------------------------------------------- plots


def _matplotlib():
    """(Figure, FigureCanvasAgg) or None when matplotlib is not installed.

    Figures are drawn on an explicit Agg canvas, never through pyplot, so the report neither needs a
    display nor changes the backend of a session that imports sparta.
    """
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _save(fig, canvas_cls, path: Path) -> Path:
    from .checkpoint import atomic_write

    canvas_cls(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def _series(records: list[dict[str, Any]], key: str) -> list[float]:
    return [math.nan if _num(r.get(key)) is None else _num(r.get(key)) for r in records]


def _mark_stages(ax, starts: list[tuple[float, str]]) -> None:
    if len(starts) < 2:
        return
    from matplotlib.transforms import blended_transform_factory

    top = blended_transform_factory(ax.transData, ax.transAxes)
    ax.set_xlim(left=starts[0][0])  # the first stage starts at 0 even when it logged no accuracy
    for k, (x, stage) in enumerate(starts):
        if k:
            ax.axvline(x, color="0.35", linestyle="--", linewidth=1)
        ax.text(x, 1.01, f" {stage}", transform=top, ha="left", va="bottom", fontsize=8, color="0.25")


def _epoch_axis(ax, starts: list[tuple[float, str]]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (cumulative over stages)" if len(starts) > 1 else "epoch")


def plot_accuracy(run: Run, path: Path, mpl) -> Path:
    Figure, Canvas = mpl
    recs, stats = run.records, run.stats()
    xs, starts = stage_axis(recs, run.summary)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    marker = "o" if len(recs) <= 40 else None
    for key, label, style in (("train_robust_acc", "train RA (training attack)", dict(color="C0", linestyle=":")),
                              ("val_robust_acc", "validation RA", dict(color="C1", linestyle="-.")),
                              ("test_clean_acc", "test SA", dict(color="C2")),
                              ("test_robust_acc", "test RA", dict(color="C3"))):
        ys = _series(recs, key)
        if any(not math.isnan(y) for y in ys):
            ax.plot(xs, ys, label=label, marker=marker, markersize=3, linewidth=1.5, **style)
    bx = xs[stats["best_index"]]
    where = f"{stats['best_stage']} epoch {stats['best_epoch']}" if len(starts) > 1 else f"epoch {stats['best_epoch']}"
    ax.axvline(bx, color="black", linewidth=1, alpha=0.7, label=f"best: {where} (highest validation RA)")
    if stats["ra_best"] is not None and stats["ra_final"] is not None:
        ax.hlines(stats["ra_best"], bx, xs[-1], colors="C3", linestyles="dotted", linewidth=1)
        ax.annotate("", xy=(xs[-1], stats["ra_final"]), xytext=(xs[-1], stats["ra_best"]),
                    arrowprops=dict(arrowstyle="->", color="C3", linewidth=1.2))
        ax.plot([], [], color="C3", linestyle="dotted",
                label=f"robust overfitting: RA best − final = {stats['ra_diff']:.2f}")
    _mark_stages(ax, starts)
    _epoch_axis(ax, starts)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{run.label or run.name}: {run.method}, seed {run.seed}", pad=16 if len(starts) > 1 else 6)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, Canvas, path)


def _decision_epochs(records: list[dict[str, Any]], key: str) -> list[int]:
    """Indices of records where FB+ fired ``key`` since the previous logged epoch (by the running
    total when logged, so decisions in epochs that were not evaluated are not lost)."""
    hits = []
    for _, idx in _segments(records):
        prev_total = None
        for i in idx:
            total = _num(records[i].get(f"{key}_total"))
            count = _num(records[i].get(key))
            fired = (total - prev_total) if (total is not None and prev_total is not None) else count
            if fired is not None and fired > 0:
                hits.append(i)
            prev_total = total if total is not None else prev_total
    return hits


def has_moving_density(run: Run) -> bool:
    ds = _present(_num(r.get("density")) for r in run.records)
    return bool(ds) and any(abs(d - 1.0) > 1e-12 for d in ds)


def plot_density(run: Run, path: Path, mpl) -> Path:
    Figure, Canvas = mpl
    recs = run.records
    xs, starts = stage_axis(recs, run.summary)
    ys = _series(recs, "density")
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    ax.plot(xs, ys, color="C0", linewidth=1.5, marker="o" if len(recs) <= 40 else None, markersize=3,
            label="density (fraction of weights kept)")
    for key, mark, color, what in (("fbplus_prune_more", "v", "C3", "FB+ prune more"),
                                   ("fbplus_grow_more", "^", "C2", "FB+ grow more")):
        hits = _decision_epochs(recs, key)
        if hits:
            ax.scatter([xs[i] for i in hits], [ys[i] for i in hits], marker=mark, s=45, color=color, zorder=3,
                       label=f"{what} ({len(hits)} epoch{'s' if len(hits) != 1 else ''})")
    _mark_stages(ax, starts)
    _epoch_axis(ax, starts)
    ax.set_ylabel("density")
    ax.set_title(f"{run.label or run.name}: density over training", pad=16 if len(starts) > 1 else 6)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, Canvas, path)


def plot_cost(runs: Sequence[Run], key: str, path: Path, mpl, target_ra: float | None) -> Path | None:
    """Test RA against cumulative ``key`` (wall_time_s or train_flops), one line per run."""
    Figure, Canvas = mpl
    curves = []
    for run in runs:
        xs, ys = cumulative(run.records, key), _series(run.records, "test_robust_acc")
        pts = [(x, y) for x, y in zip(xs, ys) if x is not None and not math.isnan(y)]
        if pts:
            curves.append((run, pts))
    if not curves:
        return None
    top = max(x for _, pts in curves for x, _ in pts)
    scale, _, suffix = (_time_unit if key == "wall_time_s" else _flops_unit)(top)
    groups = {config_key(r.config): k for k, r in enumerate(dict((config_key(r.config), r) for r in runs).values())}
    styles = ["-", "--", ":", "-."]
    seen_in_group: dict[str, int] = {}
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for run, pts in curves:
        g = config_key(run.config)
        n = seen_in_group[g] = seen_in_group.get(g, -1) + 1
        color = f"C{groups[g] % 10}"
        ax.plot([x / scale for x, _ in pts], [y for _, y in pts], color=color, linestyle=styles[n % len(styles)],
                linewidth=1.5, marker="." if len(pts) <= 60 else None, label=run.label or run.name)
        hit = time_to_robustness(run.records, target_ra) if target_ra is not None else None
        if hit is not None and hit[key] is not None:
            ax.plot([hit[key] / scale], [_num(next(y for x, y in pts if x == hit[key]))], marker="o", markersize=8,
                    markerfacecolor="none", markeredgecolor=color, markeredgewidth=1.5)
    if target_ra is not None:
        ax.axhline(target_ra, color="0.4", linestyle="--", linewidth=1,
                   label=f"target RA {target_ra:.2f}% (circles: first reached)")
    ax.set_xlim(left=0)
    what = "wall time (training + evaluation)" if key == "wall_time_s" else "training FLOPs (all stages)"
    ax.set_xlabel(f"cumulative {what}, {suffix.strip()}")
    ax.set_ylabel("test robust accuracy (%)")
    ax.set_title(f"robustness against cost: test RA vs {'wall time' if key == 'wall_time_s' else 'training FLOPs'}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, Canvas, path)


# ---------------------------------------------------------------- the report


@dataclass
class Report:
    path: Path  # report.md
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one-line remarks (skipped plots, skipped runs)
    target_ra: float | None = None


def _config_table(groups: list[list[Run]], labels: list[str], diffs: list[str]) -> str:
    header = ["config", "method", "seeds", "RA best", "RA final", "RA diff", "SA best", "SA final", "SA diff",
              "train FLOPs", "inference FLOPs", "robust gen. gap", "density", "wall time"]
    if any(d for d in diffs):
        header.insert(1, "settings")
    rows = []
    for group, label, diff in zip(groups, labels, diffs):
        st = [r.stats() for r in group]
        col = lambda k, unit: _fmt([s[k] for s in st], unit, len(group))
        flops = _with_dense_share(col("train_flops", _flops_unit), st, "train_flops")
        inference = _with_dense_share(col("inference_flops", _flops_unit), st, "inference_flops")
        unfinished = sum(not r.finished for r in group)
        seeds = ", ".join(str(r.seed) for r in group) + (f" ({unfinished} unfinished)" if unfinished else "")
        row = [label, group[0].method, seeds, col("ra_best", _pct_unit), col("ra_final", _pct_unit),
               col("ra_diff", _pct_unit), col("sa_best", _pct_unit), col("sa_final", _pct_unit),
               col("sa_diff", _pct_unit), flops, inference,
               col("robust_gap", _pct_unit), col("density", _density_unit), col("wall_time_s", _time_unit)]
        if len(header) > len(row):
            row.insert(1, diff or "-")
        rows.append(row)
    return _md_table(header, rows)


def _run_table(runs: Sequence[Run]) -> str:
    with_eb = any(r.stats()["eb_epoch"] is not None for r in runs)
    header = ["run", "method", "seed", "status", "best epoch", "RA best", "RA final", "RA diff", "SA best",
              "SA final", "SA diff", "train FLOPs", "inference FLOPs", "robust gen. gap", "density", "wall time"]
    if with_eb:
        header.append("EB epoch")
    rows = []
    for r in runs:
        s = r.stats()
        one = lambda k, unit: _fmt([s[k]], unit)
        last = r.records[-1]
        status = "finished" if r.finished else f"unfinished ({last.get('stage', 'train')} epoch {last.get('epoch')})"
        best = f"{s['best_epoch']}" + (f" ({s['best_stage']})" if len(_segments(r.records)) > 1 else "")
        row = [r.label or r.name, r.method, str(r.seed), status, best, one("ra_best", _pct_unit),
               one("ra_final", _pct_unit), one("ra_diff", _pct_unit), one("sa_best", _pct_unit),
               one("sa_final", _pct_unit), one("sa_diff", _pct_unit), one("train_flops", _flops_unit),
               _with_dense_share(one("inference_flops", _flops_unit), [s], "inference_flops"),
               one("robust_gap", _pct_unit), one("density", _density_unit),
               one("wall_time_s", _time_unit)]
        if with_eb:
            row.append("-" if s["eb_epoch"] is None else str(s["eb_epoch"]))
        rows.append(row)
    return _md_table(header, rows)


def _stage_table(runs: Sequence[Run]) -> str | None:
    rows = []
    for r in runs:
        stages = (r.summary or {}).get("stages")
        if not isinstance(stages, list):
            continue
        for st in stages:
            if isinstance(st, dict):
                rows.append([r.label or r.name, str(st.get("name", "?")), str(st.get("epochs", "-")),
                             _fmt([_num(st.get("wall_time_s"))], _time_unit),
                             _fmt([_num(st.get("train_flops"))], _flops_unit)])
    return _md_table(["run", "stage", "epochs", "wall time", "train FLOPs"], rows) if rows else None


def default_target(groups: list[list[Run]], labels: list[str]) -> tuple[float | None, str]:
    """The final test RA of the dense config (mean over its seeds) when exactly one is present."""
    dense = [(g, lab) for g, lab in zip(groups, labels) if g[0].method == "dense"]
    if len(dense) != 1:
        why = "no dense run" if not dense else f"{len(dense)} dense configs"
        return None, f"skipped: no --target-ra given and {why} to take the target from"
    group, label = dense[0]
    finals = _present(r.stats()["ra_final"] for r in group)
    if not finals:
        return None, "skipped: the dense run has no final test RA"
    seeds = f"mean over {len(finals)} seeds" if len(finals) > 1 else f"seed {group[0].seed}"
    return statistics.fmean(finals), f"target = final test RA of the dense config `{label}` ({seeds})"


def _ttr_section(runs: Sequence[Run], groups: list[list[Run]], glabels: list[str], target: float, why: str) -> str:
    hits = {id(r): time_to_robustness(r.records, target) for r in runs}
    reached = [r for r in runs if hits[id(r)] is not None]
    dense = [r for r in reached if r.method == "dense"]
    dense_keys = {config_key(r.config) for r in dense}
    if dense:
        if len(dense_keys) == 1:
            ref_runs = dense
            ref_name = f"the dense run{'s' if len(dense) > 1 else ''} ({', '.join(r.label for r in dense)}"
            ref_name += ", mean)" if len(dense) > 1 else ")"
        else:  # several dense configs: the slowest of them
            ref_runs = [max(dense, key=lambda r: hits[id(r)]["wall_time_s"] or 0.0)]
            ref_name = f"the slowest dense run ({ref_runs[0].label})"
    elif reached:
        ref_runs = [max(reached, key=lambda r: hits[id(r)]["wall_time_s"] or 0.0)]
        ref_name = f"the slowest run ({ref_runs[0].label}); no dense run reached the target"
    else:
        ref_runs, ref_name = [], "none (no run reached the target)"

    def ref_cost(key: str) -> float | None:
        values = [hits[id(r)][key] for r in ref_runs]
        return statistics.fmean(values) if values and all(v is not None for v in values) else None

    ref_wall, ref_flops = ref_cost("wall_time_s"), ref_cost("train_flops")
    ratio = lambda v, ref: "-" if v is None or not ref else f"{100 * v / ref:.0f}%"
    rows = []
    for r in runs:
        hit = hits[id(r)]
        if hit is None:
            best = max(_present(_num(x.get("test_robust_acc")) for x in r.records), default=None)
            rows.append([r.label, r.method, str(r.seed), "not reached" + ("" if best is None else f" (max RA {best:.2f})"),
                         "-", "-", "-", "-"])
            continue
        xs, _ = stage_axis(r.records, r.summary)
        i = next(k for k, x in enumerate(r.records) if x.get("epoch") == hit["epoch"] and x.get("stage", "train") == hit["stage"])
        at = f"{hit['stage']} epoch {hit['epoch']}" + (f" (cumulative {xs[i]:g})" if len(_segments(r.records)) > 1 else "")
        rows.append([r.label, r.method, str(r.seed), at, _fmt([hit["wall_time_s"]], _time_unit),
                     ratio(hit["wall_time_s"], ref_wall), _fmt([hit["train_flops"]], _flops_unit),
                     ratio(hit["train_flops"], ref_flops)])
    lines = [f"## Time to robustness: test RA ≥ {target:.2f}%", "", why + ".",
             f"Reference for the ratios: {ref_name}.", "",
             _md_table(["run", "method", "seed", "first reached at", "wall time", "wall time vs ref.",
                        "train FLOPs", "FLOPs vs ref."], rows), "",
             "Cost = cumulative over the whole run up to the first evaluated epoch of its last stage (the one that "
             "trains the model it produces) whose test RA reaches the target, *including earlier stages* (ticket "
             "search, finder). Wall time counts training and the per-epoch "
             "evaluation as logged; test RA is checked only at evaluated epochs."]
    sentences = []
    for group, glabel in zip(groups, glabels):
        if any(r is ref for r in group for ref in ref_runs) or not ref_wall:
            continue
        walls = [hits[id(r)]["wall_time_s"] for r in group if hits[id(r)] is not None]
        if walls and len(walls) == len(group) and all(w is not None for w in walls):
            sentences.append(f"- `{glabel}` reaches it at "
                             f"{100 * statistics.fmean(walls) / ref_wall:.0f}% of the reference's wall time"
                             + (f" (mean over {len(group)} seeds)" if len(group) > 1 else ""))
    if sentences:
        lines += [""] + sentences
    return "\n".join(lines)


def _measurement_section(runs: Sequence[Run]) -> str:
    lines = ["## How these numbers were measured", ""]
    protocols: dict[str, list[str]] = {}
    train_attacks: dict[str, list[str]] = {}
    machines: dict[str, list[str]] = {}
    selection: dict[str, list[str]] = {}
    for r in runs:
        s = r.summary or {}
        p = s.get("eval_protocol") or _protocol_from_config(r.config)
        text = describe_protocol(p) + ("" if s.get("eval_protocol") else " (from config.yaml: run unfinished)")
        protocols.setdefault(text, []).append(r.label)
        a = s.get("train_attack") or r.config.get("attack")
        if isinstance(a, dict):
            train_attacks.setdefault(_describe_train_attack(a), []).append(r.label)
        if s:
            machine = f"device {s.get('device', '?')}, torch {s.get('torch', '?')}, Python {s.get('python', '?')}"
        else:
            machine = f"device setting `{r.config.get('device', '?')}` (run unfinished: actual device not recorded yet)"
        machines.setdefault(machine, []).append(r.label)
        selection.setdefault(str(s.get("best_selected_on", "val_robust_acc (derived from metrics.jsonl)")), []).append(r.label)

    def block(title: str, d: dict[str, list[str]]) -> None:
        if len(d) == 1:
            lines.append(f"- {title}: {next(iter(d))} (all runs)")
        else:
            lines.append(f"- {title}:")
            lines.extend(f"  - {k}: {', '.join(v)}" for k, v in d.items())

    block("Evaluation attack (SA/RA on the test set, validation RA)", protocols)
    block("Training attack", train_attacks)
    block("Best epoch selected on", selection)
    gaps = {}
    for r in runs:
        n = (r.summary or {}).get("gap_subset")
        if n is not None:
            gaps.setdefault(f"RA on the first {n} training images − test RA, final epoch", []).append(r.label)
    if gaps:
        block("Robust gen. gap measured as", gaps)
    block("Measured on", machines)
    lines += [
        "- SA = clean test accuracy, RA = robust test accuracy (%). *best* = at the epoch with the highest "
        "validation RA (never selected on test), *final* = at the last epoch; diff = best − final "
        "(RA diff is the robust overfitting).",
        "- Robust gen. gap = RA on a fixed training subset (eval mode, no augmentation) − test RA, at the final "
        "epoch. Train FLOPs: every stage, attack steps included; inference FLOPs: one forward pass at the final "
        "density (each layer's dense FLOPs x its density), its % of dense = `inference_flops / "
        "inference_flops_dense`, the number to set beside a paper's inference-FLOPs ratio: it depends on how the "
        "density is spread over layers, not on the density alone. `-` = not recorded by that run.",
        "- Per-config rows: mean ± sample standard deviation (n − 1) over the runs whose config is equal up to "
        f"{', '.join(f'`{k}`' for k in GROUP_IGNORED)}; (n=k) where only k of the runs recorded the value.",
        "- Wall time: cumulative training plus per-epoch evaluation time as logged in metrics.jsonl/summary.json.",
    ]
    unfinished = [r.label for r in runs if not r.finished]
    if unfinished:
        lines.append(f"- Unfinished (no summary.json; numbers derived from metrics.jsonl so far): {', '.join(unfinished)}")
    return "\n".join(lines)


def write_report(paths: Sequence[str | Path], out: str | Path, *, target_ra: float | None = None,
                 preamble: str = "") -> Report:
    """Read the runs under ``paths`` and write ``out/report.md`` and the PNGs; writes nothing else.
    ``preamble`` (markdown) goes before the tables (``sparta reproduce`` puts its claims there)."""
    from .rundir import write_text_atomic

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpartaError(f"--out {out} exists and is not a folder")
    if target_ra is not None and not 0 <= target_ra <= 100:
        raise SpartaError(f"--target-ra is a percentage in [0, 100], got {target_ra:g}")
    run_paths, notes = find_runs(paths)
    runs = [load_run(p) for p in run_paths]
    for run, label in zip(runs, _run_labels(runs)):
        run.label = label
    groups = group_runs(runs)
    glabels = _unique([_group_label(g) for g in groups])
    report = Report(path=out / "report.md", notes=list(notes))

    if target_ra is not None:
        target, why = target_ra, f"target = {target_ra:g}% (--target-ra)"
    else:
        target, why = default_target(groups, glabels)
    report.target_ra = target

    mpl = _matplotlib()
    plot_lines: list[str] = []
    if mpl is None:
        report.notes.append(PLOTS_SKIPPED)
        plot_lines.append(PLOTS_SKIPPED + ".")
    else:
        for run in runs:
            folder = out / "plots" / _safe(run.label)
            report.plots.append(plot_accuracy(run, folder / "accuracy.png", mpl))
            if has_moving_density(run):
                report.plots.append(plot_density(run, folder / "density.png", mpl))
        for key, fname in (("wall_time_s", "ra_vs_wall_time.png"), ("train_flops", "ra_vs_train_flops.png")):
            p = plot_cost(runs, key, out / "plots" / fname, mpl, target)
            if p is not None:
                report.plots.append(p)
        for p in report.plots:
            rel = p.relative_to(out).as_posix()
            plot_lines.append(f"![{rel}]({rel})")

    lines = ([preamble] if preamble else []) + ["# sparta report", "",
             f"{len(runs)} run{'s' if len(runs) != 1 else ''} in {len(groups)} config{'s' if len(groups) != 1 else ''}: "
             + ", ".join(f"`{r.path}`" for r in runs), ""]
    lines += ["## Results per config (mean ± std over seeds)", "",
              _config_table(groups, glabels, _differences(groups) if len(groups) > 1 else [""] * len(groups)), "",
              "## Results per run", "", _run_table(runs), ""]
    stages = _stage_table(runs)
    if stages:
        lines += ["## Stages", "", stages, ""]
    if target is not None:
        lines += [_ttr_section(runs, groups, glabels, target, why), ""]
    else:
        lines += ["## Time to robustness", "", why + ".", ""]
    lines += [_measurement_section(runs), ""]
    if notes:
        lines += ["Runs skipped: " + "; ".join(notes), ""]
    lines += ["## Plots", ""] + plot_lines + [""]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(report.path, "\n".join(lines))
    return report


# ---------------------------------------------------------------- command line (wired by sparta/cli.py)


def add_cli_arguments(parser) -> None:
    """Arguments of ``sparta report RUN_DIR... --out DIR [--target-ra X]``."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories, or folders holding run directories")
    parser.add_argument("--out", required=True, metavar="DIR", help="where report.md and plots/ are written")
    parser.add_argument("--target-ra", type=float, default=None, metavar="X",
                        help="add a 'time to test RA >= X%%' table (default: the dense run's final RA when "
                             "exactly one dense config is present)")


def cli_main(args) -> int:
    import sys

    report = write_report(args.run_dirs, args.out, target_ra=args.target_ra)
    for note in report.notes:
        print(note, file=sys.stderr)
    print(report.path)
    return 0
