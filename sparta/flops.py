"""FLOPs accounting: inference FLOPs of a (sparse) network and the training cost of a run.

Conventions (every number this module returns is in FLOPs, 1 multiply-add = 2 FLOPs):

**Dense forward, per layer.** :func:`forward_flops_by_layer` runs one forward pass of a single image
inside ``torch.utils.flop_counter.FlopCounterMode`` (PyTorch's analytic counter; its convention is 2
FLOPs per multiply-add and it counts matmul- and convolution-like ops only, no bias adds, BatchNorm,
activations or pooling). The count is attributed to the weight of the module that ran it, named as in
the unwrapped model's ``named_parameters()`` (``body.layer1.0.conv1.weight``: the names ``MaskSet``
uses). By hand: a conv with ``C_in`` inputs, ``C_out`` outputs, a ``k x k`` kernel (groups ``g``) and
an ``H_out x W_out`` output costs ``2 * C_out * (C_in / g) * k^2 * H_out * W_out``; a linear layer
``2 * in * out``.

**Sparse inference.** :func:`inference_flops`: F = sum over weights of dense FLOPs x that layer's
density + FLOPs not attributable to a weight. This is the usual count for unstructured sparsity (e.g.
Evci et al. 2020, "Rigging the Lottery", appendix): a pruned weight's multiply-adds are not counted. A
channel ticket is a physically smaller dense network: count the slim model at density 1.

**Training, per image** (:func:`step_flops_per_image`), with F_d the inference FLOPs at the densities in
force during the step:

- an attack iteration (PGD or FGSM step) = one forward + one *input-only* backward. Backpropagating
  to a conv/linear layer's input costs what its forward costs (the transposed product with the same
  weights); no weight gradient is formed (sparta's attacks call ``torch.autograd.grad`` with respect
  to the input only). So one attack iteration = 2 F_d.
- a training step = forward + full backward (input gradient + weight gradient, each costing about
  one forward) = 3 F_d (the standard 1:2 forward:backward ratio, e.g. Kaplan et al. 2020; Evci et al.
  2020).
- CE objective (Madry et al. 2018) with a k-step attack: (2k + 3) F_d. Clean training (k = 0): 3 F_d;
  FGSM / fast AT (k = 1): 5 F_d; PGD-10: 23 F_d.
- TRADES (Zhang et al. 2019, ``sparta.attacks.trades``): its attack first runs one clean forward for
  the fixed target (F_d), then k iterations (2 F_d each); the training step forwards the clean and the
  adversarial batch and backpropagates through both (2 x 3 F_d). Together (2k + 7) F_d.

  Checked against FlopCounterMode on real PGD and TRADES steps (tests/test_flops.py): exact, except
  that autograd skips the first layer's input gradient in the training backward (the images need
  none), so the count is high by one first-layer forward per training backward (PreAct ResNet-18 on
  CIFAR: 3.5 of 1111 MFLOPs, 0.3%). Kept: it is the convention, and the attack does need that gradient.

  Not counted: the RigL grow step's occasional dense gradient (only every ``update_every`` steps),
  topology updates, BatchNorm/activations, the per-epoch validation attacks.

**Set beside a paper's table.** The training-FLOPs columns of Chen et al. 2022 ("Sparsity Winning
Twice") count ``epochs x training images x 33 x F`` with F the inference FLOPs of the *final* network
and 33 = 3k + 3 for PGD-10: one number per run, not integrated over time; how they count F per layer
is not stated. :func:`paper_table_flops` gives ``epochs * train_images * (3k + 3) * F`` for that
comparison (summary.json ``train_flops_paper_table``: the final training stage only, see
``sparta.summary.training_cost``). The (3k + 3) factor is also what the time-integrated count gives
if each attack iteration is charged a full backward (3 F_d instead of 2 F_d, :func:`full_backward_multiplier`;
summary.json ``train_flops_attack_full_backward``); everything else in sparta uses the counts above.

Inference FLOPs as a fraction of dense depend on how the density is spread over layers, not only on the
density: early layers hold few weights but many FLOPs per weight. PreAct ResNet-18 on 32x32 CIFAR at
density 0.2 with IGQ layer densities keeps about 0.52 of the dense inference FLOPs (ERK 0.51, uniform
0.20; pinned in tests/test_flops.py), so a paper's ratio should be compared with
``inference_flops / inference_flops_dense`` of a run rather than with its density.

**Over time.** :class:`TrainingCostMeter` integrates the per-step cost with the densities in force at
each step (Flying Bird+'s density changes during training) across every stage of a run.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import CheckpointError
from .sparse.masks import MaskSet
from .sparse.select import unwrap

Objective = Literal["ce", "trades"]
OBJECTIVES = ("ce", "trades")

__all__ = [
    "LayerFlops", "forward_flops_by_layer", "inference_flops", "step_multiplier", "step_flops_per_image",
    "paper_table_flops", "full_backward_multiplier", "attack_full_backward_flops",
    "TrainingCostMeter", "savings", "dense_training_flops", "attack_steps_of",
    "mask_densities",
]


# ------------------------------------------------------------------------------------ per layer


@dataclass
class LayerFlops:
    """Dense FLOPs of one forward pass of ONE image.

    ``per_weight``: ``{weight name: FLOPs}`` for every parameter with ``dim() >= 2`` of the unwrapped
    model (0.0 for a weight no module used in the forward); ``other``: FLOPs the counter saw outside
    any module that owns such a weight (0 for sparta's models: FlopCounterMode counts only
    matmul/conv-like ops); ``input_shape``: (C, H, W) of the counted image.
    """

    per_weight: dict[str, float]
    other: float = 0.0
    input_shape: tuple[int, ...] = ()

    @property
    def total(self) -> float:
        return sum(self.per_weight.values()) + self.other


def _weight_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``dim() >= 2`` that ``module`` owns directly (not its children's)."""
    return [p for p in module._parameters.values() if p is not None and p.dim() >= 2]


