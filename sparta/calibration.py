"""Simulated reproductions with known truths, to measure how often each claim rule returns each verdict.

A reproduction is simulated image by image. Every test image has a difficulty class (``CLASSES``
equal-sized classes, their latent difficulties the quantiles of N(0, ``TAU``^2)); given its class,
the runs' outcomes on it are independent, so runs agree on easy and hard images as real runs do
(the phi correlation of two runs' outcomes is about 0.4). A run's outcomes at its best and final
epochs are tied (``EPOCH_TIE``: 0 = independent given the class, 1 = as equal as their accuracies
allow). Each seed moves a run's accuracies by N(0, ``seed_sd``^2) points (best and final together),
the gap-subset accuracy by N(0, ``train_sd``^2). The images of one class are exchangeable, so a
seed's outcomes are the counts of each joint outcome pattern (a multinomial draw per class), laid
out as bit vectors (``sparta.outcomes``) that the claim rules read exactly as they read a real run.

``simulate`` returns, per simulated reproduction, one ``Scores`` per seed of every run; the
calibration tests and docs/reproduce.md's table of operating characteristics use it.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy.special import ndtr

from .claims import PAPER, VERDICTS, Scores
from .outcomes import Outcomes, pack

CLASSES = 8
TAU = 1.2
EPOCH_TIE = 0.6
_NORMAL = NormalDist()
_ETA = np.array([_NORMAL.inv_cdf((c + 0.5) / CLASSES) * TAU for c in range(CLASSES)])  # (CLASSES,)


@dataclass(frozen=True)
class Truth:
    """A run's true test RA at its best and final epochs and its RA on the gap training subset (percent)."""

    ra_best: float
    ra_final: float
    train_ra: float
    train_flops: float = 1.0


@dataclass(frozen=True)
class Design:
    """The size of a reproduction: test and gap images, seeds, seed-to-seed spreads (points)."""

    n_test: int
    n_gap: int
    seeds: int
    seed_sd: float
    train_sd: float


PAPER_SIZE = Design(n_test=10_000, n_gap=1_000, seeds=10, seed_sd=0.5, train_sd=1.0)
CPU_MINI_SIZE = Design(n_test=500, n_gap=500, seeds=3, seed_sd=1.0, train_sd=4.0)


def _offset(p: np.ndarray) -> np.ndarray:
    """The latent offset m with mean over classes of Phi(eta_c + m) = p (elementwise; p in (0, 1))."""
    lo, hi = np.full(p.shape, -10.0), np.full(p.shape, 10.0)
    for _ in range(40):  # bisection: 2^-40 of the bracket
        mid = (lo + hi) / 2
        high = _phi(_ETA + mid[..., None]).mean(-1) > p
        hi, lo = np.where(high, mid, hi), np.where(high, lo, mid)
    return (lo + hi) / 2


def _phi(x: np.ndarray) -> np.ndarray:
    return ndtr(x)


def _pair(pb: np.ndarray, pf: np.ndarray) -> np.ndarray:
    """Joint (best, final) outcome probabilities (..., 4), cells ordered (0,0), (0,1), (1,0), (1,1)."""
    p11 = pb * pf + EPOCH_TIE * (np.minimum(pb, pf) - pb * pf)
    return np.stack([1 - pb - pf + p11, pf - p11, pb - p11, p11], -1)


def _counts(rng: np.random.Generator, marginals: np.ndarray, n: int) -> np.ndarray:
    """Counts (sims, seeds, cells) of joint patterns of independent-given-class parts: ``marginals``
    (sims, seeds, parts, CLASSES, m) holds each part's per-class pattern probabilities."""
    sims, seeds, parts, classes, _ = marginals.shape
    joint = marginals[:, :, 0]
    for i in range(1, parts):  # the outer product of the parts' patterns, part 0 the most significant
        joint = (joint[..., :, None] * marginals[:, :, i][..., None, :]).reshape(sims, seeds, classes, -1)
    joint = np.clip(joint, 0, None)
    joint /= joint.sum(-1, keepdims=True)
    per_class = rng.multinomial(n // classes, joint)  # (sims, seeds, CLASSES, cells)
    return per_class.sum(2)


def _vectors(counts: np.ndarray, bits: int) -> list[int]:
    """``bits`` outcome vectors (image i = bit i) holding ``counts[j]`` images of pattern j each; bit
    ``bits - 1 - b`` of pattern j is vector b's outcome (images of one pattern are exchangeable, so
    their order does not matter)."""
    ids = np.repeat(np.arange(len(counts)), counts)  # (n,) the pattern of each image
    return [pack((ids >> (bits - 1 - b)) & 1) for b in range(bits)]


def simulate(truths: Mapping[str, Truth], design: Design, sims: int,
             seed: int = 0) -> Iterator[dict[str, list[Scores]]]:
    """``sims`` simulated reproductions of the runs in ``truths``: each a role -> [Scores per seed]."""
    rng = np.random.default_rng(seed)
    roles = list(truths)
    k, r = design.seeds, len(roles)
    t = np.array([[truths[x].ra_best, truths[x].ra_final, truths[x].train_ra] for x in roles])  # (r, 3)
    base = _offset(t / 100)  # (r, 3) latent offsets of the true accuracies
    slope = (np.exp(-0.5 * (_ETA + base[..., None]) ** 2) / np.sqrt(2 * np.pi)).mean(-1)  # (r, 3) d acc / d offset
    shift = rng.normal(0, design.seed_sd, (sims, k, r, 1)) * np.ones(2)  # best and final move together
    shift = np.concatenate([shift, rng.normal(0, design.train_sd, (sims, k, r, 1))], -1)  # (sims, k, r, 3) points
    cls = _phi(_ETA + (base + shift / 100 / slope)[..., None])  # (sims, k, r, 3, CLASSES) per-class accuracies
    test = _counts(rng, _pair(cls[..., 0, :], cls[..., 1, :]), design.n_test)  # (sims, k, 4^r)
    gap_marg = np.stack([1 - cls[..., 2, :], cls[..., 2, :]], -1)  # (sims, k, r, CLASSES, 2)
    gap = _counts(rng, gap_marg, design.n_gap)  # (sims, k, 2^r)
    for s in range(sims):
        out: dict[str, list[Scores]] = {x: [] for x in roles}
        for j in range(k):
            tv, gv = _vectors(test[s, j], 2 * r), _vectors(gap[s, j], r)
            for i, x in enumerate(roles):
                best, final, g = tv[2 * i], tv[2 * i + 1], gv[i]
                o_best = Outcomes(design.n_test, best, best)
                o_final = Outcomes(design.n_test, final, final)
                o_gap = Outcomes(design.n_gap, g, g)
                out[x].append(Scores(o_best.accuracy(), o_final.accuracy(), design.n_test, o_gap.accuracy(),
                                     design.n_gap, o_best, o_final, o_gap, truths[x].train_flops, None))
        yield out


def rates(verdicts: Sequence[str]) -> dict[str, float]:
    """The share of each verdict among ``verdicts``."""
    return {v: sum(x == v for x in verdicts) / max(len(verdicts), 1) for v in VERDICTS}


def paper_truths(dataset: str) -> dict[str, Truth]:
    """The paper's table as truths (train RA = final test RA + gap; FLOPs in its units)."""
    return {role: Truth(best, final, final + gap, flops) for role, (best, final, gap, flops) in PAPER[dataset].items()}

