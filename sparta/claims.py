"""The papers' claims, checked on the runs of one ``sparta reproduce`` profile.

Each claim is a pure function of the runs' scores (``Scores``: one per seed of a run, with the
per-image outcomes of its best and final test evaluations and of its gap subset) and returns a
``Claim`` whose verdict is ``reproduced``, ``evidence`` (what would be ``reproduced``, from one seed),
``not reproduced`` or ``inconclusive``, with the numbers behind it. The rules are fixed here before
any result is seen, every rule can return each of its verdicts (tests), and their operating
characteristics are measured on simulated reproductions with known truths
(``tests/test_claims_calibration.py``; the rates are in docs/reproduce.md).

Statistics (``sparta.paired``): runs are scored on the same images, so a difference between two
runs is judged image by image within a seed, then over seeds with Student's t at ``k - 1`` degrees
of freedom. Each claim concerns one method against one other run, so no verdict hangs on the worst
of several comparisons, except "highest final RA", which is such a conjunction by its meaning.

- Smaller/larger claims (superiority): the 95% interval wholly on the claimed side -> reproduced
  (evidence, from one seed); wholly on the other side -> not reproduced; else inconclusive, marked
  *underpowered* when the interval's half-width is at least the paper's own effect (a perfect
  reproduction could not have been confirmed).
- Comparable claims (non-inferiority against ``COMPARABLE_RA_BOUND``): the interval wholly above
  ``-bound`` -> holds; wholly below -> not reproduced; else inconclusive, *underpowered* when the
  half-width is at least the bound.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .fmt import flops as _flops  # a bare number: "1.23e+15"
from .fmt import percent as _pct  # "44.50%"
from .fmt import share as _share  # "31%"
from .outcomes import Outcomes
from .paired import Interval, Paired, linear, over_seeds, unpaired

REPRODUCED, EVIDENCE, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "evidence", "not reproduced", "inconclusive"
VERDICTS = (REPRODUCED, EVIDENCE, NOT_REPRODUCED, INCONCLUSIVE)
# the papers' claims concern these runs; Robust Bird's channel variant is sparta's extension (the
# reference code has no working channel mode), reported beside them but never part of a verdict
PAPER_SPARSE_ROLES = ("robust_bird", "flying_bird", "flying_bird_plus")
LABELS = {"dense": "dense PGD-AT", "robust_bird": "Robust Bird", "robust_bird_channel": "Robust Bird (channel)",
          "flying_bird": "Flying Bird", "flying_bird_plus": "Flying Bird+", "boosting_ticket": "boosting ticket",
          "boosting_control": "boosting control (random reinit)"}

# "Comparable RA": the largest best-RA loss (points) that still counts, declared before the runs. The
# paper calls Robust Bird comparable at -0.92 (CIFAR-10) and -1.39 (CIFAR-100) points; the bound
# must lie above such losses by more than a well-powered design's 95% half-width, or a perfect
# reproduction of -1.39 would fail about half the time. 2.5 leaves 1.1 points for that half-width.
COMPARABLE_RA_BOUND = 2.5
# "fewer FLOPs": the least saving of training FLOPs, against the dense PGD-AT run of the same
# protocol, that counts as a saving (the paper's table: 69-73%; sparta counts about 50% at density
# 0.2, because IGQ layer densities keep 52% of PreAct ResNet-18's dense inference FLOPs)
MIN_FLOPS_SAVING = {"robust_bird": 0.3, "flying_bird": 0.3}
# boosting (Li et al.): the ticket's final RA, finder included, within this of the dense final RA
BOOSTING_RA_BOUND = COMPARABLE_RA_BOUND

# The Flying Bird paper's ResNet-18 table at density 0.2 (RA = PGD-20; best RA, final RA, robust gap =
# final train RA - final test RA; training FLOPs x1e17, Robust Bird's including its search stage)
PAPER = {
    "cifar10": {"dense": (51.10, 43.61, 38.82, 772.41), "robust_bird": (50.18, 46.10, 23.37, 209.54),
                "flying_bird": (51.62, 46.37, 28.90, 239.38), "flying_bird_plus": (51.70, 47.51, 23.89, 120.04)},
    "cifar100": {"dense": (26.93, 19.62, 54.56, 772.41), "robust_bird": (25.54, 20.82, 25.46, 189.80),
                 "flying_bird": (26.64, 22.00, 27.46, 237.12), "flying_bird_plus": (26.66, 23.37, 20.12, 100.90)},
}


def paper_value(dataset: str, role: str, quantity: str) -> float | None:
    """The paper's ``quantity`` (ra_best, ra_final, gap, overfitting, flops_share) of ``role``, else None."""
    row = PAPER.get(dataset, PAPER["cifar10"]).get(role)
    if row is None:
        return None
    best, final, gap, flops = row
    dense_flops = PAPER.get(dataset, PAPER["cifar10"])["dense"][3]
    return {"ra_best": best, "ra_final": final, "gap": gap, "overfitting": best - final,
            "flops_share": flops / dense_flops}[quantity]


