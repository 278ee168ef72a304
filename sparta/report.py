"""``sparta report``: the markdown report of one or many run directories, and its figures.

Writes only under ``out``:

::

    out/report.md        tables (per config: mean ± std over seeds; per run; robustness per training
                         FLOP with its Pareto front), how measured
    out/plots/...        the figures of ``sparta.plots``

Runs that share a config up to ``GROUP_IGNORED`` (seed, name, out_dir, ...) form one row of the
per-config table, as in the tables of Chen et al. 2022 ("Sparsity Winning Twice"): RA/SA at the best
epoch (highest *validation* RA) and at the final epoch, their difference, training and inference
FLOPs, the robust generalization gap, density and wall time. The numbers come from ``sparta.runs``
(whose names, e.g. ``load_run`` and ``time_to_robustness``, are importable from here too).

"Robustness per training FLOP" gives each config's final robust accuracy (AutoAttack where the run
directory holds it, else the final per-epoch PGD number, labelled) against its training FLOPs and
marks the Pareto front within each measurement (``sparta.pareto``); ``Report.per_flop`` holds the
same rows as dicts. The report writes no JSON file of its own.

matplotlib is optional (``pip install sparta[report]``): without it the tables are still written and
the report says in one line that the plots were skipped. Library code never prints; ``sparta.cli`` does.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fmt
from .errors import SpartaError
from .pareto import CostPoint, cost_points
from .plots import (
    PLOTS_SKIPPED,
    has_moving_density,
    matplotlib_or_none,
    plot_accuracy,
    plot_cost,
    plot_density,
    plot_pareto,
)
from .protocol import eval_protocol
from .rundir import write_text_atomic
from .runs import (
    GROUP_IGNORED,
    Run,
    config_key,
    cumulative,
    differences,
    find_runs,
    finite,
    group_label,
    group_runs,
    is_run_dir,
    load_run,
    present,
    run_labels,
    run_stats,
    safe_name,
    stage_axis,
    stage_segments,
    time_to_robustness,
    unique_labels,
)

# importable from here: the public names of sparta.runs and sparta.plots that callers import from sparta.report
__all__ = ["GROUP_IGNORED", "PLOTS_SKIPPED", "Report", "Run", "config_key", "cumulative", "default_target",
           "describe_protocol", "find_runs", "group_runs", "has_moving_density", "is_run_dir", "load_run",
           "plot_accuracy", "plot_cost", "plot_density", "run_stats", "stage_axis", "time_to_robustness",
           "write_report"]


# ---------------------------------------------------------------- table cells


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: Sequence[float | None], unit_of, group_size: int | None = None) -> str:
    """mean ± sample std of the present values, in the unit ``unit_of(mean) -> (scale, spec, suffix)``."""
    values = present(values)
    if not values:
        return fmt.MISSING
    mean, std = _mean_std(values)
    scale, spec, suffix = unit_of(mean)
    text = format(mean / scale, spec) + ("" if std is None else " ± " + format(std / scale, spec)) + suffix
    if group_size is not None and len(values) < group_size:
        text += f" (n={len(values)})"
    return text


def _pct_unit(_: float):
    return 1.0, ".2f", ""


def _density_unit(_: float):
    return 1.0, ".3f", ""


_flops_unit, _time_unit = fmt.flops_unit, fmt.time_unit  # "4.2 ± 0.283 PFLOP", "42.0 ± 2.8 s"


def _with_dense_share(text: str, stats: Sequence[dict[str, Any]], key: str) -> str:
    """``text`` + `` (N% of dense)``: the mean of ``key / key_dense`` over the runs that recorded both."""
    ratios = present(s[key] / s[f"{key}_dense"] if s[key] is not None and s[f"{key}_dense"] else None
                     for s in stats)
    return text + f" ({fmt.fraction(statistics.fmean(ratios))} of dense)" if ratios and text != fmt.MISSING else text


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(c: Any) -> str:
        return str(c).replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(lines)


def _eps_text(eps: Any) -> str:
    # six significant digits (``:g``), and whole 255ths at any size (eps 1 reads 255/255)
    return fmt.eps(eps, sig=6, fraction_below=math.inf)


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

    def subset(n: Any) -> str:
        return "all" if n is None else f"first {n}"

    tail = f"validation images: {subset(p.get('val_subset'))}, test images: {subset(p.get('test_subset'))}"
    extra = (([f"BatchNorm in {p['bn']} mode"] if p.get("bn") else [])
             + ([str(p["precision"])] if p.get("precision") else []))
    return f"{head}; {tail}" + (f"; {', '.join(extra)}" if extra else "")


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


# ---------------------------------------------------------------- the report


@dataclass
class Report:
    path: Path  # report.md
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one-line remarks (skipped plots, skipped runs)
    target_ra: float | None = None
    per_flop: list[dict[str, Any]] = field(default_factory=list)  # the robustness-per-FLOP rows (CostPoint.to_dict)


def _dense_train_flops(groups: list[list[Run]]) -> float | None:
    """The mean training FLOPs of the dense config when the report holds exactly one: the one
    denominator of every "of dense" training-FLOPs share (the report's, claims.json's, the README's)."""
    dense = [g for g in groups if g[0].method == "dense"]
    values = [r.stats()["train_flops"] for r in dense[0]] if len(dense) == 1 else []
    return statistics.fmean(values) if values and None not in values and all(values) else None


def _train_flops_text(text: str, stats: Sequence[dict[str, Any]], dense: float | None) -> str:
    """``text`` + `` (N% of dense)`` against the dense config's training FLOPs; without one dense
    config, against each run's dense network trained for the same steps (``of dense, same steps``)."""
    values = present(s["train_flops"] for s in stats)
    if dense is None or not values or text == fmt.MISSING:
        return _with_dense_share(text, stats, "train_flops").replace(" of dense)", " of dense, same steps)")
    return text + f" ({fmt.fraction(statistics.fmean(values) / dense)} of dense)"


def _config_table(groups: list[list[Run]], labels: list[str], diffs: list[str]) -> str:
    dense = _dense_train_flops(groups)
    header = ["config", "method", "seeds", "RA best", "RA final", "RA diff", "SA best", "SA final", "SA diff",
              "train FLOPs", "inference FLOPs", "robust gen. gap", "density", "wall time"]
    if any(d for d in diffs):
        header.insert(1, "settings")
    rows = []
    for group, label, diff in zip(groups, labels, diffs):
        st = [r.stats() for r in group]

        def col(k: str, unit, stats: list[dict[str, Any]] = st, n: int = len(group)) -> str:  # this group's stats
            return _fmt([s[k] for s in stats], unit, n)

        flops = _train_flops_text(col("train_flops", _flops_unit), st, dense)
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

        def one(k: str, unit, stats: dict[str, Any] = s) -> str:  # this run's stats
            return _fmt([stats[k]], unit)

        last = r.records[-1]
        status = "finished" if r.finished else f"unfinished ({last.get('stage', 'train')} epoch {last.get('epoch')})"
        best = f"{s['best_epoch']}" + (f" ({s['best_stage']})" if len(stage_segments(r.records)) > 1 else "")
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
                             _fmt([finite(st.get("wall_time_s"))], _time_unit),
                             _fmt([finite(st.get("train_flops"))], _flops_unit)])
    return _md_table(["run", "stage", "epochs", "wall time", "train FLOPs"], rows) if rows else None


