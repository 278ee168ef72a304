"""The papers' claims, checked on the runs of one ``sparta reproduce`` profile.

Each claim is a pure function of the runs' table numbers (``sparta.report.run_stats``), their
time-to-robustness and the final AutoAttack/PGD-20 evaluations, and returns a ``Claim`` whose
verdict is ``reproduced``, ``not reproduced`` or ``inconclusive`` with the numbers behind it.

The decision rules are fixed here, before any result is seen. Accuracy differences are judged
against the sampling noise of the test images: with ``n`` images and accuracy ``p`` the standard
error is ``sqrt(p (1 - p) / n)``; two independent runs differ by ``sqrt(2)`` times that, and a
difference counts only beyond twice the standard error of the difference (``noise_margin``).
Seed-to-seed variation is larger still; one seed per run cannot measure it, which the report says.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
SPARSE_ROLES = ("robust_bird", "robust_bird_channel", "flying_bird", "flying_bird_plus")
LABELS = {"dense": "dense PGD-AT", "robust_bird": "Robust Bird", "robust_bird_channel": "Robust Bird (channel)",
          "flying_bird": "Flying Bird", "flying_bird_plus": "Flying Bird+", "boosting_ticket": "boosting ticket",
          "boosting_dense": "boosting dense baseline"}


@dataclass
class Claim:
    claim: str
    verdict: str
    evidence: list[str] = field(default_factory=list)  # one line per run or comparison, with numbers
    why: str = ""  # how the verdict follows from the evidence

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def noise_margin(p_percent: float, n: int) -> float:
    """Twice the standard error of the difference of two accuracies (percent) measured on ``n`` images."""
    p = min(max(p_percent / 100, 0.0), 1.0)
    return 200 * math.sqrt(2 * p * (1 - p) / n)


def combine(verdicts: Sequence[str]) -> str:
    """All reproduced -> reproduced; any contradicted -> not reproduced; otherwise inconclusive."""
    if not verdicts:
        return INCONCLUSIVE
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE


def _smaller(value: float | None, ref: float | None, margin: float) -> str:
    """Is ``value`` smaller than ``ref`` beyond ``margin``? (None: not measured -> inconclusive)."""
    if value is None or ref is None:
        return INCONCLUSIVE
    if value < ref - margin:
        return REPRODUCED
    return NOT_REPRODUCED if value > ref + margin else INCONCLUSIVE


def smaller_than_dense(stats: Mapping[str, Mapping[str, Any]], key: str, what: str, n: int) -> Claim:
    """Sparse runs have a smaller ``key`` (robust overfitting ``ra_diff`` or ``robust_gap``) than dense."""
    dense = stats["dense"]
    margin = noise_margin(dense["ra_best"] or 0.0, n)
    evidence, verdicts = [f"dense PGD-AT: {_pct(dense[key])}"], []
    for role in SPARSE_ROLES:
        if role in stats:
            v = _smaller(stats[role][key], dense[key], margin)
            verdicts.append(v)
            evidence.append(f"{LABELS[role]}: {_pct(stats[role][key])} ({v})")
    return Claim(f"sparse methods have a smaller {what} than dense", combine(verdicts), evidence,
                 f"per run: smaller than dense by more than the noise margin {margin:.1f} points -> reproduced, "
                 f"larger by more -> not reproduced, else inconclusive; then {_COMBINE}")


def fb_plus_sparser_and_cheaper(stats: Mapping[str, Mapping[str, Any]]) -> Claim:
    fb, fbp = stats["flying_bird"], stats["flying_bird_plus"]
    evidence = [f"{LABELS[r]}: final density {stats[r]['density']:.4f}, train FLOPs {_flops(stats[r]['train_flops'])}"
                for r in ("flying_bird", "flying_bird_plus")]
    sparser, cheaper = fbp["density"] < fb["density"], fbp["train_flops"] < fb["train_flops"]
    verdict = REPRODUCED if sparser and cheaper else NOT_REPRODUCED
    why = "both quantities are exact counts, so there is no noise margin"
    if not sparser:
        why += "; FB+ did not end sparser: its prune-more trigger (robust gap proxy rising) did not fire often enough"
    return Claim("Flying Bird+ ends sparser and cheaper than Flying Bird", verdict, evidence, why)


def saves_flops_at_comparable_ra(stats: Mapping[str, Mapping[str, Any]], n: int) -> Claim:
    dense = stats["dense"]
    margin = noise_margin(dense["ra_best"] or 0.0, n)
    evidence = [f"dense PGD-AT: RA best/final {_pct(dense['ra_best'])}/{_pct(dense['ra_final'])}, "
                f"train FLOPs {_flops(dense['train_flops'])}"]
    verdicts = []
    for role in ("robust_bird", "robust_bird_channel", "flying_bird"):
        if role not in stats:
            continue
        s = stats[role]
        saved = s["train_flops"] < dense["train_flops"]
        drop = dense["ra_best"] - s["ra_best"]
        if not saved or drop > margin:
            v = NOT_REPRODUCED
        else:
            v = REPRODUCED if drop <= margin else INCONCLUSIVE
        verdicts.append(v)
        evidence.append(f"{LABELS[role]}: RA best/final {_pct(s['ra_best'])}/{_pct(s['ra_final'])}, train FLOPs "
                        f"{_flops(s['train_flops'])} = {100 * s['train_flops'] / dense['train_flops']:.0f}% of dense "
                        f"(search included) ({v})")
    return Claim("Robust Bird and Flying Bird save training FLOPs at comparable RA", combine(verdicts), evidence,
                 f"per run: fewer training FLOPs than dense and best RA at most the noise margin {margin:.1f} points "
                 f"below dense's -> reproduced, else not reproduced; then {_COMBINE}")


def boosting_reaches_dense_ra_cheaper(target: float, ticket_max_ra: float | None, ticket_hit: Mapping[str, Any] | None,
                                      dense_hit: Mapping[str, Any] | None, n: int) -> Claim:
    """``target``: the matched dense baseline's final test RA; ``*_hit``: ``sparta.report.time_to_robustness``
    of each run at ``target``; ``ticket_max_ra``: the ticket's highest test RA at any evaluated epoch."""
    margin = noise_margin(target, n)
    evidence = [f"target: the matched dense baseline's final test RA {_pct(target)}"]
    for role, hit in (("boosting_dense", dense_hit), ("boosting_ticket", ticket_hit)):
        evidence.append(f"{LABELS[role]}: " + ("never reached" if hit is None else
                        f"reached at {hit['stage']} epoch {hit['epoch']}, cumulative train FLOPs "
                        f"{_flops(hit['train_flops'])}, wall time {hit['wall_time_s']:.0f} s"))
    if ticket_hit is None:
        verdict = INCONCLUSIVE if ticket_max_ra is not None and ticket_max_ra >= target - margin else NOT_REPRODUCED
        why = (f"the ticket's highest test RA {_pct(ticket_max_ra)} is "
               + ("within" if verdict == INCONCLUSIVE else "below") + f" the noise margin {margin:.1f} of the target")
    else:
        fraction = ticket_hit["train_flops"] / dense_hit["train_flops"]
        verdict = REPRODUCED if fraction < 1 else NOT_REPRODUCED
        why = (f"the ticket (finder included) needs {100 * fraction:.0f}% of the baseline's training FLOPs "
               f"and {100 * ticket_hit['wall_time_s'] / dense_hit['wall_time_s']:.0f}% of its wall time to reach it")
    return Claim("the boosting ticket reaches the matched dense baseline's RA at a fraction of its cost "
                 "(finder included)", verdict, evidence, why)


def autoattack_below_pgd(evals: Mapping[str, Mapping[str, Any]]) -> Claim:
    """``evals``: role -> {"autoattack": RA %, "pgd": RA % of PGD-``pgd_steps``, "n": images} of each final model."""
    evidence, verdicts, steps = [], [], sorted({e.get("pgd_steps", 20) for e in evals.values()})
    for role, e in evals.items():
        aa, pgd = e["autoattack"], e["pgd"]
        v = REPRODUCED if aa < pgd else (INCONCLUSIVE if aa == pgd else NOT_REPRODUCED)
        verdicts.append(v)
        evidence.append(f"{LABELS.get(role, role)}: AutoAttack {_pct(aa)} vs PGD-{e.get('pgd_steps', 20)} {_pct(pgd)} "
                        f"on {e['n']} images ({v})")
    return Claim(f"AutoAttack is below PGD-{'/'.join(map(str, steps))} for every final model", combine(verdicts),
                 evidence, "same images, same model: strictly below -> reproduced, equal -> inconclusive, above -> "
                 f"not reproduced (a sign of a weak AutoAttack run); then {_COMBINE}")


_COMBINE = "all runs reproduced -> reproduced, any run not reproduced -> not reproduced, else inconclusive"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}%"


def _flops(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"