def forward_flops_by_layer(model: nn.Module, input_shape: tuple[int, int, int]) -> LayerFlops:
    """Dense FLOPs of one forward pass of one ``input_shape`` = (C, H, W) image, per weight name.

    Runs a zero image (batch 1) through the unwrapped model on its own device and dtype, in eval mode
    and under ``torch.no_grad()``, inside ``FlopCounterMode(display=False)``; every module's training
    flag is restored afterwards, so it is safe in the middle of training (no BatchNorm statistics
    change). Attribution: forward pre/post hooks on every module that directly owns a weight with
    ``dim() >= 2`` (conv, linear, ...) read the counter's running total, so a module's FLOPs are what
    the counter saw while it ran, minus what hooked submodules inside it saw. This is independent of
    FlopCounterMode's module naming (robust to wrappers, modules called twice, tied weights). A module
    owning several such weights splits its FLOPs in proportion to their sizes (none in sparta).
    """
    if len(input_shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) positive ints, got {input_shape!r}")
    model = unwrap(model)
    names = {id(p): n for n, p in model.named_parameters()}  # deduplicated: one name per tensor
    per_weight = {n: 0.0 for n, p in model.named_parameters() if p.dim() >= 2}
    first = next(model.parameters(), None)
    if first is not None and first.is_floating_point():
        device, dtype = first.device, first.dtype
    else:
        device, dtype = (first.device if first is not None else torch.device("cpu")), torch.float32

    counter = FlopCounterMode(display=False)
    stack: list[list[float]] = []  # per active hooked module: [counter total at entry, FLOPs of hooked children]

    def pre_hook(module: nn.Module, args: Any) -> None:
        stack.append([float(counter.get_total_flops()), 0.0])

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        start, children = stack.pop()
        spent = float(counter.get_total_flops()) - start
        if stack:
            stack[-1][1] += spent
        own = spent - children
        weights = _weight_params(module)
        size = sum(p.numel() for p in weights)
        for p in weights:
            per_weight[names[id(p)]] += own * p.numel() / size

    handles = []
    for module in model.modules():
        if _weight_params(module):
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    total = float(counter.get_total_flops())
    return LayerFlops(per_weight=per_weight, other=total - sum(per_weight.values()), input_shape=tuple(input_shape))