def default_target(groups: list[list[Run]], labels: list[str]) -> tuple[float | None, str]:
    """The final test RA of the dense config (mean over its seeds) when exactly one is present."""
    dense = [(g, lab) for g, lab in zip(groups, labels) if g[0].method == "dense"]
    if len(dense) != 1:
        why = "no dense run" if not dense else f"{len(dense)} dense configs"
        return None, f"skipped: no --target-ra given and {why} to take the target from"
    group, label = dense[0]
    finals = present(r.stats()["ra_final"] for r in group)
    if not finals:
        return None, "skipped: the dense run has no final test RA"
    seeds = f"mean over {len(finals)} seeds" if len(finals) > 1 else f"seed {group[0].seed}"
    return statistics.fmean(finals), f"target = final test RA of the dense config `{label}` ({seeds})"


def _ttr_section(runs: Sequence[Run], groups: list[list[Run]], glabels: list[str], target: float, why: str) -> str:
    hit_of = {id(r): hit for r in runs if (hit := time_to_robustness(r.records, target)) is not None}
    reached = [r for r in runs if id(r) in hit_of]
    dense = [r for r in reached if r.method == "dense"]
    dense_keys = {config_key(r.config) for r in dense}
    if dense:
        if len(dense_keys) == 1:
            ref_runs = dense
            ref_name = f"the dense run{'s' if len(dense) > 1 else ''} ({', '.join(r.label for r in dense)}"
            ref_name += ", mean)" if len(dense) > 1 else ")"
        else:  # several dense configs: the slowest of them
            ref_runs = [max(dense, key=lambda r: hit_of[id(r)]["wall_time_s"] or 0.0)]
            ref_name = f"the slowest dense run ({ref_runs[0].label})"
    elif reached:
        ref_runs = [max(reached, key=lambda r: hit_of[id(r)]["wall_time_s"] or 0.0)]
        ref_name = f"the slowest run ({ref_runs[0].label}); no dense run reached the target"
    else:
        ref_runs, ref_name = [], "none (no run reached the target)"

    def ref_cost(key: str) -> float | None:
        values = [hit_of[id(r)][key] for r in ref_runs]
        return statistics.fmean(values) if values and all(v is not None for v in values) else None

    ref_wall, ref_flops = ref_cost("wall_time_s"), ref_cost("train_flops")
    rows = []
    for r in runs:
        hit = hit_of.get(id(r))
        if hit is None:
            best = max(present(finite(x.get("test_robust_acc")) for x in r.records), default=None)
            rows.append([r.label, r.method, str(r.seed),
                         "not reached" + ("" if best is None else f" (max RA {best:.2f})"), "-", "-", "-", "-"])
            continue
        xs, _ = stage_axis(r.records, r.summary)
        i = next(k for k, x in enumerate(r.records)
                 if x.get("epoch") == hit["epoch"] and x.get("stage", "train") == hit["stage"])
        at = f"{hit['stage']} epoch {hit['epoch']}" + (f" (cumulative {xs[i]:g})"
                                                       if len(stage_segments(r.records)) > 1 else "")
        rows.append([r.label, r.method, str(r.seed), at, _fmt([hit["wall_time_s"]], _time_unit),
                     fmt.share(hit["wall_time_s"], ref_wall), _fmt([hit["train_flops"]], _flops_unit),
                     fmt.share(hit["train_flops"], ref_flops)])
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
        walls = [hit_of[id(r)]["wall_time_s"] for r in group if id(r) in hit_of]
        if walls and len(walls) == len(group) and all(w is not None for w in walls):
            sentences.append(f"- `{glabel}` reaches it at "
                             f"{100 * statistics.fmean(walls) / ref_wall:.0f}% of the reference's wall time"
                             + (f" (mean over {len(group)} seeds)" if len(group) > 1 else ""))
    if sentences:
        lines += [""] + sentences
    return "\n".join(lines)