@dataclass(frozen=True)
class Scores:
    """One seed of a run as the claims see it: test RA at the best and final epochs on ``n_test``
    images, RA on the ``n_gap`` gap training images at the end, their per-image outcomes where the
    run recorded them (None: a run of an older version; its differences are judged unpaired)."""

    ra_best: float | None
    ra_final: float | None
    n_test: int
    train_ra: float | None = None
    n_gap: int | None = None
    best: Outcomes | None = None
    final: Outcomes | None = None
    gap: Outcomes | None = None
    train_flops: float | None = None
    density: float | None = None


@dataclass
class Claim:
    claim: str
    verdict: str
    evidence: list[str] = field(default_factory=list)  # one line per run or comparison, with numbers
    why: str = ""  # how the verdict follows from the evidence
    seeds: int = 1
    detail: str = ""  # e.g. "underpowered: +-4.1 at 95% against the paper's 3.4"

    @property
    def shown(self) -> str:
        """The verdict as printed: with its detail, e.g. "inconclusive (underpowered: ...)"."""
        return f"{self.verdict} ({self.detail})" if self.detail else self.verdict

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- per-seed differences (a - b)


def ra_diff(which: str) -> Callable[[Scores, Scores], Paired | None]:
    """Test RA at the ``best`` or ``final`` epoch of a minus b, paired on the test images."""
    def diff(a: Scores, b: Scores) -> Paired | None:
        oa, ob = getattr(a, which), getattr(b, which)
        if oa is not None and ob is not None and oa.n == ob.n:
            return linear([(1, oa.robust), (-1, ob.robust)], oa.n)
        va, vb = getattr(a, f"ra_{which}"), getattr(b, f"ra_{which}")
        return None if va is None or vb is None else unpaired(va, vb, a.n_test, b.n_test)
    return diff


def overfitting_diff(a: Scores, b: Scores) -> Paired | None:
    """(best - final test RA) of a minus that of b: four outcomes of each test image."""
    if (a.best is not None and a.final is not None and b.best is not None and b.final is not None
            and len({a.best.n, a.final.n, b.best.n, b.final.n}) == 1):
        return linear([(1, a.best.robust), (-1, a.final.robust), (-1, b.best.robust), (1, b.final.robust)], a.best.n)
    best, final = ra_diff("best")(a, b), ra_diff("final")(a, b)
    return None if best is None or final is None else Paired(best.diff - final.diff, (best + final).se, False)


def gap_diff(a: Scores, b: Scores) -> Paired | None:
    """(gap-subset RA - final test RA) of a minus that of b: the training and the test images are
    two disjoint samples, so their paired differences add."""
    final = ra_diff("final")(a, b)
    if a.gap is not None and b.gap is not None and a.gap.n == b.gap.n:
        train = linear([(1, a.gap.robust), (-1, b.gap.robust)], a.gap.n)
    elif a.train_ra is not None and b.train_ra is not None and a.n_gap is not None and b.n_gap is not None:
        train = unpaired(a.train_ra, b.train_ra, a.n_gap, b.n_gap)
    else:
        return None
    return None if final is None else train + (-final)


def compare(a: Sequence[Scores], b: Sequence[Scores],
            diff: Callable[[Scores, Scores], Paired | None]) -> Interval | None:
    """The interval of ``diff`` (a - b) over the seeds both runs have (seed j with seed j)."""
    pairs = [diff(x, y) for x, y in zip(a, b)]
    present = [p for p in pairs if p is not None]
    return None if not pairs or len(present) < len(pairs) else over_seeds(present)


# ---------------------------------------------------------------- verdicts


def holds(seeds: int) -> str:
    """The verdict of a claim that holds: ``reproduced`` over several seeds, ``evidence`` from one."""
    return REPRODUCED if seeds > 1 else EVIDENCE


