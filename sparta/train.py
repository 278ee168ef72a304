"""The training loop: one screen, with the hook points named in DESIGN.md.

Everything method-specific lives elsewhere: the attack and loss in ``objectives``, sparsity in the
controller (``sparse.controllers``), evaluation/logging/checkpointing in the ``end_epoch`` callback
that ``sparta.experiment`` passes in.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from .data.loader import DeviceLoader
from .flops import TrainingCostMeter
from .objectives import Objective
from .precision import FP32, StepPrecision
from .schedules import LrSchedule
from .sparse.controllers import SparsityController


@dataclass
class TrainState:
    """Loop position and bookkeeping; all of it goes into the checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best_val_robust_acc: float = float("-inf")
    best_epoch: int = 0
    wall_time_s: float = 0.0  # summed over resumed segments
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpochStats:
    """What the loop measured during one epoch, read once at its end (one host sync per epoch)."""

    epoch: int
    train_loss: float
    train_robust_acc: float  # percent, on the training attack's examples, model in train mode
    epoch_time_s: float
    lr: float


class Progress(Protocol):
    def batches(self, it: Iterator, total: int, epoch: int) -> Iterator: ...


class Silent:
    def batches(self, it: Iterator, total: int, epoch: int) -> Iterator:
        return it


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str):
    """Run BatchNorm layers in ``mode`` ("train" or "eval") inside the block, then restore them."""
    if mode == "train" or not model.training:
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, controller: SparsityController,
               objective: Objective, x: torch.Tensor, y: torch.Tensor, *, step: int,
               attack_bn_mode: str, precision: StepPrecision = FP32) -> tuple[torch.Tensor, torch.Tensor]:
    """One adversarial training step on a batch x (B, C, H, W) in [0, 1], y (B,); returns (loss, logits)."""
    with precision.autocast():  # attack, forward and loss (fp32 weights, bf16/fp16 matmuls); no-op in fp32
        with bn_mode(model, attack_bn_mode):
            x_adv = objective.attack(model, x, y, step)
        loss, logits = objective.loss(model, x_adv, x, y)
    optimizer.zero_grad(set_to_none=True)
    if precision.backward(loss, optimizer):  # False only for an fp16 overflow: skip the step whole
        controller.after_backward(step)  # may change topology from dense grads; masks grads
        precision.step(optimizer)
        controller.after_step(step)  # keeps pruned weights at exactly zero
    return loss, logits


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, controller: SparsityController,
        loader: DeviceLoader, schedule: LrSchedule, objective: Objective, *, attack_bn_mode: str,
        epochs: int, state: TrainState, end_epoch: Callable[[EpochStats], bool],
        cost: TrainingCostMeter | None = None, progress: Progress = Silent(),
        precision: StepPrecision = FP32) -> TrainState:
    """Train from ``state`` until ``epochs`` epochs are completed or ``end_epoch`` (which evaluates,
    logs and saves) returns True to stop early."""
    device = next(model.parameters()).device
    model.train()
    for epoch in range(state.epoch, epochs):
        start = time.perf_counter()
        sums = torch.zeros(2, device=device)  # sum over batches of loss * B, robust correct
        count = 0
        for x, y in progress.batches(loader.epoch(epoch), len(loader), epoch):
            lr = schedule.lr_at(state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, logits = train_step(model, optimizer, controller, objective, x, y, step=state.step,
                                      attack_bn_mode=attack_bn_mode, precision=precision)
            with torch.no_grad():
                sums += torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum().float()])
            count += len(y)
            if cost is not None:  # FLOPs at the densities in force for this step; no host sync
                cost.step(len(y), getattr(controller, "masks", None))
            state.step += 1
        loss_sum, correct = sums.tolist()
        state.epoch = epoch + 1
        stop = end_epoch(EpochStats(epoch=state.epoch, train_loss=loss_sum / max(count, 1),
                                    train_robust_acc=100.0 * correct / max(count, 1),
                                    epoch_time_s=time.perf_counter() - start, lr=lr))
        if stop:
            break
    return state