def _front_cell(p: CostPoint) -> str:
    if p.on_front is None:
        return "-"
    return ("yes (alone)" if p.alone else "yes") if p.on_front else "no"


def _per_flop_section(points: list[CostPoint]) -> str:
    rows = []
    for p in points:
        ra = "-" if p.robust_acc is None else f"{p.robust_acc:.2f}" + ("" if p.se is None else f" ± {2 * p.se:.2f}")
        first = p.final[0] if p.final else None
        n = "-" if first is None else ("all" if first.n is None else str(first.n))
        rows.append([p.label, p.method, str(p.seeds), _fmt([p.density], _density_unit),
                     _fmt([p.train_flops], _flops_unit), fmt.fraction(p.dense_share), ra,
                     "-" if first is None else first.attack, n,
                     ", ".join(sorted({f.source for f in p.final})) or "-", _front_cell(p), p.note])
    header = ["config", "method", "seeds", "density", "train FLOPs", "of dense", "robust acc. ± 2 SE", "attack",
              "n", "source", "on front", "note"]
    if not any(p.note for p in points):  # no column of empty cells
        header, rows = header[:-1], [row[:-1] for row in rows]
    measurements = list(dict.fromkeys(p.measurement for p in points if p.on_front is not None))
    dense = [p for p in points if p.method == "dense"]
    lines = ["## Robustness per training FLOP", "",
             "Final robust test accuracy against training FLOPs (every stage, attack steps included), one row per "
             "config (mean over its seeds), sorted by FLOPs. A config is *on the front* when no other config "
             "measured alike has training FLOPs ≤ and robust accuracy ≥ its own with at least one strict; equal "
             "points are all on it; *yes (alone)*: nothing else was measured alike.", "",
             _md_table(header, rows), "",
             "- Robust accuracy: AutoAttack (standard) of the final model from `final-eval.json`, else from "
             "`checkpoints/last.eval-autoattack.json`; a run with neither falls back to its final epoch's test RA "
             "under the per-epoch PGD, labelled PGD-k (PGD usually reads higher than AutoAttack: a weaker "
             "attack). n = test images; ± 2 SE = twice the binomial standard error of the test "
             "sample, sqrt(p(1 − p)/n) per seed, of the mean over seeds (not the spread between seeds).",
             "- The front is computed within one measurement only (same attack, ε and n), so numbers of different "
             "attacks or test images are never compared; unfinished runs are kept off it. "
             + (f"Every config compared was measured with {measurements[0]}." if len(measurements) == 1 else
                "Measurements: " + "; ".join(
                    f"{m} ({', '.join(p.label for p in points if p.measurement == m and p.on_front is not None)})"
                    for m in measurements) + "." if measurements else
                "No config has both training FLOPs and a robust accuracy: no front."),
             "- of dense = training FLOPs / those of the dense config"
             + (f" `{dense[0].label}`." if len(dense) == 1 and dense[0].train_flops else
                (": no dense config in this report." if not dense else
                 ": not given, the report holds "
                 + ("no dense FLOPs." if len(dense) == 1 else f"{len(dense)} dense configs.")))]
    return "\n".join(lines)