def directional(iv: Interval | None, *, smaller: bool, effect: float | None) -> tuple[str, str]:
    """(verdict, detail) of "a < b" (``smaller``) or "a > b" for the interval of a - b. ``effect``: the
    paper's difference (its size), against which an inconclusive interval is called underpowered."""
    if iv is None:
        return INCONCLUSIVE, "not measured"
    lo, hi = (-iv.hi, -iv.lo) if smaller else (iv.lo, iv.hi)  # the claimed direction made positive
    if lo > 0:
        return holds(iv.seeds), ""
    if hi < 0:
        return NOT_REPRODUCED, ""
    return INCONCLUSIVE, _underpowered(iv, effect, "the paper's")


def non_inferior(iv: Interval | None, bound: float) -> tuple[str, str]:
    """(verdict, detail) of "a is at most ``bound`` below b" for the interval of a - b."""
    if iv is None:
        return INCONCLUSIVE, "not measured"
    if iv.lo > -bound:
        return holds(iv.seeds), ""
    if iv.hi < -bound:
        return NOT_REPRODUCED, ""
    return INCONCLUSIVE, _underpowered(iv, bound, "a bound of")


def _underpowered(iv: Interval, scale: float | None, what: str) -> str:
    if scale is None or iv.half < abs(scale):
        return ""
    return f"underpowered: +-{iv.half:.2f} at 95% against {what} {abs(scale):.2f}"


_DIRECTIONAL = ("the 95% interval of the paired difference wholly on the claimed side -> reproduced (evidence "
                "when judged on one seed), wholly on the other side -> not reproduced, else inconclusive (underpowered "
                "when its half-width is at least the paper's difference)")


def smaller_than(runs: Mapping[str, Sequence[Scores]], role: str, reference: str, quantity: str,
                 dataset: str = "cifar10") -> Claim:
    """``role`` has a smaller ``quantity`` ("overfitting": best - final test RA, "gap": robust
    generalization gap) than ``reference``."""
    diff, what = {"overfitting": (overfitting_diff, "robust overfitting (RA best - final)"),
                  "gap": (gap_diff, "robust generalization gap")}[quantity]
    iv = compare(runs[role], runs[reference], diff)
    mine, ref = paper_value(dataset, role, quantity), paper_value(dataset, reference, quantity)
    effect = None if mine is None or ref is None else mine - ref
    verdict, detail = directional(iv, smaller=True, effect=effect)
    evidence = [f"{LABELS[role]}: {_mean_of(runs[role], quantity)}, {LABELS[reference]}: "
                f"{_mean_of(runs[reference], quantity)}",
                f"difference {iv if iv is not None else '-'} points; the paper's: {_signed(effect)}"]
    return Claim(f"{LABELS[role]} has a smaller {what} than {LABELS[reference]}", verdict, evidence, _DIRECTIONAL,
                 seeds=_k(runs, [role, reference]), detail=detail)


def comparable_ra_at_fewer_flops(runs: Mapping[str, Sequence[Scores]], role: str, dataset: str = "cifar10",
                                 bound: float = COMPARABLE_RA_BOUND) -> Claim:
    """``role`` (Robust Bird, Flying Bird) loses at most ``bound`` points of best RA against dense, with
    training FLOPs at most ``1 - MIN_FLOPS_SAVING[role]`` of the dense run's (search included)."""
    iv = compare(runs[role], runs["dense"], ra_diff("best"))
    verdict, detail = non_inferior(iv, bound)
    share = _flops_share(runs[role], runs["dense"])
    most = 1 - MIN_FLOPS_SAVING[role]
    if share is None or share > most:
        verdict, detail = NOT_REPRODUCED, "no saving" if share is None or share >= 1 else f"saving below {1 - most:.0%}"
    paper = paper_value(dataset, role, "flops_share")
    evidence = [f"best RA difference to dense {iv if iv is not None else '-'} points (bound -{bound:g}; the paper's "
                f"{_signed(_paper_diff(dataset, role, 'ra_best'))})",
                f"training FLOPs {_flops(_mean(runs[role], 'train_flops'))} = {_share_text(share)} of dense PGD-AT's "
                f"{_flops(_mean(runs['dense'], 'train_flops'))} (at most {most:.0%} declared; the paper's table: "
                f"{_share_text(paper)}{', search included' if role == 'robust_bird' else ''})"]
    return Claim(f"{LABELS[role]} keeps best RA within {bound:g} points of dense PGD-AT's with at least "
                 f"{1 - most:.0%} fewer training FLOPs", verdict, evidence,
                 f"the 95% interval of the paired best-RA difference above -{bound:g} and the FLOPs share at most "
                 f"{most:.0%} -> reproduced (evidence when judged on one seed); the interval below -{bound:g} or too "
                 f"small a saving -> not reproduced; an interval across -{bound:g} -> inconclusive (underpowered when "
                 f"its half-width is at least {bound:g})", seeds=_k(runs, [role, "dense"]), detail=detail)


