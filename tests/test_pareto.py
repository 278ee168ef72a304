"""The Pareto front over (training FLOPs, robust accuracy) and the binomial SE, by hand."""
import itertools
import math
import random

import pytest

from sparta.pareto import FinalRA, binomial_se, pareto_front


def test_front_by_hand():
    assert pareto_front([]) == []
    assert pareto_front([(5.0, 30.0)]) == [True]  # one point: nothing dominates it
    # cheaper-and-worse and dearer-and-better are both on it; (3, 15) is beaten by (2, 20)
    assert pareto_front([(1, 10), (2, 20), (3, 15)]) == [True, True, False]
    # equal FLOPs: the higher accuracy dominates; equal accuracy: the cheaper one dominates
    assert pareto_front([(2, 10), (2, 12)]) == [False, True]
    assert pareto_front([(2, 10), (1, 10)]) == [False, True]
    # a point better on both counts takes the front alone
    assert pareto_front([(3, 10), (2, 11), (1, 12)]) == [False, False, True]


def test_front_ties_and_duplicates():
    # equal points do not dominate each other: both on the front ...
    assert pareto_front([(1, 10), (1, 10)]) == [True, True]
    assert pareto_front([(1, 10), (2, 20), (2, 20)]) == [True, True, True]
    # ... or both off it, when a third point dominates them
    assert pareto_front([(1, 10), (1, 10), (0.5, 10)]) == [False, False, True]
    assert pareto_front([(4, 30), (4, 30), (4, 31)]) == [False, False, True]


def test_front_rejects_non_finite():
    for bad in ((math.nan, 1.0), (1.0, math.inf)):
        with pytest.raises(ValueError, match="finite"):
            pareto_front([(1.0, 2.0), bad])


def test_front_invariants_on_random_points():
    rng = random.Random(0)

    def dominates(q, p):
        return q[0] <= p[0] and q[1] >= p[1] and q != p

    for _ in range(200):
        pts = [(rng.randint(1, 6), rng.randint(0, 6)) for _ in range(rng.randint(1, 9))]
        flags = pareto_front(pts)
        for p, on in zip(pts, flags):
            assert on == (not any(dominates(q, p) for q in pts))
            if not on:  # every point off the front is dominated by one on it (dominance is transitive)
                assert any(f and dominates(q, p) for q, f in zip(pts, flags))
        # on the front, more FLOPs never buys less accuracy
        front = sorted(p for p, f in zip(pts, flags) if f)
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(front))
        assert any(flags)
        # the order of the points does not matter
        order = list(range(len(pts)))
        rng.shuffle(order)
        assert pareto_front([pts[i] for i in order]) == [flags[i] for i in order]


def test_binomial_se_by_hand():
    assert binomial_se(30.0, 100) == pytest.approx(100 * math.sqrt(0.3 * 0.7 / 100))  # 4.583 points
    assert binomial_se(30.0, 100) == pytest.approx(4.5826, abs=1e-4)
    assert binomial_se(0.0, 50) == 0.0 and binomial_se(100.0, 50) == 0.0
    assert binomial_se(50.0, 10_000) == pytest.approx(0.5)


def test_measurement_names_what_is_compared():
    aa = FinalRA(30.0, "AutoAttack", 8 / 255, 100, "final-eval.json")
    assert aa.measurement == "AutoAttack, ε = 8/255, 100 test images"
    assert FinalRA(30.0, "PGD-20", 8 / 255, None, "metrics (final epoch)").measurement == \
        "PGD-20, ε = 8/255, all test images"
    assert (FinalRA(31.0, "AutoAttack", 8 / 255, 100, "checkpoints/last.eval-autoattack.json").measurement
            == aa.measurement)