def _measurement_section(runs: Sequence[Run]) -> str:
    lines = ["## How these numbers were measured", ""]
    protocols: dict[str, list[str]] = {}
    train_attacks: dict[str, list[str]] = {}
    machines: dict[str, list[str]] = {}
    selection: dict[str, list[str]] = {}
    for r in runs:
        s = r.summary or {}
        # an unfinished run: the protocol its config.yaml asks for, without the precision (named only
        # once summary.json records it)
        p = s.get("eval_protocol") or {k: v for k, v in eval_protocol(r.config).items() if k != "precision"}
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
        rule = str(s.get("best_selected_on", "val_robust_acc (derived from metrics.jsonl)"))
        selection.setdefault(rule, []).append(r.label)

    def block(title: str, d: dict[str, list[str]]) -> None:
        if len(d) == 1:
            lines.append(f"- {title}: {next(iter(d))} (all runs)")
        else:
            lines.append(f"- {title}:")
            lines.extend(f"  - {k}: {', '.join(v)}" for k, v in d.items())

    block("Evaluation attack (SA/RA on the test set, validation RA)", protocols)
    block("Training attack", train_attacks)
    block("Best epoch selected on", selection)
    gaps: dict[str, list[str]] = {}
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
        "epoch. Train FLOPs: every stage, attack steps included, their % of dense = / the dense config's mean "
        "training FLOPs (with no single dense config: / the run's dense network trained for the same steps, "
        "marked \"same steps\"); inference FLOPs: one forward pass at the final "
        "density (each layer's dense FLOPs x its density), its % of dense = `inference_flops / "
        "inference_flops_dense`, the number to set beside a paper's inference-FLOPs ratio: it depends on how the "
        "density is spread over layers, not on the density alone. `-` = not recorded by that run.",
        "- Per-config rows: mean ± sample standard deviation (n − 1) over the runs whose config is equal up to "
        f"{', '.join(f'`{k}`' for k in GROUP_IGNORED)}; (n=k) where only k of the runs recorded the value.",
        "- Wall time: cumulative training plus per-epoch evaluation time as logged in metrics.jsonl/summary.json.",
    ]
    unfinished = [r.label for r in runs if not r.finished]
    if unfinished:
        lines.append("- Unfinished (no summary.json; numbers derived from metrics.jsonl so far): "
                     f"{', '.join(unfinished)}")
    return "\n".join(lines)