def highest_final_ra(runs: Mapping[str, Sequence[Scores]], role: str = "flying_bird_plus",
                     dataset: str = "cifar10") -> Claim:
    """``role`` ends with a higher final RA than each other paper run (a conjunction by its meaning:
    one run above it beyond noise refutes it)."""
    evidence, verdicts, details = [], [], []
    for other in ("dense", *PAPER_SPARSE_ROLES):
        if other == role or other not in runs:
            continue
        iv = compare(runs[role], runs[other], ra_diff("final"))
        v, d = directional(iv, smaller=False, effect=_paper_diff(dataset, role, "ra_final", other))
        verdicts.append(v)
        details += [d] if d else []
        evidence.append(f"against {LABELS[other]}: {iv if iv is not None else '-'} points "
                        f"(the paper's {_signed(_paper_diff(dataset, role, 'ra_final', other))}) ({v})")
    if NOT_REPRODUCED in verdicts:
        verdict = NOT_REPRODUCED
    elif verdicts and all(v in (REPRODUCED, EVIDENCE) for v in verdicts):
        verdict = holds(_k(runs, [role]))
    else:
        verdict = INCONCLUSIVE
    return Claim(f"{LABELS[role]} has the highest final RA", verdict, evidence,
                 "per other run, " + _DIRECTIONAL + "; it holds when every comparison does, fails when any "
                 "run is above it", seeds=_k(runs, [role, "dense", *PAPER_SPARSE_ROLES]),
                 detail="; ".join(details) if verdict == INCONCLUSIVE else "")


# ---------------------------------------------------------------- boosting tickets (Li et al. 2020)


@dataclass(frozen=True)
class Budget:
    """A run's training cost in dense-equivalent epochs: its epochs at the dense cost per epoch (an
    unstructured ticket trains no faster without sparse kernels), an earlier stage (the finder) as
    the dense epochs its training FLOPs would buy."""

    epochs: float
    finder_epochs: float = 0.0

    @property
    def total(self) -> float:
        return self.epochs + self.finder_epochs


def boosting_budgeted(ticket: Sequence[Scores], dense: Sequence[Scores], ticket_cost: Budget, dense_cost: Budget,
                      bound: float = BOOSTING_RA_BOUND) -> Claim:
    """Li et al.'s claim as they judge it: the ticket, trained on a shortened schedule after its finder,
    reaches the full dense schedule's final RA (within ``bound``, paired) at a lower dense-equivalent cost."""
    iv = compare(ticket, dense, ra_diff("final"))
    verdict, detail = non_inferior(iv, bound)
    cheaper = ticket_cost.total < dense_cost.total
    if not cheaper:
        verdict, detail = NOT_REPRODUCED, "no saving"
    evidence = [f"final RA, ticket minus dense: {iv if iv is not None else '-'} points (bound -{bound:g})",
                f"cost: ticket {ticket_cost.epochs:.3g} epochs + finder {ticket_cost.finder_epochs:.3g} "
                f"dense-equivalent epochs = {ticket_cost.total:.3g}, dense {dense_cost.total:.3g} "
                f"({_share_text(ticket_cost.total / dense_cost.total)})"]
    return Claim("the boosting ticket (finder included) reaches the dense final RA on a shorter schedule",
                 verdict, evidence,
                 f"the 95% interval of the paired final-RA difference above -{bound:g} and a lower "
                 "dense-equivalent cost -> reproduced (evidence when judged on one seed); the interval below, or no "
                 "saving -> not reproduced; else inconclusive", seeds=min(len(ticket), len(dense)), detail=detail)


def boosting_beats_control(ticket: Sequence[Scores], control: Sequence[Scores]) -> Claim:
    """The boosting paper's control: the ticket's mask from a fresh random initialisation, on the same
    budget, ends with a lower final RA than the ticket (rewound to its initialisation)."""
    iv = compare(ticket, control, ra_diff("final"))
    verdict, detail = directional(iv, smaller=False, effect=None)
    return Claim("the boosting ticket ends above its mask trained from a random initialisation", verdict,
                 [f"final RA, ticket minus control: {iv if iv is not None else '-'} points"], _DIRECTIONAL,
                 seeds=min(len(ticket), len(control)), detail=detail)


# ---------------------------------------------------------------- sanity checks (not paper claims)


