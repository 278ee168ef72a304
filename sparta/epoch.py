"""What happens between the loop's steps and epochs in one stage: evaluate, pick the best epoch,
write checkpoints and metrics, stop.

``sparta.train.fit`` calls ``end_step`` after every optimizer step and ``end_epoch`` after every
epoch; both are plain functions of a ``StageRun`` (the pieces of the stage being trained), so the
policy reads top to bottom and each piece is testable on its own.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, outcomes
from .config import Config
from .data.base import ImageSet
from .distributed import Distributed
from .errors import ConfigError, DivergedError
from .evaluate import evaluate
from .precision import StepPrecision
from .protocol import improves
from .rundir import RunDir
from .signals import StopRequests
from .sparse.controllers import SparsityController
from .stages import RunContext, Stage
from .train import EpochStats, TrainState


@dataclass
class StageRun:
    """One stage being trained: what the end-of-step and end-of-epoch policies read and write."""

    stages: list[Stage]
    index: int  # of the stage in ``stages``
    run: RunContext
    optimizer: torch.optim.Optimizer
    controller: SparsityController
    precision: StepPrecision
    state: TrainState  # the loop's own object: fit() advances it
    rd: RunDir
    dist: Distributed
    stop: StopRequests
    attack: Callable  # the evaluation attack
    val: ImageSet | None
    test: ImageSet

    @property
    def stage(self) -> Stage:
        return self.stages[self.index]

    @property
    def cfg(self) -> Config:
        return self.stage.cfg


def save_checkpoint(s: StageRun, path: Path) -> None:
    """Write a checkpoint of the state now; a non-finite state is never written (the last good one
    stays). A collective: every rank calls it (the ranks agree on finiteness, rank 0 writes)."""
    state, model, dist = s.state, s.run.model, s.dist
    dist.agree_finite_(state)
    state.check_finite()
    if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
        raise DivergedError(f"the weights became NaN or infinite by step {state.step}; stopped without saving them, "
                            "so checkpoints/last.pt holds the last good state: lower optim.lr (or check the data)")
    rng, epoch_sums = dist.rng_state(), dist.gather_epoch_sums(state)
    dist.on_main(lambda: checkpoint.save(checkpoint.RunCheckpoint(
        model=model.state_dict(), masks=s.controller.mask_state(), config=s.stages[-1].cfg.to_dict(),
        model_spec=s.run.spec, stage_index=s.index, stage=s.stage.name, epoch=state.epoch,
        step=state.step, optimizer=s.optimizer.state_dict(), controller=s.controller.state_dict(),
        train_state=asdict(state), epoch_sums=epoch_sums, run=s.run.state_dict(), rng=rng,
        precision=s.precision.state_dict(), world_size=dist.world_size,
        torch_version=str(torch.__version__)), path))


def _evaluate(s: StageRun, images: ImageSet, *, outcomes: bool = False) -> dict[str, Any]:
    e = s.cfg.eval
    return evaluate(s.run.model, images, s.attack, batch_size=e.batch_size, device=s.run.device, dist=s.dist,
                    precision=e.precision, outcomes=outcomes)


def evaluate_epoch(s: StageRun) -> tuple[dict[str, Any], dict[str, float] | None, outcomes.Outcomes]:
    """Validation and test accuracy of the model now, as metrics keys, the validation result (None
    without a validation split) and the test images' outcomes. Every rank evaluates with rank 0's BN
    statistics."""
    s.dist.broadcast_buffers_(s.run.model)
    v, t = (_evaluate(s, s.val) if s.val is not None else None), _evaluate(s, s.test, outcomes=True)
    return {"val_clean_acc": v and v["clean_acc"], "val_robust_acc": v and v["robust_acc"],
            "val_robust_loss": v and v["robust_loss"], "test_clean_acc": t["clean_acc"],
            "test_robust_acc": t["robust_acc"], "test_robust_loss": t["robust_loss"]}, v, t["outcomes"]


def window_validation(s: StageRun, val: dict[str, float] | None) -> dict[str, float]:
    """Robust accuracy and loss on the first ``controller.epoch_val_images`` validation images (None:
    all of them), for a controller that adapts on per-epoch statistics (Flying Bird+'s window). The
    same images every epoch, evaluated or not; ``val``, this epoch's full validation result if any, is
    reused when the window's images are exactly those."""
    if s.val is None:
        raise ConfigError(f"stage {s.stage.name}'s controller needs a validation split every epoch (data.val_size > 0)")
    n = s.controller.epoch_val_images
    if val is None or (n is not None and n < len(s.val)):
        s.dist.broadcast_buffers_(s.run.model)  # every rank measures rank 0's BN statistics
        val = _evaluate(s, s.val if n is None else s.val.subset(0, min(n, len(s.val))))
    return {"window_val_robust_acc": val["robust_acc"], "window_val_robust_loss": val["robust_loss"]}


def end_epoch(s: StageRun, stats: EpochStats, on_epoch: Callable[[dict[str, Any]], None]) -> bool:
    """After epoch ``stats.epoch``: evaluate (every ``eval.every`` epochs and the last), measure the
    per-epoch validation statistics a controller asks for (``epoch_val_images``), let the controller
    see the epoch, select the best epoch on validation robust accuracy, write the metrics
    record and the checkpoints, hand the record to ``on_epoch``, honour a stop request. Returns
    whether the stage is done (its controller says so)."""
    start = time.perf_counter()
    cfg, state, dist, stage = s.cfg, s.state, s.dist, s.stage
    assert s.run.cost is not None, "RunContext.start_cost runs before a stage trains"
    last = stats.epoch == cfg.epochs
    record: dict[str, Any] = {"stage": stage.name, "epoch": stats.epoch, "step": state.step, "lr": stats.lr,
                              "train_loss": stats.train_loss, "train_robust_acc": stats.train_robust_acc,
                              "train_flops": s.run.cost.total}
    evaluated = stats.epoch % cfg.eval.every == 0 or last
    val = tested = None
    if evaluated:
        scores, val, tested = evaluate_epoch(s)
        record.update(scores)
    if s.controller.epoch_val_images != 0:  # in the record, so written on evaluated epochs only
        record.update(window_validation(s, val))
    s.controller.end_epoch(stats.epoch, record)  # every epoch: early-bird checks, FB+ statistics
    record.update(s.controller.epoch_log())
    is_best = False
    if evaluated and stage.select_best:
        selector = val["robust_acc"] if val is not None else float(stats.epoch)  # no validation: latest wins
        is_best = improves(selector, state.best_val_robust_acc)
        if is_best:
            state.best_val_robust_acc, state.best_epoch = selector, stats.epoch
    eval_time = time.perf_counter() - start
    state.wall_time_s += stats.epoch_time_s + eval_time
    record.update(epoch_time_s=stats.epoch_time_s, eval_time_s=eval_time,
                  wall_time_s=s.run.wall_time_s(excluding=stage.name) + state.wall_time_s)
    done = s.controller.done
    stopping = s.stop.agree(dist.share_signal)  # a signal any rank got stops all of them here
    dist.agree(f"at the end of epoch {stats.epoch}", best=is_best, stop=done)
    if evaluated:
        assert tested is not None  # evaluate_epoch gave the test outcomes
        line = outcomes.record(tested, stage=stage.name, epoch=stats.epoch, split="test")

        def write() -> None:
            s.rd.append_metrics(record)
            s.rd.append_outcomes(line)

        dist.on_main(write)
        s.run.records += 1
    if is_best:
        save_checkpoint(s, s.rd.best)
    if stats.epoch % cfg.checkpoint.every_epochs == 0 or last or stopping:
        save_checkpoint(s, s.rd.last)
    if evaluated:
        on_epoch(record)
    s.stop.raise_if_requested(state.step, s.rd.path)
    return done


def end_step(s: StageRun) -> None:
    """After an optimizer step: a mid-epoch checkpoint every ``checkpoint.every_steps`` steps or on a
    stop request (the loader position and the epoch's sums are in ``train_state``), then the stop."""
    every = s.cfg.checkpoint.every_steps
    if s.stop.agree(s.dist.share_signal) or (every is not None and s.state.step % every == 0):
        save_checkpoint(s, s.rd.last)
        s.stop.raise_if_requested(s.state.step, s.rd.path)