def write_report(paths: Sequence[str | Path], out: str | Path, *, target_ra: float | None = None,
                 preamble: str = "") -> Report:
    """Read the runs under ``paths`` and write ``out/report.md`` and the PNGs; writes nothing else.
    ``preamble`` (markdown) goes before the tables (``sparta reproduce`` puts its claims there)."""

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpartaError(f"--out {out} exists and is not a folder")
    if target_ra is not None and not 0 <= target_ra <= 100:
        raise SpartaError(f"--target-ra is a percentage in [0, 100], got {target_ra:g}")
    run_paths, notes = find_runs(paths)
    runs = [load_run(p) for p in run_paths]
    for run, label in zip(runs, run_labels(runs)):
        run.label = label
    groups = group_runs(runs)
    glabels = unique_labels([group_label(g) for g in groups])
    report = Report(path=out / "report.md", notes=list(notes))

    target: float | None
    if target_ra is not None:
        target, why = target_ra, f"target = {target_ra:g}% (--target-ra)"
    else:
        target, why = default_target(groups, glabels)
    report.target_ra = target
    points = cost_points(groups, glabels)
    report.per_flop = [p.to_dict() for p in points]

    mpl = matplotlib_or_none()
    plot_lines: list[str] = []
    if mpl is None:
        report.notes.append(PLOTS_SKIPPED)
        plot_lines.append(PLOTS_SKIPPED + ".")
    else:
        for run in runs:
            folder = out / "plots" / safe_name(run.label)
            report.plots.append(plot_accuracy(run, folder / "accuracy.png", mpl))
            if has_moving_density(run):
                report.plots.append(plot_density(run, folder / "density.png", mpl))
        for key, fname in (("wall_time_s", "ra_vs_wall_time.png"), ("train_flops", "ra_vs_train_flops.png")):
            p = plot_cost(runs, key, out / "plots" / fname, mpl, target)
            if p is not None:
                report.plots.append(p)
        p = plot_pareto(points, out / "plots" / "ra_vs_train_flops_pareto.png", mpl)
        if p is not None:
            report.plots.append(p)
        for p in report.plots:
            rel = p.relative_to(out).as_posix()
            plot_lines.append(f"![{rel}]({rel})")

    lines = ([preamble] if preamble else []) + ["# sparta report", "",
             f"{len(runs)} run{'s' if len(runs) != 1 else ''} in "
             f"{len(groups)} config{'s' if len(groups) != 1 else ''}: "
             + ", ".join(f"`{r.path}`" for r in runs), ""]
    lines += ["## Results per config (mean ± std over seeds)", "",
              _config_table(groups, glabels, differences(groups) if len(groups) > 1 else [""] * len(groups)), "",
              "## Results per run", "", _run_table(runs), ""]
    stages = _stage_table(runs)
    if stages:
        lines += ["## Stages", "", stages, ""]
    if target is not None:
        lines += [_ttr_section(runs, groups, glabels, target, why), ""]
    else:
        lines += ["## Time to robustness", "", why + ".", ""]
    lines += [_per_flop_section(points), ""]
    lines += [_measurement_section(runs), ""]
    if notes:
        lines += ["Runs skipped: " + "; ".join(notes), ""]
    lines += ["## Plots", ""] + plot_lines + [""]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(report.path, "\n".join(lines))
    return report