# ------------------------------------------------------------------------------------ inference


def inference_flops(layer_flops: LayerFlops, layer_densities: Mapping[str, float] | None = None) -> float:
    """Forward FLOPs of one image with unstructured sparsity: sum of dense FLOPs x density + other.

    Layers absent from ``layer_densities`` count at density 1. A name that is not a weight of the
    counted model (e.g. a ``module.`` prefix) is a ValueError rather than silently ignored.
    """
    if not layer_densities:
        return layer_flops.total
    unknown = sorted(set(layer_densities) - set(layer_flops.per_weight))
    if unknown:
        raise ValueError(f"densities name weights the counted model does not have: {unknown[:3]}")
    total = layer_flops.other
    for name, flops in layer_flops.per_weight.items():
        density = float(layer_densities.get(name, 1.0))
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density of {name} must be in [0, 1], got {density}")
        total += flops * density
    return total


# ------------------------------------------------------------------------------------ training


def step_multiplier(attack_steps: int, objective: str) -> int:
    """Per-image cost of one training step in units of F_d (see the module docstring).

    CE: 2k (attack) + 3 (forward + full backward) = 2k + 3. TRADES: 1 (clean target forward) + 2k
    (attack) + 6 (two forwards + two full backwards) = 2k + 7.
    """
    if isinstance(attack_steps, bool) or not isinstance(attack_steps, int) or attack_steps < 0:
        raise ValueError(f"attack_steps must be an int >= 0, got {attack_steps!r}")
    if objective == "ce":
        return 2 * attack_steps + 3
    if objective == "trades":
        return 2 * attack_steps + 7
    raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")


def step_flops_per_image(layer_flops: LayerFlops, layer_densities: Mapping[str, float] | None, *,
                         attack_steps: int, objective: str) -> float:
    """FLOPs of one training step per image at ``layer_densities``: ``step_multiplier * F_d``."""
    return step_multiplier(attack_steps, objective) * inference_flops(layer_flops, layer_densities)


def full_backward_multiplier(attack_steps: int, objective: str) -> int:
    """:func:`step_multiplier` with every attack iteration charged a forward + *full* backward (3 F_d
    instead of 2 F_d): CE 3k + 3, TRADES 3k + 7. Not what sparta's attacks do (they form no weight
    gradient); the convention behind a (3k + 3) x F count."""
    return step_multiplier(attack_steps, objective) + attack_steps


def attack_full_backward_flops(stages: list[Mapping[str, Any]]) -> float:
    """The time-integrated training FLOPs of a run re-charged at :func:`full_backward_multiplier`.

    ``stages``: ``TrainingCostMeter.state_dict()["stages"]``. Within a stage every step's cost is
    ``multiplier * F_d`` with the stage's fixed multiplier, so scaling the stage total by
    ``full / multiplier`` re-charges every step at its own densities.
    """
    total = 0.0
    for s in stages:
        k, objective = int(s["attack_steps"]), str(s["objective"])
        total += float(s["total"]) * full_backward_multiplier(k, objective) / step_multiplier(k, objective)
    return total


