"""Paired differences between runs scored on the same images, and their intervals over seeds.

Every run of a reproduction is evaluated on the same test images (and the same gap subset of
training images), so the difference between two runs is judged image by image: for a per-image
quantity ``u_i`` (e.g. ``a_i - b_i``, the outcomes of runs a and b on image i, 1 = correct) the
difference is ``mean(u)`` and its standard error over images ``sd(u) / sqrt(n)``, which is far
smaller than the unpaired ``sqrt(se_a^2 + se_b^2)`` when the runs agree on most images.

Over ``k`` seeds (seed j of run a paired with seed j of run b) the difference is the mean of the
per-seed differences ``d_j`` and its standard error ``sd(d_j) / sqrt(k)``, with Student's t at
``k - 1`` degrees of freedom. The seed spread already holds each seed's image noise, so image noise
is not added again. One seed measures no seed spread: its interval is the image-level one (normal
quantile), and a claim it supports is *evidence*, never *reproduced*. Inference is on the fixed
test images, as the papers' tables are.

Pure Python, so readers of results need no torch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .pareto import binomial_se

Z975 = 1.959963984540054  # the normal 97.5% quantile: two-sided 95% intervals


# Student's t 97.5% quantiles at 1..30 degrees of freedom (two-sided 95%), the standard table
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """Student's t 97.5% quantile at ``df`` degrees of freedom (4.303 at 2, 2.776 at 4): the table up to
    30, above it the Cornish-Fisher expansion around the normal quantile (error below 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2) + \
        (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3)


@dataclass(frozen=True)
class Paired:
    """One seed's difference (points) between two runs, and its standard error over the images.
    ``paired``: False where per-image outcomes were missing and the error is the unpaired one."""

    diff: float
    se: float
    paired: bool = True

    def __add__(self, other: Paired) -> Paired:
        """The sum of differences measured on disjoint image sets (the gap's training and test images)."""
        return Paired(self.diff + other.diff, math.hypot(self.se, other.se), self.paired and other.paired)

    def __neg__(self) -> Paired:
        return Paired(-self.diff, self.se, self.paired)


def linear(terms: Sequence[tuple[float, int]], n: int) -> Paired:
    """``u_i = sum_k w_k * bit_i(x_k)`` over ``n`` images (``terms``: (w_k, outcome vector x_k)); its
    mean in points and the standard error of that mean, from popcounts alone.

    sum(u) = sum_k w_k |x_k|; sum(u^2) = sum_k sum_l w_k w_l |x_k & x_l|."""
    if n < 2:
        raise ValueError(f"a paired difference needs at least 2 images, got {n}")
    s1 = sum(w * x.bit_count() for w, x in terms)
    s2 = sum(wk * wl * (xk & xl).bit_count() for wk, xk in terms for wl, xl in terms)
    return from_moments(s1, s2, n)


def from_moments(s1: float, s2: float, n: int) -> Paired:
    """Mean (points) and its SE from ``sum(u)`` and ``sum(u^2)`` over ``n`` images."""
    mean = s1 / n
    var = max(s2 / n - mean * mean, 0.0) * n / (n - 1)  # the unbiased sample variance
    return Paired(100.0 * mean, 100.0 * math.sqrt(var / n))


def unpaired(a: float, b: float, n_a: int, n_b: int) -> Paired:
    """``a - b`` (percent) without per-image outcomes: the binomial errors of both, as if independent
    (conservative: runs on the same images are positively correlated)."""
    return Paired(a - b, math.hypot(binomial_se(a, n_a), binomial_se(b, n_b)), paired=False)


@dataclass(frozen=True)
class Interval:
    """A difference over seeds: its value, standard error, the quantile of its 95% interval."""

    value: float
    se: float
    crit: float
    seeds: int
    paired: bool = True

    @property
    def half(self) -> float:
        return self.crit * self.se

    @property
    def lo(self) -> float:
        return self.value - self.half

    @property
    def hi(self) -> float:
        return self.value + self.half

    def __str__(self) -> str:
        how = (f"t({self.seeds - 1}) over {self.seeds} seeds" if self.seeds > 1 else
               "one seed, over images" + ("" if self.paired else ", unpaired"))
        return f"{self.value:+.2f} [{self.lo:+.2f}, {self.hi:+.2f}] (95%, {how})"


def over_seeds(pairs: Sequence[Paired]) -> Interval:
    """The 95% interval of the mean difference over the seeds in ``pairs`` (seed j of a against seed j of b)."""
    if not pairs:
        raise ValueError("no seeds to compare")
    k = len(pairs)
    paired = all(p.paired for p in pairs)
    if k == 1:
        return Interval(pairs[0].diff, pairs[0].se, Z975, 1, paired)
    mean = sum(p.diff for p in pairs) / k
    sd = math.sqrt(sum((p.diff - mean) ** 2 for p in pairs) / (k - 1))  # statistics.stdev, without its exact fractions
    return Interval(mean, sd / math.sqrt(k), t975(k - 1), k, paired)
