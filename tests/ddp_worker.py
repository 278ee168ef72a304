"""A worker that tests/test_distributed.py runs under torchrun (not collected by pytest).

``crash CONFIG EPOCH [overrides]``: train and raise on every rank once EPOCH was saved (a kill).
``mismatch``: rank 1 moves one kept weight; the consistency check must name that layer on every rank.
"""
import os
import sys

import torch

from sparta import distributed
from sparta.config import load_config
from sparta.experiment import train

from conftest import Crash, crash_after  # this file's folder is first on sys.path


def crash(config: str, epoch: str, *overrides: str) -> None:
    try:
        train(load_config(config, list(overrides)), on_epoch=crash_after(int(epoch)))
    except Crash:
        distributed.shutdown()  # every rank crashed at the same point: a clean exit
        distributed.exit_worker(3)


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
    {"crash": crash, "mismatch": mismatch}[sys.argv[1]](*sys.argv[2:])
