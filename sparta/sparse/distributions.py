"""How a global density is split over layers; pure functions of the layer shapes.

- ``uniform``: every layer at the global density.
- ``er`` (Erdős–Rényi; Mocanu et al. 2018, "Scalable training of artificial neural networks with
  adaptive sparse connectivity", SET): density ∝ (n_in + n_out) / (n_in · n_out), kernel dims ignored.
- ``erk`` (ER-Kernel; Evci et al. 2020, "Rigging the Lottery", RigL): density ∝ sum(shape) / prod(shape),
  kernel dims included.
- ``igq`` (Ideal Gas Quotas; Vysogorets & Kempe 2021, "Connectivity Matters"; the default of Flying
  Bird): density_l = 1 / (1 + F · numel_l), with F > 0 found by bisection.

Every distribution meets the global density as a numel-weighted average and keeps each layer at
density <= 1: for ER/ERK, layers that would exceed 1 are fixed dense and the rest re-solved, as in
RigL's ERK. ``exact_counts`` turns densities into integer kept-weight counts whose total is exact, and
``random_masks`` draws masks with exactly those counts.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import ConfigError

DISTRIBUTIONS = ("uniform", "er", "erk", "igq")


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")


def layer_densities(kind: str, shapes: Mapping[str, torch.Size], density: float) -> dict[str, float]:
    """``{name: density of that layer}`` whose numel-weighted mean is ``density``."""
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"unknown layer-density distribution {kind!r}; valid: {', '.join(DISTRIBUTIONS)}")
    _check_density(density)
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    if density == 1.0 or kind == "uniform" or not numels:
        return {name: float(density) for name in shapes}
    if kind == "igq":
        return _igq(numels, density)
    if kind == "er":  # convs (out, in, kh, kw): only the (out, in) connectivity counts
        scores = {name: (s[0] + s[1]) / (s[0] * s[1]) for name, s in shapes.items()}
    else:  # erk
        scores = {name: sum(s) / math.prod(s) for name, s in shapes.items()}
    return _proportional_capped(numels, scores, density)


def _proportional_capped(numels: dict[str, int], scores: dict[str, float], density: float) -> dict[str, float]:
    """density_l = min(1, eps · score_l), eps chosen so that sum_l numel_l · density_l = density · total.

    RigL's ERK loop: solve eps over the non-dense layers; any layer pushed above 1 is fixed dense and
    eps re-solved. Fixing such a layer only raises eps, so fixing all offenders at once is equivalent to
    RigL's one-at-a-time loop; it ends because at least one layer stays sparse when density < 1.
    """
    budget = density * sum(numels.values())  # kept weights wanted
    dense: set[str] = set()
    while True:
        rest = [n for n in numels if n not in dense]
        eps = (budget - sum(numels[n] for n in dense)) / sum(numels[n] * scores[n] for n in rest)
        over = {n for n in rest if eps * scores[n] > 1.0}
        if not over:
            return {n: 1.0 if n in dense else eps * scores[n] for n in numels}
        dense |= over


def _igq(numels: dict[str, int], density: float) -> dict[str, float]:
    """IGQ: d_l = 1 / (1 + F · n_l); kept(F) = sum_l n_l · d_l falls from total (F=0) to 0, so bisect F."""
    target = density * sum(numels.values())

    def kept(force: float) -> float:
        return sum(n / (1.0 + force * n) for n in numels.values())

    low, high = 0.0, 1.0
    while kept(high) > target:
        high *= 2.0
    for _ in range(200):  # float64 bisection: far below one weight after ~60 halvings; stops when stuck
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if kept(mid) > target:
            low = mid
        else:
            high = mid
    force = 0.5 * (low + high)
    return {name: 1.0 / (1.0 + force * n) for name, n in numels.items()}


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def exact_counts(
    shapes: Mapping[str, torch.Size], densities: Mapping[str, float], density: float
) -> dict[str, int]:
    """Integer kept-weight counts per layer summing to exactly ``round(density · total)``.

    Each layer's ``density_l · numel_l`` is rounded once; the total is then fixed by moving layers one
    weight at a time, largest rounding remainders first (ties: earlier layer first). No layer goes above
    its numel or below 1 weight (an empty layer would cut the network).
    """
    _check_density(density)
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    target = _round_half_up(density * sum(numels.values()))
    if target < len(numels):
        raise ConfigError(f"density {density} keeps {target} weights, fewer than one per layer ({len(numels)})")
    wanted = {name: densities[name] * numels[name] for name in numels}
    counts = {name: min(max(_round_half_up(wanted[name]), 1), numels[name]) for name in numels}
    missing = target - sum(counts.values())
    while missing != 0:
        step = 1 if missing > 0 else -1
        # remainder = wanted - count: most under-served layers gain first, most over-served lose first
        movable = [n for n in numels if (counts[n] < numels[n] if step > 0 else counts[n] > 1)]
        movable.sort(key=lambda n: step * (counts[n] - wanted[n]))  # stable: ties keep layer order
        for name in movable[: abs(missing)]:
            counts[name] += step
            missing -= step
    return counts


def random_masks(
    shapes: Mapping[str, torch.Size], counts: Mapping[str, int], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``{name: bool mask of that shape}`` with exactly ``counts[name]`` True at uniformly random positions.

    Layers are drawn in ``shapes`` order from the one CPU ``generator``, so a seed fixes every mask.
    """
    masks = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if not 0 <= counts[name] <= numel:
            raise ValueError(f"{name}: cannot keep {counts[name]} of {numel} weights")
        keep = torch.zeros(numel, dtype=torch.bool)
        keep[torch.randperm(numel, generator=generator)[: counts[name]]] = True
        masks[name] = keep.view(shape)
    return masks
