"""Robustness per training FLOP: each run's final robust accuracy, and the Pareto front over
(training FLOPs, robust accuracy) that ``sparta report`` marks.

A run's final robust accuracy is read from, first found first:

1. ``final-eval.json`` in the run directory (``sparta reproduce``): AutoAttack (standard) of the final
   model on the first ``n`` test images;
2. ``checkpoints/last.eval-autoattack.json`` (``sparta eval RUN/checkpoints/last.pt --attack
   autoattack``): its row of kind ``autoattack``, with its ``n``;
3. else the final epoch's test RA under the per-epoch evaluation attack (PGD-k of the run's
   ``eval_protocol``, on ``eval.test_subset`` images), labelled as that PGD, never as AutoAttack.

Numbers are compared only within one *measurement*: the same attack, ε and number of test images
(``FinalRA.measurement``). The front is computed separately within each measurement, so an
AutoAttack number never competes with a PGD number (PGD overestimates robustness) nor a number on
100 images with one on 1,000. Seeds of one config (``sparta.runs.group_runs``) give one point, the
mean over seeds, only when every seed was measured alike (else the config falls back to the PGD
numbers all its seeds have, and says so). Unfinished runs are listed but kept off the front: their
FLOPs and accuracy are not final.
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import fmt
from .errors import SpartaError
from .protocol import eval_protocol
from .runs import Run, finite

FINAL_EVAL = "final-eval.json"
CHECKPOINT_EVAL = "checkpoints/last.eval-autoattack.json"
AUTOATTACK = "AutoAttack"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (training FLOPs, robust accuracy) point: whether it is on the Pareto front.

    A point is dominated, hence off the front, when another point has FLOPs <= and accuracy >= with
    at least one of the two strict. Equal points do not dominate each other: all of them are on the
    front (or all off). O(len(points)^2), for the handful of configs of a report.
    """
    pts = [(float(f), float(a)) for f, a in points]
    for f, a in pts:
        if not (math.isfinite(f) and math.isfinite(a)):
            raise ValueError(f"pareto_front needs finite (flops, accuracy) points, got ({f}, {a})")
    return [not any(g <= f and b >= a and (g < f or b > a) for g, b in pts) for f, a in pts]


@dataclass(frozen=True)
class FinalRA:
    """One run's final robust accuracy and how it was measured."""

    robust_acc: float  # percent
    attack: str  # "AutoAttack" or "PGD-<k>" (the per-epoch evaluation attack)
    eps: float | None
    n: int | None  # test images; None: the whole test set (its size is not recorded in the run)
    source: str  # the file it was read from, relative to the run directory, or "metrics (final epoch)"

    @property
    def measurement(self) -> str:
        """What makes two numbers comparable: attack, ε and test images, as one line."""
        images = "all test images" if self.n is None else f"{self.n} test images"
        return f"{self.attack}, ε = {fmt.eps(self.eps, sig=6, fraction_below=math.inf)}, {images}"


def _read_json(path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpartaError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); delete it and evaluate "
                          "the run again") from None
    if not isinstance(data, dict):
        raise SpartaError(f"{path} does not hold a JSON object; delete it and evaluate the run again")
    return data


