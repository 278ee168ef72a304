"""Stages: a method is a list of them, each a ``fit`` with its own config and controller.

Robust Bird = a cheap search stage until the early-bird ticket, then prune and train the sparse
network adversarially; boosting tickets = a finder stage, prune + rewind, a short adversarial stage;
magnitude = dense pretraining, prune once, fine-tune; HYDRA = dense pretraining, score learning with
frozen weights, fine-tune the top-scored weights; dense, static and Flying Bird(+) = one stage.
Transitions (draw the ticket, prune, rewind, slim channels) run in ``Stage.after`` and change the
``RunContext`` the next stage starts from.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import Config
from .flops import TrainingCostMeter, attack_steps_of, forward_flops_by_layer
from .netspec import build_model, input_shape
from .sparse.controllers import SparsityController


@dataclass
class Carry:
    """Tensors a stage hands to the next (CPU copies): ``initial`` every parameter and buffer of the
    network at initialisation, for rewinding a ticket (set by a recipe's ``before``); ``ticket`` the
    keep-masks ``{parameter name: bool tensor}`` that the next stage trains (set by a transition).
    Checkpointed as a plain dict with these keys, as before the class existed."""

    initial: dict[str, torch.Tensor] | None = None
    ticket: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("initial", self.initial), ("ticket", self.ticket)) if v is not None}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Carry:
        return cls(initial=state.get("initial"), ticket=state.get("ticket"))


@dataclass
class RunContext:
    """What lives across the stages of one run, all of it checkpointed.

    ``model`` may be replaced between stages (a channel ticket is a smaller network) together with
    its ``spec``; ``carry`` holds tensors later stages need (``Carry``: initial weights, ticket masks); ``info``
    holds facts for summary.json (e.g. the early-bird epoch); ``stages`` the cost of finished stages.
    """

    model: nn.Module
    spec: dict[str, Any]
    device: torch.device
    carry: Carry = field(default_factory=Carry)
    info: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    records: int = 0  # metrics.jsonl records written so far
    cost: TrainingCostMeter | None = None  # training FLOPs over all stages (sparta.flops)

    def wall_time_s(self, excluding: str | None = None) -> float:
        """Wall time of the recorded stages, leaving out the stage named ``excluding``."""
        return sum(s["wall_time_s"] for s in self.stages if s["name"] != excluding)

    def record_stage(self, cost: dict[str, Any]) -> None:
        """Set the cost of a finished (or, on resume, extended) stage; one entry per stage name."""
        self.stages = [s for s in self.stages if s["name"] != cost["name"]] + [cost]

    def replace_model(self, model: nn.Module, spec: dict[str, Any]) -> None:
        self.model, self.spec = model.to(self.device), spec

    def start_cost(self, cfg: Config, saved: dict[str, Any] | None) -> None:
        """Count this stage's training FLOPs: the model as it is now, the stage's attack and objective;
        ``saved`` (a resumed checkpoint's count) continues an interrupted count exactly."""
        layer_flops = forward_flops_by_layer(self.model, input_shape(self.spec))
        steps, objective = attack_steps_of(cfg), cfg.objective.name
        if self.cost is None or saved is not None:
            self.cost = TrainingCostMeter(layer_flops, attack_steps=steps, objective=objective)
            if saved is not None:
                self.cost.load_state_dict(saved)
        else:
            self.cost.reset_stage(layer_flops, attack_steps=steps, objective=objective)

    def state_dict(self) -> dict[str, Any]:
        return {"carry": self.carry.state_dict(), "info": self.info, "stages": self.stages, "records": self.records,
                "cost": self.cost.state_dict() if self.cost is not None else None}

    def load_state_dict(self, state: dict[str, Any], spec: dict[str, Any], model_state: dict[str, Any]) -> None:
        if spec != self.spec:  # a later stage runs a different (e.g. slimmed) network
            self.replace_model(build_model(spec), spec)
        self.model.load_state_dict(model_state)
        self.carry, self.info = Carry.from_state(state["carry"]), state["info"]
        self.stages, self.records = [dict(s) for s in state["stages"]], int(state["records"])


# (stage config, run, optimizer, steps per epoch) -> the controller the loop calls
ControllerBuilder = Callable[[Config, RunContext, torch.optim.Optimizer, int], SparsityController]


@dataclass
class Stage:
    """One ``fit`` of a recipe. It ends after ``cfg.epochs`` epochs, or earlier at the end of an epoch
    after which its controller's ``done`` is True (Robust Bird's search at the early-bird ticket)."""

    name: str  # "train", "search", "finder", ...: the `stage` field of metrics.jsonl
    cfg: Config  # this stage's config: epochs, optim, attack, objective, eval
    controller: ControllerBuilder
    select_best: bool = True  # keep checkpoints/best.pt on validation robust accuracy
    before: Callable[[RunContext], None] | None = None  # runs once, before the stage's first epoch
    after: Callable[[RunContext, SparsityController], None] | None = None  # the transition to the next stage
