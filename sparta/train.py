"""The training loop: one screen, with the hook points named in DESIGN.md.

Everything method-specific lives elsewhere: the attack and loss in ``objectives``, sparsity in the
controller (``sparse.controllers``), evaluation/logging/checkpointing in the ``end_epoch`` callback
that ``sparta.experiment`` passes in.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from .data.loader import DeviceLoader
from .distributed import SINGLE, Distributed
from .errors import DivergedError
from .flops import TrainingCostMeter
from .objectives import Objective
from .precision import FP32, StepPrecision
from .schedules import LrSchedule
from .sparse.controllers import SparsityController


@dataclass
class TrainState:
    """Loop position and bookkeeping; all of it goes into the checkpoint, so a run can resume from
    any step, mid-epoch included."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch: int = 0  # batches of the current epoch completed (0 between epochs)
    # (3,) float32 on the device, this epoch so far: sum of loss * B, robust correct, and the number
    # of leading steps whose loss was finite; read on the host only at epoch ends and checkpoints
    sums: torch.Tensor | None = None
    examples: int = 0  # images seen this epoch so far
    epoch_time_s: float = 0.0  # training time of the current epoch so far
    best_val_robust_acc: float = float("-inf")
    best_epoch: int = 0
    wall_time_s: float = 0.0  # summed over resumed segments
    extra: dict[str, Any] = field(default_factory=dict)

    def check_finite(self) -> None:
        """Raise ``DivergedError`` if a loss of this epoch so far was NaN or infinite (one host sync)."""
        finite = self.batch if self.sums is None else int(self.sums[2].item())
        if finite < self.batch:
            raise DivergedError(
                f"the training loss became NaN or infinite at step {self.step - self.batch + finite} (epoch "
                f"{self.epoch + 1}); stopped without saving that state, so checkpoints/last.pt holds the last good "
                "one: lower optim.lr (or check the data), then --resume RUN_DIR optim.lr=... --force")


@dataclass
class EpochStats:
    """What the loop measured during one epoch, read once at its end (one host sync per epoch)."""

    epoch: int
    train_loss: float
    train_robust_acc: float  # percent, on the training attack's examples, model in train mode
    epoch_time_s: float
    lr: float


T = TypeVar("T")


class Progress(Protocol):
    def batches(self, it: Iterator[T], total: int, epoch: int) -> Iterable[T]: ...


class Silent:
    def batches(self, it: Iterator[T], total: int, epoch: int) -> Iterable[T]:
        return it


SILENT = Silent()  # stateless: the default progress of fit and sparta.experiment.train


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


def without_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, controller: SparsityController,
               objective: Objective, x: torch.Tensor, y: torch.Tensor, *, step: int,
               attack_bn_mode: str, loss_weight: float = 1.0,
               precision: StepPrecision = FP32) -> tuple[torch.Tensor, torch.Tensor]:
    """One adversarial training step on a batch x (B, C, H, W) in [0, 1], y (B,); returns (loss, logits).

    ``model`` may be DDP-wrapped: the attack runs on the module inside (input gradients only, DDP's
    reducer stays out of it; a torch.compile'd module stays compiled), the training loss through the
    wrapper; its gradient is scaled by ``loss_weight`` (a rank's share of the global batch times the
    world size).
    """
    with precision.autocast():  # attack, forward and loss (fp32 weights, bf16/fp16 matmuls); no-op in fp32
        with bn_mode(model, attack_bn_mode):
            x_adv = objective.attack(without_ddp(model), x, y, step)
        loss, logits = objective.loss(model, x_adv, x, y)
    optimizer.zero_grad(set_to_none=True)
    # with DDP, backward returns once the gradients are all-reduced (averaged); False only for an
    # fp16 overflow: then the step is skipped whole
    if precision.backward(loss * loss_weight, optimizer):
        controller.after_backward(step)  # may change topology from dense grads; masks grads
        precision.step(optimizer)
        controller.after_step(step)  # keeps pruned weights at exactly zero
    return loss, logits


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, controller: SparsityController,
        loader: DeviceLoader, schedule: LrSchedule, objective: Objective, *, attack_bn_mode: str,
        epochs: int, state: TrainState, end_epoch: Callable[[EpochStats], bool],
        end_step: Callable[[TrainState], None] = lambda state: None,
        cost: TrainingCostMeter | None = None, progress: Progress = SILENT, dist: Distributed = SINGLE,
        precision: StepPrecision = FP32) -> TrainState:
    """Train from ``state`` (possibly mid-epoch) until ``epochs`` epochs are completed or
    ``end_epoch`` (which evaluates, logs and saves) returns True to stop early. ``end_step`` runs
    after every step (mid-epoch checkpoints, stop requests). Under torchrun the epoch statistics are
    summed over the ranks (``dist``)."""
    device = next(model.parameters()).device
    model.train()
    for epoch in range(state.epoch, epochs):
        start = time.perf_counter() - state.epoch_time_s  # a resumed epoch's clock continues
        if state.batch == 0:
            state.sums, state.examples = torch.zeros(3, device=device), 0
        assert state.sums is not None, "a mid-epoch state without its epoch sums"  # set with state.batch > 0
        for x, y in progress.batches(loader.epoch(epoch, start_batch=state.batch), len(loader), epoch):
            lr = schedule.lr_at(state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            n_global = loader.global_batch_size(state.batch)  # == len(y) in one process
            loss, logits = train_step(model, optimizer, controller, objective, x, y, step=state.step,
                                      attack_bn_mode=attack_bn_mode, loss_weight=len(y) * loader.world_size / n_global,
                                      precision=precision)
            with torch.no_grad():  # on the device, no host sync: the finite count grows only while unbroken
                finite = (torch.isfinite(loss) & (state.sums[2] == state.batch)).float()
                state.sums += torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum().float(),
                                           finite])
            if cost is not None:  # FLOPs at the densities in force for this step; no host sync
                cost.step(n_global, controller.masks)
            state.step, state.batch, state.examples = state.step + 1, state.batch + 1, state.examples + len(y)
            state.epoch_time_s = time.perf_counter() - start
            end_step(state)
        dist.agree_finite_(state)
        state.check_finite()
        loss_sum, correct, examples = dist.all_reduce_sum_(
            torch.cat([state.sums[:2], state.sums.new_tensor([state.examples])])).tolist()
        stats = EpochStats(epoch=epoch + 1, train_loss=loss_sum / max(examples, 1),
                           train_robust_acc=100.0 * correct / max(examples, 1),
                           epoch_time_s=state.epoch_time_s, lr=schedule.lr_at(state.step - 1))
        state.epoch, state.batch, state.epoch_time_s = epoch + 1, 0, 0.0
        if end_epoch(stats):
            break
    return state
