"""A worker that tests/test_distributed.py runs under torchrun (not collected by pytest).

``crash CONFIG EPOCH [overrides]``: train and raise on every rank once EPOCH was saved (a kill).
``mismatch``: rank 1 moves one kept weight; the consistency check must name that layer on every rank.
``outcomes``: ``evaluation_outcomes`` under torchrun; each rank prints what it returned as one JSON line.
"""
import json
import os
import sys

import torch
from conftest import Crash, crash_after  # this file's folder is first on sys.path

from sparta import distributed
from sparta.config import load_config
from sparta.experiment import train


def crash(config: str, epoch: str, *overrides: str) -> None:
    try:
        train(load_config(config, list(overrides)), on_epoch=crash_after(int(epoch)))
    except Crash:
        distributed.shutdown()  # every rank crashed at the same point: a clean exit
        distributed.exit_worker(3)


def evaluation_outcomes(dist=None) -> dict:
    """``evaluate(..., outcomes=True)`` of a fixed small_cnn on the first 101 digits test images (batches
    of 8 per rank, so each rank's last batch is short) under a PGD without random start: the same
    numbers image by image whichever rank evaluates an image."""
    from sparta.attacks import build_attack
    from sparta.data import load_dataset
    from sparta.evaluate import evaluate
    from sparta.models.small import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(10, 1, base_width=4)
    attack = build_attack("pgd", eps=0.1, alpha=0.03, steps=2, random_start=False)
    data = load_dataset("digits", None).test.subset(0, 101)
    r = evaluate(model, data, attack, batch_size=8, device=torch.device("cpu"), dist=dist or distributed.SINGLE,
                 outcomes=True)
    return {**r, "outcomes": r["outcomes"].to_json()}


def outcomes() -> None:
    dist = distributed.setup(load_config(None, ["batch_size=2", "device=cpu"]))
    os.write(1, (json.dumps({"rank": dist.rank, **evaluation_outcomes(dist)}) + "\n").encode())  # one write: see below
    distributed.shutdown()


def mismatch() -> None:
    from sparta.models.small import SmallCNN
    from sparta.sparse.masks import MaskSet

    cfg = load_config(None, ["batch_size=2", "device=cpu"])
    dist = distributed.setup(cfg)
    torch.manual_seed(0)
    masks = MaskSet.random(SmallCNN(10, 1, base_width=4), 0.5, seed=0)
    dist.sync_masks_(masks, "a check that passes")
    if dist.rank == 1:  # move one kept weight: the count stays, only the position checksum sees it
        layer = masks["features.2.weight"].view(-1)
        kept, free = int(layer.nonzero()[0]), int((~layer).nonzero()[0])
        layer[kept], layer[free] = False, True
    try:
        dist.check_masks(masks, "a deliberate flip")
    except distributed.RankMismatchError as e:
        # one os.write of under PIPE_BUF bytes: the two ranks share the pipe, and print's separate writes of
        # the text and its newline can interleave into one line
        os.write(1, f"rank {dist.rank}: {e}\n".encode())
        distributed.shutdown()
        distributed.exit_worker(0)
    distributed.exit_worker(1)


if __name__ == "__main__":
    {"crash": crash, "mismatch": mismatch, "outcomes": outcomes}[sys.argv[1]](*sys.argv[2:])