def paper_table_flops(epochs: int, train_images: int, inference_flops: float, attack_steps: int = 10,
                      objective: str = "ce") -> float | None:
    """``epochs * train_images * (3k + 3) * F``: the training-FLOPs formula of Chen et al. 2022's tables
    (33 x F for PGD-10), with F the inference FLOPs of the final network. One network and one epoch
    count, so no density change over time and no earlier stage is in it. The formula is PGD-AT's (CE
    objective): None for any other objective (a TRADES step is not (3k + 3) forwards)."""
    for name, value in (("epochs", epochs), ("train_images", train_images), ("attack_steps", attack_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if objective != "ce":
        return None
    return float(epochs) * float(train_images) * (3 * attack_steps + 3) * float(inference_flops)


def dense_training_flops(layer_flops: LayerFlops, *, steps_images: int, attack_steps: int, objective: str) -> float:
    """The dense model of the same architecture trained on the same number of images
    (``steps_images`` = sum of batch sizes over all steps) with the same attack and objective."""
    return steps_images * step_flops_per_image(layer_flops, None, attack_steps=attack_steps, objective=objective)


def savings(sparse_total: float, dense_total: float) -> float:
    """Fraction of FLOPs saved: ``1 - sparse_total / dense_total``."""
    if dense_total <= 0:
        raise ValueError(f"dense_total must be > 0, got {dense_total}")
    return 1.0 - sparse_total / dense_total


def attack_steps_of(cfg: Any) -> int:
    """Attack iterations per training step of a ``Config``: none 0, fgsm 1, pgd ``attack.steps``
    (TRADES uses ``attack.steps`` too)."""
    name = cfg.attack.name
    return 0 if name == "none" else 1 if name == "fgsm" else int(cfg.attack.steps)


def mask_densities(masks: MaskSet | Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Kept fraction per mask, with one host sync when all masks share a device."""
    items = list((masks.masks if isinstance(masks, MaskSet) else masks).items())
    if not items:
        return {}
    if len({m.device for _, m in items}) == 1:
        kept = torch.stack([m.count_nonzero() for _, m in items]).tolist()
    else:
        kept = [int(m.count_nonzero()) for _, m in items]
    return {name: k / m.numel() for (name, m), k in zip(items, kept)}


def _mask_dict(masks: Any) -> Mapping[str, torch.Tensor] | None:
    if masks is None:
        return None
    if isinstance(masks, MaskSet):
        return masks.masks
    if isinstance(masks, Mapping):
        return masks
    raise TypeError(f"masks must be a MaskSet, a mapping of bool masks or None, got {type(masks).__name__}")


def _stage_record(attack_steps: int, objective: str) -> dict[str, Any]:
    return {"total": 0.0, "images": 0, "steps": 0, "attack_steps": attack_steps, "objective": objective}


class TrainingCostMeter:
    """Training FLOPs accumulated step by step, with the densities in force at each step.

    The training loop calls ``step(len(y), controller.masks)`` once per optimizer
    step. Each step is charged ``batch_size * step_flops_per_image(densities)`` where the densities are
    those in force when the step BEGAN: the masks as seen at the previous ``step`` call of the stage
    (for the first step of a stage, or the first after ``load_state_dict``, the masks as passed). So a
    topology update made in ``after_backward`` counts from the NEXT step on, which is exact: the
    update's own step ran its attack, forward and backward on the old topology. (A mask change made
    between steps, outside the loop's hooks, would be picked up one step late; sparta's controllers
    change masks only in ``after_backward`` and at stage boundaries, where ``reset_stage`` is called.)

    ``step`` is cheap: no ``count_nonzero``/``.item()``. A change is detected by comparing the
    identity and in-place version counter (``_version``; MaskSet mutates masks in place, which bumps
    it) of each bool mask (a tuple over ~20 layers for a ResNet-18; the meter keeps references to the
    masks so their ids stay unique); densities (one host sync) are recomputed only
    then. Images are summed as integers per constant-cost segment, so the total is exact up to one
    float rounding per segment.

    ``total``: FLOPs so far, every stage included. ``reset_stage`` starts a new stage (another attack,
    objective or model, e.g. a slimmed channel ticket) and keeps ``total``. ``state_dict`` /
    ``load_state_dict`` hold plain numbers (and the objective name) so a resumed run continues the
    count exactly: build the meter with the settings of the stage being resumed, then load.
    """

    def __init__(self, layer_flops: LayerFlops, *, attack_steps: int, objective: str):
        self._closed = 0.0  # FLOPs of finished segments (all stages)
        self.stages: list[dict[str, Any]] = []
        self._start_stage(layer_flops, attack_steps, objective)

    # -- stages ------------------------------------------------------------------------------------
    def _start_stage(self, layer_flops: LayerFlops, attack_steps: int, objective: str) -> None:
        self._multiplier = step_multiplier(attack_steps, objective)  # validates both
        self.layer_flops = layer_flops
        self.attack_steps, self.objective = attack_steps, objective
        self.stages.append(_stage_record(attack_steps, objective))
        self._forget_masks()

    def _forget_masks(self) -> None:
        self._cost: float | None = None  # per-image FLOPs of the current segment
        self._pending = 0  # images charged at self._cost, not yet folded into the totals
        self._held: tuple = ()  # the masks of self._key, referenced so their ids cannot be reused
        self._key: tuple | None = None

    def reset_stage(self, layer_flops: LayerFlops, *, attack_steps: int, objective: str) -> None:
        """Start the next stage (its own model, attack and objective); ``total`` is kept."""
        self._fold()
        self._start_stage(layer_flops, attack_steps, objective)

    # -- per step ----------------------------------------------------------------------------------
    @staticmethod
    def _key_of(masks: Mapping[str, torch.Tensor] | None) -> tuple | None:
        if masks is None:
            return None
        return tuple((id(m), m._version) for m in masks.values())

    def _cost_of(self, masks: Mapping[str, torch.Tensor] | None) -> float:
        densities = None if masks is None else mask_densities(masks)
        return self._multiplier * inference_flops(self.layer_flops, densities)

    def _pending_flops(self) -> float:
        """FLOPs of the steps charged since the last fold."""
        if not self._pending:
            return 0.0
        assert self._cost is not None  # set at the stage's first step, before anything is pending
        return self._pending * self._cost

    def _fold(self) -> None:
        if self._pending:
            spent = self._pending_flops()
            self._closed += spent
            self.stages[-1]["total"] += spent
            self._pending = 0

    def step(self, batch_size: int, masks: MaskSet | Mapping[str, torch.Tensor] | None = None) -> None:
        """Charge one optimizer step of ``batch_size`` images (see the class docstring for timing)."""
        mask_dict = _mask_dict(masks)
        key = self._key_of(mask_dict)
        if self._cost is None:  # first step of the stage: the masks as they are now were in force
            self._remember(mask_dict, key)
        self._pending += batch_size
        record = self.stages[-1]
        record["images"] += batch_size
        record["steps"] += 1
        if key != self._key:  # changed during this step: the new densities count from the next step
            self._fold()
            self._remember(mask_dict, key)

    def _remember(self, masks: Mapping[str, torch.Tensor] | None, key: tuple | None) -> None:
        self._cost = self._cost_of(masks)
        self._held = () if masks is None else tuple(masks.values())
        self._key = key

    # -- totals ------------------------------------------------------------------------------------
    @property
    def total(self) -> float:
        """Training FLOPs so far, every stage included."""
        return self._closed + self._pending_flops()

    @property
    def stage_total(self) -> float:
        """Training FLOPs of the current stage so far."""
        return self.stages[-1]["total"] + self._pending_flops()

    @property
    def images(self) -> int:
        """Training images processed so far (sum of batch sizes), every stage included."""
        return sum(s["images"] for s in self.stages)

    @property
    def steps(self) -> int:
        return sum(s["steps"] for s in self.stages)

    def stage_totals(self) -> list[float]:
        self._fold()
        return [float(s["total"]) for s in self.stages]

    def state_dict(self) -> dict[str, Any]:
        """``{"total": float, "stages": [{"total", "images", "steps", "attack_steps", "objective"}]}``."""
        self._fold()
        # the per-image cost in force: a resumed run charges its next step at it, exactly as an
        # uninterrupted run would (the masks may have changed during the last step before saving)
        return {"total": float(self._closed), "stages": [dict(s) for s in self.stages], "cost_in_force": self._cost}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; the current stage (settings given at construction or by the last
        ``reset_stage``) continues the last stage record. The next step is charged at the cost in force
        when the state was saved, then the masks are re-read."""
        stages = [dict(s) for s in state["stages"]]
        if not stages:
            raise CheckpointError("training-cost state holds no stage")
        for s in stages:
            s["total"], s["images"], s["steps"] = float(s["total"]), int(s["images"]), int(s["steps"])
        self._closed = float(state["total"])
        self.stages = stages
        self._forget_masks()
        if state.get("cost_in_force") is not None:
            self._cost = float(state["cost_in_force"])
            self._key = ("resumed",)  # matches no masks: the first step re-reads them after charging