def _count(value: Any, path, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpartaError(f"{path} has no valid image count {key!r} (got {value!r}); delete it and evaluate "
                          "the run again")
    return value


def _percent(value: Any, path, key: str) -> float:
    v = finite(value)
    if v is None or not 0 <= v <= 100:
        raise SpartaError(f"{path} has no valid accuracy {key!r} in percent (got {value!r}); delete it and "
                          "evaluate the run again")
    return v


def _protocol(run: Run) -> dict[str, Any]:
    return (run.summary or {}).get("eval_protocol") or eval_protocol(run.config)


def autoattack_result(run: Run) -> FinalRA | None:
    """The final model's AutoAttack accuracy when the run directory holds one (see the module doc)."""
    path = run.path / FINAL_EVAL
    if path.is_file():
        d = _read_json(path)
        # sparta reproduce evaluates with the run's own eval eps (final-eval.json does not repeat it)
        return FinalRA(_percent(d.get("autoattack"), path, "autoattack"), AUTOATTACK, finite(_protocol(run).get("eps")),
                       _count(d.get("n"), path, "n"), FINAL_EVAL)
    path = run.path / CHECKPOINT_EVAL
    if path.is_file():
        d = _read_json(path)
        rows = [r for r in d.get("rows") or [] if isinstance(r, dict) and r.get("kind") == "autoattack"]
        if len(rows) != 1:
            raise SpartaError(f"{path} has {len(rows)} rows of kind 'autoattack', expected 1; run `sparta eval "
                              f"{run.path / 'checkpoints' / 'last.pt'} --attack autoattack` again")
        row = rows[0]
        eps = finite(row.get("eps"))
        return FinalRA(_percent(row.get("robust_acc"), path, "robust_acc"), AUTOATTACK,
                       eps if eps is not None else finite(_protocol(run).get("eps")),
                       _count(row.get("n"), path, "n"), CHECKPOINT_EVAL)
    return None


def pgd_result(run: Run) -> FinalRA | None:
    """The final epoch's test RA under the per-epoch evaluation attack; None when not measured."""
    ra = run.stats()["ra_final"]
    p = _protocol(run)
    if ra is None or p.get("attack") in (None, "none"):
        return None
    attack = f"PGD-{p.get('steps')}" if p.get("attack") == "pgd" else str(p.get("attack")).upper()
    n = p.get("test_subset")
    return FinalRA(ra, attack, finite(p.get("eps")), n if isinstance(n, int) and n > 0 else None,
                   "metrics (final epoch)")


def final_robustness(run: Run) -> FinalRA | None:
    """AutoAttack where measured, else the per-epoch PGD fallback, else None."""
    return autoattack_result(run) or pgd_result(run)


def binomial_se(acc_percent: float, n: int) -> float:
    """Standard error (percentage points) of an accuracy measured on ``n`` independent test images."""
    p = acc_percent / 100
    return 100 * math.sqrt(p * (1 - p) / n)


@dataclass
class CostPoint:
    """One config (its seeds) in the robustness-per-FLOP table."""

    label: str
    method: str
    seeds: int
    finished: bool
    density: float | None  # mean over seeds
    train_flops: float | None  # mean over seeds, every stage
    final: list[FinalRA]  # one per seed, all of one measurement; [] when none is usable
    note: str = ""
    dense_share: float | None = None  # train_flops / the dense config's
    on_front: bool | None = None  # None: not compared (no FLOPs or RA, or unfinished)
    alone: bool = False  # on the front because nothing else was measured alike

    @property
    def robust_acc(self) -> float | None:
        return statistics.fmean(f.robust_acc for f in self.final) if self.final else None

    @property
    def se(self) -> float | None:
        """Binomial SE of the mean over seeds: sqrt(sum of each seed's SE^2) / seeds (test sampling only,
        not the spread between seeds); None when a seed's image count is unknown."""
        variances = [binomial_se(f.robust_acc, f.n) ** 2 for f in self.final if f.n is not None]
        if not self.final or len(variances) < len(self.final):
            return None
        return math.sqrt(sum(variances)) / len(self.final)

    @property
    def measurement(self) -> str | None:
        return self.final[0].measurement if self.final else None

    def to_dict(self) -> dict[str, Any]:
        first = self.final[0] if self.final else None
        return {"label": self.label, "method": self.method, "seeds": self.seeds, "density": self.density,
                "train_flops": self.train_flops, "train_flops_dense_share": self.dense_share,
                "robust_acc": self.robust_acc, "se": self.se, "attack": first and first.attack,
                "eps": first and first.eps, "n": first and first.n, "sources": sorted({f.source for f in self.final}),
                "measurement": self.measurement, "on_front": self.on_front, "note": self.note}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if values and len(present) == len(values) else None


def group_point(group: Sequence[Run], label: str) -> CostPoint:
    """The point of one config: AutoAttack when every seed has it, measured alike; else the PGD fallback."""
    stats = [r.stats() for r in group]
    point = CostPoint(label=label, method=group[0].method, seeds=len(group), finished=all(r.finished for r in group),
                      density=_mean([s["density"] for s in stats]),
                      train_flops=_mean([s["train_flops"] for s in stats]), final=[])
    aa = [a for a in (autoattack_result(r) for r in group) if a is not None]
    if len(aa) == len(group) and len({a.measurement for a in aa}) == 1:
        point.final = aa
        return point
    pgd = [p for p in (pgd_result(r) for r in group) if p is not None]
    have = len(aa)
    if len(pgd) == len(group) and len({p.measurement for p in pgd}) == 1:
        point.final = pgd
        if have:
            why = f"on {have} of {len(group)} seeds" if have < len(group) else "on different test images or ε per seed"
            point.note = f"AutoAttack only {why}: PGD for all seeds"
    else:
        point.note = "seeds measured differently (or not at all): no robust accuracy"
    return point


def cost_points(groups: Sequence[Sequence[Run]], labels: Sequence[str]) -> list[CostPoint]:
    """One point per config, its front flag within its measurement, its FLOPs as a share of the dense
    config's (when exactly one dense config recorded FLOPs); sorted by training FLOPs (missing last)."""
    points = [group_point(g, lab) for g, lab in zip(groups, labels)]
    dense = [p.train_flops for p in points if p.method == "dense" and p.train_flops]
    if len(dense) == 1:
        for p in points:
            p.dense_share = None if p.train_flops is None else p.train_flops / dense[0]
    comparable = [p for p in points if p.finished and p.train_flops is not None and p.final]
    for m in dict.fromkeys(p.measurement for p in comparable):
        members = [p for p in comparable if p.measurement == m]
        coords = []
        for p in members:
            assert p.train_flops is not None and p.robust_acc is not None  # comparable: FLOPs and a final RA
            coords.append((p.train_flops, p.robust_acc))
        for p, flag in zip(members, pareto_front(coords)):
            p.on_front, p.alone = flag, len(members) == 1
    for p in points:
        if not p.finished:
            p.note = "; ".join(filter(None, [p.note, "unfinished: kept off the front"]))
    return sorted(points, key=lambda p: (p.train_flops is None, p.train_flops or 0.0))
