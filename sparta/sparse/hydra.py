"""HYDRA's score stage (Sehwag et al., NeurIPS 2020, "HYDRA: Pruning Adversarially Robust Neural
Networks"): learn an importance score per prunable weight under the adversarial loss, with every
weight of the network frozen.

Per prunable weight ``w`` (conv ``(out, in, kh, kw)`` or linear ``(out, in)``) a score tensor ``s`` of
the same shape. The forward uses ``w * m`` with ``m = top_k(|s|)``: the ``k`` largest |scores| of that
layer (``k`` = the layer's kept count). The gradient reaches the scores straight through the top-k
(d m / d|s| = identity, the paper's estimator; its code ranks ``|s|``, so d|s| / ds = sign(s)):

    dL/ds = dL/d(w * m) * w * sign(s)            (elementwise, all positions, kept or not)

How it runs inside sparta's loop without a new hook: the model's weight tensors hold ``w * m`` (the
controller keeps the pretrained ``w`` aside). The loop's backward then leaves ``dL/d(w * m)`` in each
weight's ``.grad`` (dense: a pruned position gets a gradient too); ``after_backward`` turns it into
the score gradient above and clears every model parameter's gradient, so the optimizer moves
the scores only (optimizers skip parameters without a gradient: no step, no weight decay, no
momentum). The scores are a parameter group added to the loop's optimizer, so the stage's lr
schedule, the fp16 loss scaler and the checkpointed optimizer state cover them; ``after_step``
re-ranks the scores and writes ``w * m`` again. Scores start at ``sqrt(6 / fan_in) * w / max|w|`` of
their layer (the authors' code, ``initialize_scaled_score``), so the first mask is each layer's
magnitude top-k.

Differences from the authors' code: every parameter is frozen, BatchNorm's affine ones included (their
``freeze_bn`` defaults to False, which trains the BN weights and biases during score learning);
BatchNorm running statistics do update, as there (the network runs in train mode). ``k`` is the
exact per-layer count of ``sparta.sparse.tickets.layer_counts`` (theirs keeps numel - int((1 - k)
numel)). FLOPs: the forward and the attack run the sparse ``w * m``, but the scores need the gradient
of every weight, pruned or not, so the stage is charged as dense (``masks`` is None for the
loop's FLOPs meter), an upper bound.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .masks import MaskSet, hamming_distance
from .select import prunable_parameters, unwrap
from .tickets import layer_top_k_masks


def scaled_score_init(weight: torch.Tensor) -> torch.Tensor:
    """HYDRA's initial scores of one layer: ``sqrt(6 / fan_in) * w / max|w|`` (zeros for an all-zero
    layer); fan_in = in_channels * kh * kw of a conv, in_features of a linear layer."""
    fan_in = math.prod(weight.shape[1:])
    peak = weight.detach().abs().max()
    if float(peak) == 0.0:
        return torch.zeros_like(weight)
    return math.sqrt(6.0 / fan_in) * weight.detach() / peak


class HydraScores:
    """The score-stage controller: owns the scores (``scores[name]``, nn.Parameters shaped like the
    weights) and the pretrained weights (``weights[name]``); the mask in force is
    ``mask_set`` (top-k of |scores| per layer, ``counts[name]`` kept). See the module docstring."""

    masks = None  # FLOPs charged dense (module docstring); the mask in force is mask_set
    topology_updates = 0  # the mask follows the scores, which every rank holds alike (no sync needed)
    done = False  # learns for the whole stage
    epoch_val_images = 0  # no per-epoch validation

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, counts: Mapping[str, int],
                 exclude: list[str] | tuple[str, ...] = ()):
        params = prunable_parameters(model, exclude)
        if set(counts) != set(params):
            raise ValueError(f"counts and prunable weights differ: {sorted(set(counts) ^ set(params))}")
        self.counts = dict(counts)
        self.params = params
        self.all_params = list(unwrap(model).parameters())
        with torch.no_grad():
            self.weights = {n: p.detach().clone() for n, p in params.items()}  # pretrained w, frozen
            self.scores = {n: nn.Parameter(scaled_score_init(p)) for n, p in params.items()}
        optimizer.add_param_group({"params": list(self.scores.values())})  # lr, momentum, wd: the stage's
        self.mask_set = MaskSet(params, self._top_k())
        self.initial_masks = self.mask_set.state_dict()  # the magnitude top-k the scores start from
        self._write_weights()

    def _top_k(self) -> dict[str, torch.Tensor]:
        return layer_top_k_masks({n: s.detach().abs() for n, s in self.scores.items()}, self.counts)

    @torch.no_grad()
    def _write_weights(self) -> None:
        """model weight = pretrained w * mask of the current scores (exactly 0 where pruned)."""
        for name, mask in self._top_k().items():
            self.mask_set.masks[name].copy_(mask)  # in place: MaskSet refreshes its float copy
            self.params[name].copy_(self.weights[name])
        self.mask_set.apply_()

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        for name, p in self.params.items():
            s = self.scores[name]
            # (same shape as w): straight through the top-k, then through |s|
            s.grad = None if p.grad is None else p.grad * self.weights[name] * torch.sign(s)
        for p in self.all_params:  # the weights are frozen: the optimizer skips gradient-less parameters
            p.grad = None

    def after_step(self, step: int) -> None:
        self._write_weights()

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def mask_changed(self) -> float:
        """Fraction of prunable positions whose mask differs from the initial (magnitude) one."""
        return hamming_distance(self.mask_set.state_dict(), self.initial_masks)

    def epoch_log(self) -> dict[str, Any]:
        return {"density": self.mask_set.density(), "score_mask_changed": self.mask_changed()}

    def mask_state(self) -> dict[str, Any]:
        return self.mask_set.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """Scores, pretrained weights and the initial masks (CPU copies); the scores' momentum is in
        the loop optimizer's state (its last parameter group), checkpointed beside this."""

        def cpu(d: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: t.detach().to("cpu", copy=True) for n, t in d.items()}

        return {"scores": cpu(self.scores), "weights": cpu(self.weights), "initial_masks": dict(self.initial_masks)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.scores:  # copied in place: the optimizer holds these very tensors
            self.scores[name].copy_(state["scores"][name])
            self.weights[name].copy_(state["weights"][name])
        self.initial_masks = {n: m.to("cpu", torch.bool) for n, m in state["initial_masks"].items()}
        self._write_weights()
