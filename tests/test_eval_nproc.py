"""``sparta eval --nproc N``: the test set sharded in whole chunks over torchrun ranks (gloo, CPU) gives
the one-process result image by image, for PGD and for AutoAttack.

The one-process reference runs as a subprocess with one thread, like each torchrun worker, so both
sides do the same arithmetic.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_cfg

import sparta
from sparta.attacks.autoattack import merge_autoattack
from sparta.distributed import Distributed
from sparta.experiment import train
from sparta.robustness import chunk_seed, chunks

ROOT = Path(sparta.__file__).resolve().parents[1]
ATTACK = ["eval.eps=0.05", "eval.alpha=0.0125"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """best.pt of a small_cnn trained cleanly for 4 epochs on 512 digits (~86% clean accuracy); attacked at
    eps 0.05 (``ATTACK``) it keeps ~70% of the first 100 test images: both outcomes occur, and the random
    starts matter."""
    out = tmp_path_factory.mktemp("evalnproc") / "run"
    train(tiny_cfg(out, "epochs=4", "data.train_subset=512", "model.base_width=8", "attack.name=none",
                   "eval.steps=2", "eval.test_subset=64", "eval.gap_subset=null"))
    return out / "checkpoints" / "best.pt"


def sparta_eval(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, "-m", "sparta", "eval", *args], env=env, capture_output=True, text=True,
                            timeout=timeout)
    return result


def eval_json(ckpt: Path, attack: str, *args) -> dict:
    result = sparta_eval(str(ckpt), "--attack", attack, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(ckpt.with_name(f"{ckpt.stem}.eval-{attack}.json").read_text())


def comparable(result: dict) -> dict:
    """What must not depend on the number of processes: every row's counts, the per-image flags, the checks."""
    rows = [{k: r[k] for k in ("kind", "eps", "steps", "n", "clean_acc", "robust_acc", "robust_correct")}
            for r in result["rows"]]
    aa = result.get("autoattack")
    return {"rows": rows, "flags": result["robust_flags"],
            "checks": [(c["name"], c["passed"]) for c in result["checks"]],
            "per_attack": aa and aa["per_attack"], "aa_flags": aa and aa["flags"], "chunks": aa and aa["chunks"]}


def test_pgd_two_processes_equal_one_image_by_image(trained):
    # 100 images in chunks of 16: 7 chunks, ranks take chunks 0-3 and 4-6 (the last one short)
    args = ["--n-examples", "100", "eval.batch_size=16", "eval.steps=5", *ATTACK]
    one = eval_json(trained, "pgd", *args)
    assert one["world_size"] == 1 and len(one["robust_flags"]) == 100 and one["chunk_size"] == 16
    correct = one["robust_flags"].count("1")
    assert 0 < correct < round(one["clean_acc"])  # the comparison sees both outcomes, and the attack flipped some
    assert one["robust_flags"].count("1") == round(one["robust_acc"]) == one["rows"][0]["robust_correct"]
    two = eval_json(trained, "pgd", *args, "--nproc", "2")
    assert two["world_size"] == 2
    assert comparable(two) == comparable(one)
    assert two["robust_loss"] == pytest.approx(one["robust_loss"], rel=1e-9)  # summed in another order


@pytest.mark.slow  # AutoAttack twice on 24 images: about a minute on one core
def test_autoattack_two_processes_equal_one_image_by_image(trained):
    args = ["--n-examples", "24", "eval.batch_size=8", *ATTACK]  # 3 chunks: rank 0 takes 2, rank 1 one
    one = eval_json(trained, "autoattack", *args)
    two = eval_json(trained, "autoattack", *args, "--nproc", "2")
    assert one["autoattack"]["chunks"] == 3
    assert 0 < one["robust_flags"].count("1") < round(one["clean_acc"] * 24 / 100)
    assert comparable(two) == comparable(one)


def test_chunks_are_contiguous_whole_and_cover_every_image_once():
    for n, bs, world in ((100, 16, 2), (5, 8, 3), (64, 8, 3), (1, 256, 4)):
        seen = [c for r in range(world) for c in chunks(n, bs, Distributed(rank=r, world_size=world))]
        assert [k for k, _, _ in seen] == list(range(-(-n // bs)))  # rank order = chunk order
        assert [i for _, a, b in seen for i in range(a, b)] == list(range(n))
        assert all(b - a == bs for _, a, b in seen[:-1])
    assert chunk_seed(7, 0) == 7 and len({chunk_seed(0, k) for k in range(100)}) == 100


def test_autoattack_infos_merge_by_counts():
    # chunk A: 8 images, 4 robust after APGD-CE, 3 after APGD-T; chunk B: 4 images, 1 after APGD-CE, then
    # none, so the package skipped APGD-T there (absent = 0 left)
    base = {"attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "max_perturbation": 0.1, "in_ball": True,
            "in_range": True, "finite": True, "output": [], "other_warnings": []}
    a = {**base, "per_attack": {"apgd-ce": 50.0, "apgd-t": 37.5}, "flags": ["x"], "max_perturbation": 0.2}
    b = {**base, "per_attack": {"apgd-ce": 25.0}, "flags": ["y", "x"], "in_range": False}
    merged = merge_autoattack([a, b], [8, 4])
    assert merged["per_attack"] == {"apgd-ce": pytest.approx(500 / 12), "apgd-t": 25.0}
    assert merged["flags"] == ["x", "y"] and merged["max_perturbation"] == 0.2
    assert merged["in_range"] is False and merged["in_ball"] is True and merged["chunks"] == 2


def test_nproc_below_one_is_one_line(trained):
    result = sparta_eval(str(trained), "--nproc", "0", timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == "error: --nproc must be >= 1, got 0"
