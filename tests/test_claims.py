"""The claim rules of ``sparta reproduce`` against numbers computed by hand: paired differences from
per-image outcomes, t intervals over seeds, and each rule returning every one of its verdicts."""
import math

import pytest

from sparta import claims as C
from sparta.outcomes import Outcomes, decode, encode, pack
from sparta.paired import Paired, linear, over_seeds, t975, unpaired


def block(start: int, stop: int) -> int:
    """Images start..stop-1 correct."""
    return ((1 << (stop - start)) - 1) << start


def seed(ra_best=30.0, ra_final=30.0, train_ra=50.0, n=10_000, n_gap=1_000, *, shift=0, flops=100.0, density=1.0):
    """One seed's Scores whose correct images are a run of consecutive images starting at ``shift``:
    two runs with nearby shifts agree on most images, as real runs do."""
    def o(p, m):
        k = round(p * m / 100)
        return Outcomes(m, block(shift, shift + k), block(shift, shift + k))
    return C.Scores(ra_best, ra_final, n, train_ra, n_gap, o(ra_best, n), o(ra_final, n), o(train_ra, n_gap),
                    train_flops=flops, density=density)


def test_outcome_vectors_round_trip():
    bits = [1, 0, 0, 1, 1, 0, 1, 0, 1]  # 9 images: not a multiple of 8
    v = pack(bits)
    assert v == 0b101011001 and decode(encode(v, 9)) == v
    assert decode(encode(0, 0)) == 0
    assert Outcomes(9, v, v).accuracy() == pytest.approx(500 / 9)
    with pytest.raises(ValueError, match="must lie in"):
        encode(1 << 9, 9)


def test_paired_difference_by_hand():
    # a = images 0, 2, 3 correct; b = images 0, 3: u = a - b = (0, 0, 1, 0)
    d = linear([(1, pack([1, 0, 1, 1])), (-1, pack([1, 0, 0, 1]))], 4)
    assert d.diff == pytest.approx(25.0)
    # unbiased variance of (0, 0, 1, 0): 0.25, so the SE of the mean is sqrt(0.25 / 4) = 0.25
    assert d.se == pytest.approx(25.0)
    # the unpaired error of the same accuracies (75% and 50% on 4 images) is larger
    assert unpaired(75.0, 50.0, 4, 4).se > d.se
    # two seeds: mean 2, sd sqrt(2), SE 1, t at 1 degree of freedom
    iv = over_seeds([Paired(1.0, 0.1), Paired(3.0, 0.1)])
    assert (iv.value, iv.se, iv.crit) == (2.0, pytest.approx(1.0), t975(1))
    assert t975(2) == pytest.approx(4.3027, abs=1e-4) and t975(100) == pytest.approx(1.9840, abs=1e-4)
    # one seed: the image-level SE with the normal quantile
    assert over_seeds([Paired(2.0, 0.5)]).half == pytest.approx(1.95996 * 0.5, rel=1e-5)


def test_gap_and_overfitting_differences_are_paired_on_every_image():
    a, b = seed(40.0, 35.0, 60.0), seed(40.0, 30.0, 70.0)
    # overfitting: a's (40 - 35) minus b's (40 - 30) = -5; per image u = a_best - a_final - b_best + b_final
    # is -1 on images 3000..3499 only (a final correct, b final not): mean -0.05, SE sqrt(p(1-p)/(n-1)... )
    d = C.overfitting_diff(a, b)
    p = 0.05
    assert d.diff == pytest.approx(-5.0) and d.se == pytest.approx(100 * math.sqrt(p * (1 - p) / 9_999))
    # gap: (60 - 35) - (70 - 30) = -15, the gap images' difference and the test images' added
    g = C.gap_diff(a, b)
    assert g.diff == pytest.approx(-15.0)
    assert g.se == pytest.approx(math.hypot(100 * math.sqrt(0.1 * 0.9 / 999), 100 * math.sqrt(0.05 * 0.95 / 9_999)))

    # without outcomes (runs of an older version) the same differences, unpaired and wider
    def old(s):
        return C.Scores(s.ra_best, s.ra_final, s.n_test, s.train_ra, s.n_gap)

    u = C.gap_diff(old(a), old(b))
    assert u.diff == pytest.approx(-15.0) and not u.paired and u.se > g.se


def test_smaller_than_returns_every_verdict():
    def verdict(gaps, dense_gaps, n_gap=1_000):
        runs = {"dense": [seed(train_ra=30.0 + g, n_gap=n_gap, shift=i) for i, g in enumerate(dense_gaps)],
                "robust_bird": [seed(train_ra=30.0 + g, n_gap=n_gap, shift=i) for i, g in enumerate(gaps)]}
        return C.smaller_than(runs, "robust_bird", "dense", "gap")

    assert verdict([20.0], [25.0]).verdict == C.EVIDENCE  # paired on 1,000 images: SE 0.71
    assert verdict([20.0, 21.0, 20.5], [25.0, 25.5, 26.0]).verdict == C.REPRODUCED
    assert verdict([30.0], [25.0]).verdict == C.NOT_REPRODUCED
    assert verdict([20.0, 27.0], [25.0, 25.0]).verdict == C.INCONCLUSIVE  # seeds disagree: t(1) = 12.7
    # the paper's gap difference for Robust Bird is 23.37 - 38.82 = -15.45: a design this loose is underpowered
    loose = verdict([20.0, 27.0], [25.0, 12.0])
    assert loose.verdict == C.INCONCLUSIVE and loose.detail.startswith("underpowered: +-")
    assert "against the paper's 15.45" in loose.detail