def fb_plus_sparser_and_cheaper(runs: Mapping[str, Sequence[Scores]]) -> Claim:
    """A mechanism check: Flying Bird+'s density adaptation ended below Flying Bird's density."""
    density = {r: _mean(runs[r], "density") for r in ("flying_bird", "flying_bird_plus")}
    flops = {r: _mean(runs[r], "train_flops") for r in ("flying_bird", "flying_bird_plus")}
    evidence = [f"{LABELS[r]}: final density {'-' if density[r] is None else format(density[r], '.4f')}, "
                f"train FLOPs {_flops(flops[r])}" for r in density]
    why = "exact counts, so no noise; both lower -> passed, else failed"
    fb, fb_plus = density["flying_bird"], density["flying_bird_plus"]
    fb_flops, fb_plus_flops = flops["flying_bird"], flops["flying_bird_plus"]
    # a seed without either (was a TypeError)
    if fb is None or fb_plus is None or fb_flops is None or fb_plus_flops is None:
        return Claim("Flying Bird+ ends sparser and cheaper than Flying Bird", INCONCLUSIVE, evidence, why,
                     detail="not measured")
    sparser = fb_plus < fb
    cheaper = fb_plus_flops < fb_flops
    if not sparser:
        why += "; FB+ did not end sparser: its prune-more trigger (robust gap proxy rising) did not fire often enough"
    return Claim("Flying Bird+ ends sparser and cheaper than Flying Bird", REPRODUCED if sparser and cheaper else
                 NOT_REPRODUCED, evidence, why)


def autoattack_below_pgd(evals: Mapping[str, Mapping[str, Any]]) -> Claim:
    """``evals``: run name -> {"autoattack": RA %, "pgd": RA % of PGD-``pgd_steps``, "n": images} of each
    final model, both on the first ``n_autoattack`` (else ``n``) test images."""
    evidence, verdicts, steps = [], [], sorted({e.get("pgd_steps", 20) for e in evals.values()})
    for role, e in evals.items():
        aa, pgd = e["autoattack"], e.get("pgd_on_autoattack_images", e["pgd"])
        v = REPRODUCED if aa < pgd else (INCONCLUSIVE if aa == pgd else NOT_REPRODUCED)
        verdicts.append(v)
        evidence.append(f"{label(role)}: AutoAttack {_pct(aa)} vs PGD-{e.get('pgd_steps', 20)} {_pct(pgd)} "
                        f"on {e.get('n_autoattack', e['n'])} images "
                        f"({'below' if aa < pgd else 'equal' if aa == pgd else 'ABOVE'})")
    verdict = (NOT_REPRODUCED if NOT_REPRODUCED in verdicts else
               REPRODUCED if verdicts and all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE)
    return Claim(f"AutoAttack is below PGD-{'/'.join(map(str, steps))} for every final model", verdict, evidence,
                 "same images, same model: strictly below -> passed, equal -> inconclusive, above -> failed (a sign "
                 "of a weak AutoAttack run or a masked gradient)")


# ---------------------------------------------------------------- formatting


def label(name: str) -> str:
    """A run's label from its name: the role's, with the seed of a ``<role>-seed<k>`` run."""
    role, _, seed = name.partition("-seed")
    return LABELS.get(role, role) + (f" (seed {seed})" if seed else "")


def _k(runs: Mapping[str, Sequence[Scores]], roles: Sequence[str]) -> int:
    return min((len(runs[r]) for r in roles if r in runs), default=1)


def _mean(seeds: Sequence[Scores], key: str) -> float | None:
    values = [getattr(s, key) for s in seeds]
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def _flops_share(sparse: Sequence[Scores], dense: Sequence[Scores]) -> float | None:
    """Training FLOPs as a share of the dense PGD-AT run's (means over seeds): sparta's one denominator."""
    mine, ref = _mean(sparse, "train_flops"), _mean(dense, "train_flops")
    return None if mine is None or not ref else mine / ref


def _mean_of(seeds: Sequence[Scores], quantity: str) -> str:
    """The mean over seeds of a run's overfitting or gap, in points."""
    def one(s: Scores) -> float | None:
        if quantity == "overfitting":
            return None if s.ra_best is None or s.ra_final is None else s.ra_best - s.ra_final
        return None if s.train_ra is None or s.ra_final is None else s.train_ra - s.ra_final
    values = [one(s) for s in seeds]
    present = [v for v in values if v is not None]
    return "-" if not values or len(present) < len(values) else f"{statistics.fmean(present):.2f}"


def _paper_diff(dataset: str, role: str, quantity: str, other: str = "dense") -> float | None:
    a, b = paper_value(dataset, role, quantity), paper_value(dataset, other, quantity)
    return None if a is None or b is None else a - b


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}"


def _share_text(x: float | None) -> str:
    return "-" if x is None else _share(x, 1.0)
