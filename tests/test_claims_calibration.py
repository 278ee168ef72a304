"""Operating characteristics of the claim rules on simulated reproductions with known truths
(sparta.calibration): a faithful reproduction of the papers' table earns *reproduced*, a sparse run
equal to dense almost never does, and an adverse one is *not reproduced*. The rates printed here are
the table of docs/reproduce.md (run with -s to see them)."""
from __future__ import annotations

import dataclasses
import os

import pytest

from sparta import calibration as K
from sparta import claims as C

# simulated reproductions per scenario: 300 in the suite (fixed seeds, so the rates are the same on
# every run); docs/reproduce.md's table is this module run with SPARTA_CALIBRATION_SIMS=1000
SIMS = int(os.environ.get("SPARTA_CALIBRATION_SIMS", 300))
SMALLER = [(r, "dense", q) for q in ("overfitting", "gap") for r in C.PAPER_SPARSE_ROLES] + \
          [("flying_bird_plus", "flying_bird", q) for q in ("overfitting", "gap")]


def judge(runs: dict, dataset: str) -> dict[str, C.Claim]:
    """Every paper claim of sparta reproduce (boosting aside) on one simulated reproduction."""
    found = [C.smaller_than(runs, role, ref, q, dataset) for role, ref, q in SMALLER]
    found += [C.comparable_ra_at_fewer_flops(runs, r, dataset) for r in ("robust_bird", "flying_bird")]
    found.append(C.highest_final_ra(runs, "flying_bird_plus", dataset))
    return {c.claim: c for c in found}


def measure(truths: dict, design: K.Design, dataset: str = "cifar10", sims: int = SIMS) -> dict[str, dict[str, float]]:
    seen: dict[str, list[str]] = {}
    for runs in K.simulate(truths, design, sims, seed=1):
        for name, claim in judge(runs, dataset).items():
            seen.setdefault(name, []).append(claim.verdict)
    rates = {name: K.rates(v) for name, v in seen.items()}
    print(f"\n{dataset}, {design}:")
    for name, r in rates.items():
        print(f"  {name}: " + ", ".join(f"{v} {share:.3f}" for v, share in r.items() if share))
    return rates


def _dense_like(flops_share: float = 0.3) -> dict[str, K.Truth]:
    dense = K.paper_truths("cifar10")["dense"]
    return {r: dataclasses.replace(dense, train_flops=dense.train_flops * (1 if r == "dense" else flops_share))
            for r in ("dense", *C.PAPER_SPARSE_ROLES)}


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_the_papers_table_is_reproduced_at_the_recommended_size(dataset):
    rates = measure(K.paper_truths(dataset), K.PAPER_SIZE, dataset)
    assert len(rates) == 11
    for name, r in rates.items():
        assert r[C.REPRODUCED] >= 0.8, (name, r)


@pytest.mark.parametrize("design", [K.PAPER_SIZE, K.CPU_MINI_SIZE], ids=["paper", "cpu-mini"])
def test_a_sparse_run_equal_to_dense_is_rarely_called_better(design):
    rates = measure(_dense_like(), design)
    smaller = [n for n in rates if "smaller" in n or "highest" in n]
    assert len(smaller) == 9
    for name in smaller:
        assert rates[name][C.REPRODUCED] <= 0.05, (name, rates[name])


def test_adverse_truths_are_not_reproduced():
    """Sparse runs 3 points worse at their best epoch, 5 at the end (more overfitting), with a 5 points
    larger gap; Flying Bird+ as much worse than Flying Bird, which equals dense."""
    dense = K.paper_truths("cifar10")["dense"]
    worse = K.Truth(dense.ra_best - 3, dense.ra_final - 5, dense.train_ra, dense.train_flops * 0.3)
    truths = {"dense": dense, "robust_bird": worse,
              "flying_bird": dataclasses.replace(dense, train_flops=worse.train_flops),
              "flying_bird_plus": worse}
    rates = measure(truths, K.PAPER_SIZE)
    for name, r in rates.items():
        if "Flying Bird has" in name or "Flying Bird keeps" in name:
            continue  # Flying Bird equals dense here
        if "keeps best RA" in name:  # 3 points down is only 0.5 beyond the 2.5 bound: rarely resolved...
            assert r[C.REPRODUCED] <= 0.05, (name, r)  # ...but never passed
        else:
            assert r[C.NOT_REPRODUCED] >= 0.8, (name, r)


def test_a_loss_well_beyond_the_bound_is_not_reproduced():
    dense = K.paper_truths("cifar10")["dense"]
    truths = {"dense": dense, "robust_bird": K.Truth(dense.ra_best - 4.5, dense.ra_final, dense.train_ra, 1.0)}
    verdicts = [C.comparable_ra_at_fewer_flops(runs, "robust_bird").verdict
                for runs in K.simulate(truths, K.PAPER_SIZE, SIMS, seed=2)]
    assert K.rates(verdicts)[C.NOT_REPRODUCED] >= 0.8


def test_cpu_mini_is_underpowered_and_says_so():
    """At 500 test images and 3 seeds a faithful reproduction is mostly inconclusive, and the verdict
    names the design's half-width against the paper's difference."""
    said, inconclusive = 0, 0
    for runs in K.simulate(K.paper_truths("cifar10"), K.CPU_MINI_SIZE, SIMS, seed=3):
        for claim in judge(runs, "cifar10").values():
            if claim.verdict == C.INCONCLUSIVE:
                inconclusive += 1
                said += claim.detail.startswith("underpowered")
    assert inconclusive > 0 and said / inconclusive >= 0.8
    rates = measure(K.paper_truths("cifar10"), K.CPU_MINI_SIZE, sims=SIMS)
    assert all(r[C.REPRODUCED] < 0.8 for r in rates.values())  # no claim reaches the power asked of the paper profile