def test_comparable_ra_is_non_inferiority_with_a_declared_saving():
    def claim(ra, flops=40.0, seeds=1, spread=0.1):
        runs = {"dense": [seed(ra_best=30.0, shift=i) for i in range(seeds)],
                "flying_bird": [seed(ra_best=ra + i * spread, shift=i, flops=flops) for i in range(seeds)]}
        return C.comparable_ra_at_fewer_flops(runs, "flying_bird")

    # paired on 10,000 images: a run correct on a subset of dense's images, 1 point lower, SE 0.1
    assert claim(29.0).verdict == C.EVIDENCE
    assert claim(29.0, seeds=3).verdict == C.REPRODUCED
    assert claim(26.0).verdict == C.NOT_REPRODUCED  # wholly below -2.5
    assert claim(29.0, flops=75.0).verdict == C.NOT_REPRODUCED  # a 25% saving: below the declared 30%
    wide = claim(28.0, seeds=2, spread=2.0)  # -2 and 0: t(1) interval across -2.5
    assert wide.verdict == C.INCONCLUSIVE and "underpowered" in wide.detail and "bound of 2.50" in wide.detail
    text = " ".join(claim(29.0).evidence)
    assert "40% of dense PGD-AT's" in text and "at most 70% declared" in text and "the paper's table: 31%" in text


def test_highest_final_ra_returns_every_verdict():
    def verdict(fbp, others=30.0, seeds=1):
        runs = {r: [seed(ra_final=others, shift=i) for i in range(seeds)]
                for r in ("dense", "robust_bird", "flying_bird")}
        runs["flying_bird_plus"] = [seed(ra_final=fbp + 0.1 * i, shift=i) for i in range(seeds)]
        return C.highest_final_ra(runs).verdict

    assert verdict(31.0) == C.EVIDENCE
    assert verdict(31.0, seeds=3) == C.REPRODUCED
    assert verdict(29.0) == C.NOT_REPRODUCED
    assert verdict(30.0) == C.INCONCLUSIVE


def ticket_curve(plateau_at: float, length: float, target: float = 40.0) -> float:
    """The final RA of a synthetic ticket trained for ``length`` of the dense schedule, whose RA grows
    linearly to ``target`` (the dense final RA) by ``plateau_at`` of the dense schedule and stays."""
    return target * min(1.0, length / plateau_at)


def test_boosting_is_judged_on_a_budget():
    dense_cost, ticket_cost = C.Budget(160), C.Budget(80, finder_epochs=20)  # 100 < 160
    dense = [seed(ra_final=40.0, shift=i) for i in range(3)]

    def claim(final_ra, cost=ticket_cost):
        return C.boosting_budgeted([seed(ra_final=final_ra + 0.1 * i, shift=i) for i in range(3)], dense, cost,
                                   dense_cost)

    # a ticket that plateaus by 40% of the dense schedule ends its half-length schedule at the dense RA
    assert claim(ticket_curve(0.4, 0.5)).verdict == C.REPRODUCED
    # one that reaches it only after the dense schedule's first decay (at 60%) ends its budget 6.7 points below
    assert claim(ticket_curve(0.6, 0.5)).verdict == C.NOT_REPRODUCED
    assert claim(40.0, cost=C.Budget(160, finder_epochs=32)).verdict == C.NOT_REPRODUCED  # no saving
    assert claim(40.0).evidence[1].endswith("(62%)")  # 100 of 160 dense-equivalent epochs
    noisy = C.boosting_budgeted([seed(ra_final=r, shift=i) for i, r in enumerate((41.0, 35.0))], dense[:2],
                                ticket_cost, dense_cost)
    assert noisy.verdict == C.INCONCLUSIVE


def test_boosting_control_verdicts_are_symmetric():
    ticket = [seed(ra_final=42.0 + 0.2 * i, shift=i) for i in range(3)]
    control = [seed(ra_final=36.0 + 0.2 * i, shift=i) for i in range(3)]
    assert C.boosting_beats_control(ticket, control).verdict == C.REPRODUCED  # only the ticket reaches it
    assert C.boosting_beats_control(control, ticket).verdict == C.NOT_REPRODUCED  # only the control
    assert C.boosting_beats_control(ticket, ticket).verdict == C.INCONCLUSIVE


def test_sanity_checks():
    evals = {"dense": {"autoattack": 20.0, "pgd": 22.4, "n": 500},
             "flying_bird": {"autoattack": 21.0, "pgd": 21.0, "n": 500}}
    assert C.autoattack_below_pgd(evals).verdict == C.INCONCLUSIVE
    evals["flying_bird"]["autoattack"] = 21.2
    assert C.autoattack_below_pgd(evals).verdict == C.NOT_REPRODUCED
    evals["flying_bird"]["autoattack"] = 19.0
    assert C.autoattack_below_pgd(evals).verdict == C.REPRODUCED
    runs = {"flying_bird": [seed(density=0.2, flops=50.0)], "flying_bird_plus": [seed(density=0.15, flops=45.0)]}
    assert C.fb_plus_sparser_and_cheaper(runs).verdict == C.REPRODUCED
    runs["flying_bird_plus"] = [seed(density=0.2, flops=50.0)]  # the trigger never fired
    claim = C.fb_plus_sparser_and_cheaper(runs)
    assert claim.verdict == C.NOT_REPRODUCED and "did not end sparser" in claim.why
    runs["flying_bird_plus"] = [seed(density=0.15, flops=45.0), seed(density=None, flops=45.0)]  # a seed without it
    claim = C.fb_plus_sparser_and_cheaper(runs)
    assert (claim.verdict, claim.detail) == (C.INCONCLUSIVE, "not measured") and "final density -" in claim.evidence[1]
