"""Clean and robust accuracy of a model on a fixed set of images. Returns dicts; never prints.

Evaluation runs the model in eval mode (BatchNorm running statistics), without augmentation, in
float32 (or under bfloat16 autocast with ``precision="bf16"``), and restores the model's previous mode
afterwards.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attacks import Attack
from .data.base import ImageSet
from .data.loader import DeviceLoader
from .distributed import SINGLE, Distributed
from .outcomes import Outcomes, pack
from .precision import autocast


def evaluate(model: nn.Module, data: ImageSet, attack: Attack, *, batch_size: int,
             device: torch.device, dist: Distributed = SINGLE, precision: str = "fp32",
             outcomes: bool = False) -> dict[str, Any]:
    """Clean/robust accuracy (percent) and mean clean/robust cross-entropy over ``data``.

    ``attack(model, x, y) -> x_adv`` is run on every batch; the robust numbers are measured on its
    output. All sums stay on the device and are read once at the end (no per-batch sync). Under
    torchrun every rank evaluates its contiguous slice of ``data`` (``batch_size`` per rank) and the
    sums are all-reduced, so every rank returns the same numbers over the whole of ``data``.
    ``precision`` ("fp32" or "bf16") is the arithmetic of the attack and of every forward pass.
    ``outcomes``: also return each image's clean and robust correctness over the whole of ``data``,
    in order (key ``"outcomes"``, an ``Outcomes``; the same on every rank); read once at the end too.
    """
    was_training = model.training
    model.eval()
    # sums: clean correct, robust correct, clean loss, robust loss, count
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    hits: list[torch.Tensor] = []  # per batch (2, B) bool: clean, robust correct; kept only when asked
    part = data.subset(*dist.shard(len(data)))
    batches = DeviceLoader(part, min(batch_size, len(part)), device=device, shuffle=False,
                           augment=False).epoch(0) if len(part) else iter(())
    try:
        for x, y in batches:
            with autocast(precision, device):
                x_adv = attack(model, x, y)
                with torch.no_grad():
                    logits_clean = model(x).float()  # (B, K); bf16 under autocast
                    logits_adv = model(x_adv).float()
            clean_ok, robust_ok = logits_clean.argmax(1) == y, logits_adv.argmax(1) == y  # (B,) bool each
            if outcomes:
                hits.append(torch.stack([clean_ok, robust_ok]))  # (2, B), on the device until the end
            sums += torch.stack([
                clean_ok.sum().double(),
                robust_ok.sum().double(),
                F.cross_entropy(logits_clean, y, reduction="sum").double(),
                F.cross_entropy(logits_adv, y, reduction="sum").double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=device),
            ])
    finally:
        model.train(was_training)
    clean, robust, clean_loss, robust_loss, n = dist.all_reduce_sum_(sums).tolist()
    n = max(n, 1.0)
    result: dict[str, Any] = {
        "clean_acc": 100.0 * clean / n,
        "robust_acc": 100.0 * robust / n,
        "clean_loss": clean_loss / n,
        "robust_loss": robust_loss / n,
        "n": int(n),
    }
    if outcomes:
        result["outcomes"] = gather_outcomes(hits, dist)
    return result


def gather_outcomes(hits: list[torch.Tensor], dist: Distributed) -> Outcomes:
    """The ``Outcomes`` of the whole evaluated set from each rank's per-batch (2, B) bool ``hits``.

    Each rank packs its contiguous slice (``dist.shard``) into two ints; rank r's bits are shifted
    past the images of ranks 0..r-1, so every rank returns the vector of a one-process evaluation."""
    bits = torch.cat(hits, 1).cpu().numpy() if hits else np.zeros((2, 0), dtype=bool)  # (2, n_local)
    n = clean = robust = 0
    for count, c, r in dist.all_gather((bits.shape[1], pack(bits[0]), pack(bits[1]))):  # rank order
        clean, robust, n = clean | c << n, robust | r << n, n + count
    return Outcomes(n, clean, robust)
