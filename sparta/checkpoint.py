"""Checkpoints: their schema (``RunCheckpoint``), atomic writes and safe reads.

``RunCheckpoint`` is the one place that says what a checkpoint holds; ``save`` writes it and ``load``
reads it back. On disk it is a plain dict of tensors and primitive containers, written to a temporary
file in the same folder, fsynced and renamed over the old one, so a kill at any instant leaves either
the old or the new file, never a torn one. It is loaded with ``torch.load(weights_only=True)``: no
pickled code is ever executed, and any program can read it without sparta.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .rundir import atomic_write

# The schema's version. 1: checkpoints written before the field existed (the same keys; ``precision``,
# ``epoch_sums``, ``world_size`` and ``torch_version`` may be missing in the oldest). 2: ``format`` added.
FORMAT = 2


@dataclass
class RunCheckpoint:
    """Everything a run needs to resume, or an evaluator to rebuild its network.

    ``model``: state_dict of the unwrapped model; ``masks``: {parameter name: bool keep-mask}, empty
    when dense; ``config``: the run's config as a plain dict (its last stage's); ``model_spec``: what
    ``netspec.build_model`` needs (a channel ticket's ``channel_plan`` included); ``stage_index`` /
    ``stage``: the stage being trained; ``epoch`` / ``step``: done so far; ``optimizer``,
    ``controller``, ``precision`` (the fp16 loss scale): their state_dicts; ``train_state``: the loop's
    counters and best epoch (``sparta.train.TrainState``); ``epoch_sums``: every rank's share of a
    mid-epoch average; ``run``: ``RunContext.state_dict()`` (carry, info, stage costs, FLOPs meter);
    ``rng``: random streams of every rank.
    """

    model: dict[str, Any]
    model_spec: dict[str, Any]
    masks: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    stage_index: int = 0
    stage: str = ""
    epoch: int = 0
    step: int = 0
    optimizer: dict[str, Any] = field(default_factory=dict)
    controller: dict[str, Any] = field(default_factory=dict)
    train_state: dict[str, Any] = field(default_factory=dict)
    epoch_sums: Any = None
    run: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    precision: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    torch_version: str = ""
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        """The on-disk dict (shallow: tensors are not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, state: dict[str, Any], path: str | Path) -> RunCheckpoint:
        """A checkpoint read from ``path``: any version up to ``FORMAT``; missing keys take their defaults."""
        if not isinstance(state, dict) or "model" not in state or "model_spec" not in state:
            raise CheckpointError(f"{path} is not a sparta checkpoint (no model/model_spec entries)")
        version = state.get("format", 1)
        if not isinstance(version, int) or version > FORMAT:
            raise CheckpointError(f"{path} was written by a newer sparta (checkpoint format {version}, this one reads "
                                  f"up to {FORMAT}); upgrade sparta to read it")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in state.items() if k in known}, "format": version})


def save(ckpt: RunCheckpoint, path: str | Path) -> None:
    """Write ``ckpt`` atomically; an OSError leaves the previous checkpoint intact."""
    try:
        atomic_write(path, lambda f: torch.save(ckpt.to_dict(), f))
    except OSError as e:
        raise CheckpointError(
            f"could not write checkpoint {path} ({e.strerror or e}); the previous checkpoint is intact"
        ) from None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> RunCheckpoint:
    """Read a checkpoint safely; a missing, torn, foreign or newer file is one ``CheckpointError`` line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupted, or holding pickled code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({first[:200]}); it is corrupted or not a sparta "
                              "checkpoint") from None
    return RunCheckpoint.from_dict(state, path)
