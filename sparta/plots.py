"""The figures of ``sparta report`` (PNG, matplotlib), one function per figure.

::

    plots/<run>/accuracy.png           train RA, val RA, test SA/RA per epoch; best epoch, stages
    plots/<run>/density.png            density per epoch with FB+ decisions (sparse runs whose density moves)
    plots/ra_vs_wall_time.png          test RA against cumulative wall time, one line per run
    plots/ra_vs_train_flops.png        ... against cumulative training FLOPs (when the runs log them)
    plots/ra_vs_train_flops_pareto.png final robust accuracy per config against training FLOPs (log x),
                                       the Pareto front of each measurement as a step line (sparta.pareto)

matplotlib is optional (``pip install sparta[report]``): ``matplotlib_or_none()`` says whether it is
there. Figures are drawn on an explicit Agg canvas, never through pyplot, so plotting neither needs a
display nor changes the backend of a session that imports sparta.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .fmt import flops_unit, time_unit
from .rundir import atomic_write
from .runs import Run, config_key, cumulative, finite, present, stage_axis, stage_segments, time_to_robustness

PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (pip install 'sparta[report]')"


def matplotlib_or_none():
    """(Figure, FigureCanvasAgg) or None when matplotlib is not installed.

    Figures are drawn on an explicit Agg canvas, never through pyplot, so the report neither needs a
    display nor changes the backend of a session that imports sparta.
    """
    try:
        import matplotlib  # noqa: F401, PLC0415 (optional dependency: matplotlib)
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (optional dependency: matplotlib)
        from matplotlib.figure import Figure  # noqa: PLC0415 (optional dependency: matplotlib)
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _save(fig, canvas_cls, path: Path) -> Path:

    canvas_cls(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def _series(records: list[dict[str, Any]], key: str) -> list[float]:
    values = [finite(r.get(key)) for r in records]
    return [math.nan if v is None else v for v in values]


def _mark_stages(ax, starts: list[tuple[float, str]]) -> None:
    if len(starts) < 2:
        return
    from matplotlib.transforms import blended_transform_factory  # noqa: PLC0415 (optional dependency: matplotlib)

    top = blended_transform_factory(ax.transData, ax.transAxes)
    ax.set_xlim(left=starts[0][0])  # the first stage starts at 0 even when it logged no accuracy
    for k, (x, stage) in enumerate(starts):
        if k:
            ax.axvline(x, color="0.35", linestyle="--", linewidth=1)
        ax.text(x, 1.01, f" {stage}", transform=top, ha="left", va="bottom", fontsize=8, color="0.25")


def _epoch_axis(ax, starts: list[tuple[float, str]]) -> None:
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 (optional dependency: matplotlib)

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
    _finish_epoch_plot(ax, starts, "accuracy (%)", f"{run.label or run.name}: {run.method}, seed {run.seed}")
    return _save(fig, Canvas, path)


def _finish_epoch_plot(ax, starts: list[tuple[float, str]], ylabel: str, title: str) -> None:
    """Stage boundaries, epoch axis, labels, grid and a legend outside the axes (room above for stage names)."""
    _mark_stages(ax, starts)
    _epoch_axis(ax, starts)
    ax.set_ylabel(ylabel)
    ax.set_title(title, pad=16 if len(starts) > 1 else 6)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _decision_epochs(records: list[dict[str, Any]], key: str) -> list[int]:
    """Indices of records where FB+ fired ``key`` since the previous logged epoch (by the running
    total when logged, so decisions in epochs that were not evaluated are not lost)."""
    hits = []
    for _, idx in stage_segments(records):
        prev_total = None
        for i in idx:
            total = finite(records[i].get(f"{key}_total"))
            count = finite(records[i].get(key))
            fired = (total - prev_total) if (total is not None and prev_total is not None) else count
            if fired is not None and fired > 0:
                hits.append(i)
            prev_total = total if total is not None else prev_total
    return hits


def has_moving_density(run: Run) -> bool:
    ds = present(finite(r.get("density")) for r in run.records)
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
    _finish_epoch_plot(ax, starts, "density", f"{run.label or run.name}: density over training")
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
    scale, _, suffix = (time_unit if key == "wall_time_s" else flops_unit)(top)
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
            ax.plot([hit[key] / scale], [finite(next(y for x, y in pts if x == hit[key]))], marker="o", markersize=8,
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



def plot_pareto(points: Sequence[Any], path: Path, mpl) -> Path | None:
    """Final robust accuracy (± 2 SE) against training FLOPs (log x), one point per config
    (``sparta.pareto.CostPoint``), each measurement (attack, ε, n) in its own colour with its front as
    a step line; None when no config has both numbers."""
    Figure, Canvas = mpl
    shown = [p for p in points if p.train_flops and p.robust_acc is not None]
    if not shown:
        return None
    fig = Figure(figsize=(8, 4.8))
    ax = fig.add_subplot()
    for k, m in enumerate(dict.fromkeys(p.measurement for p in shown)):
        color, members = f"C{k % 10}", [p for p in shown if p.measurement == m]
        xs, ys = [p.train_flops for p in members], [p.robust_acc for p in members]
        errs = [0.0 if p.se is None else 2 * p.se for p in members]
        ax.errorbar(xs, ys, yerr=errs, fmt="o", color=color, capsize=3, markersize=6, label=m)
        for p in members:
            if p.on_front:  # filled ring around the points on the front
                ax.plot([p.train_flops], [p.robust_acc], marker="o", markersize=11, markerfacecolor="none",
                        markeredgecolor=color, markeredgewidth=1.5)
            density = "" if p.density is None else f" d={p.density:.2f}"
            ax.annotate(f"{p.method}{density}", (p.train_flops, p.robust_acc), textcoords="offset points",
                        xytext=(6, 5), fontsize=7)
        front = sorted((p.train_flops, p.robust_acc) for p in members if p.on_front)
        if len(front) > 1:
            # the best accuracy reachable at each budget: flat until the next front point's FLOPs
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color=color, linewidth=1.2,
                    label=f"front ({m})")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (all stages), log scale")
    ax.set_ylabel("final robust test accuracy (%)")
    ax.set_title("robustness per training FLOP (rings: on the front; bars: ± 2 SE)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, Canvas, path)


def plot_security_curve(curves: dict[str, list[tuple[float, float]]], path: Path, mpl, *, eps: float | None = None,
                        title: str = "security curve") -> Path:
    """Robust accuracy (%) against the L∞ budget, one step line per model (``{label: [(eps, acc)]}``,
    from :func:`sparta.min_norm.security_curve`), x in 255ths; a dotted line marks ``eps``."""
    Figure, Canvas = mpl
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for label, points in curves.items():
        ax.step([255 * e for e, _ in points], [a for _, a in points], where="post", linewidth=1.6, label=label)
    if eps is not None:
        ax.axvline(255 * eps, color="0.4", linestyle=":", linewidth=1, label=f"eps = {255 * eps:.3g}/255")
    ax.set_xlabel("L∞ budget eps (× 1/255)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, Canvas, path)
