"""Sparsity controllers: the only place where sparse-training logic meets the training loop.

The loop (``sparta.train.fit``) calls, for every training step::

    loss.backward()
    controller.after_backward(step)   # may read dense grads and change topology; then masks grads
    optimizer.step()
    controller.after_step(step)       # keeps masked weights at exactly zero
    ...
    controller.end_epoch(epoch, metrics)   # once per epoch (FB+ statistics, early bird)

``Dense`` is the no-op controller, so the loop never branches on "is this run sparse".

Controllers here:

- ``Dense``: no sparsity.
- ``Static``: fixed masks (Robust Bird stage 2, boosting / lottery tickets, random static sparsity).
- ``DynamicSparse``: Flying Bird — drop smallest-magnitude weights, grow random (SET) or largest
  dense-gradient (RigL) ones every ``update_every`` steps, at a fixed density.
- ``AdaptiveDensity``: Flying Bird+ — DynamicSparse whose density reacts to the robust
  generalization gap and the validation robust loss.

HYDRA's score-stage controller (``HydraScores``) is in ``sparse.hydra``; the early-bird search in
``sparse.early_bird``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, Literal, Protocol

import torch
from torch import nn

from ..errors import ConfigError
from .masks import MaskSet
from .select import unwrap
from .tickets import select_k_mask


class SparsityController(Protocol):
    """Hooks the training loop calls (see the module docstring for when), and the attributes the loop
    reads:

    - ``masks``: the keep-masks in force (None when the controller masks nothing, and for HYDRA's
      score stage, whose steps cost dense FLOPs: ``sparse.hydra``); the loop counts FLOPs with them
      and synchronises them across ranks at the start of a stage;
    - ``topology_updates``: how many times the masks changed so far (0 for fixed masks); under DDP a
      change is synchronised across ranks right after the hook that made it;
    - ``done``: True once the controller's stage has reached its goal, which ends the stage at the end
      of that epoch;
    - ``epoch_val_images``: 0, or how many of the stage's validation images (the first ones; None: all)
      the loop evaluates with the evaluation attack after every epoch, evaluated or not, handing the
      result to ``end_epoch`` as ``window_val_robust_acc`` / ``window_val_robust_loss`` (Flying Bird+).

    Anything else a recipe reads (Robust Bird's ``eb_epoch``) it reads from the concrete class it built.
    The loop only reads these four, so they are read-only here: a class attribute, an instance attribute
    or a property (``EarlyBirdSearch.done``) of a narrower type (``Static.masks``: never None) fits."""

    @property
    def masks(self) -> MaskSet | None: ...

    @property
    def topology_updates(self) -> int: ...

    @property
    def done(self) -> bool: ...

    @property
    def epoch_val_images(self) -> int | None: ...

    def after_backward(self, step: int) -> None: ...

    def after_step(self, step: int) -> None: ...

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def epoch_log(self) -> dict[str, Any]:
        """Fields added to this epoch's ``metrics.jsonl`` record (at least ``density``)."""
        ...

    def mask_state(self) -> dict[str, Any]:
        """``{parameter name: bool keep-mask}`` for the checkpoint's ``masks`` entry ({} when dense)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Dense:
    """No sparsity: every hook is a no-op and the density is 1."""

    masks = None
    topology_updates = 0
    done = False
    epoch_val_images = 0

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def epoch_log(self) -> dict[str, Any]:
        return {"density": 1.0}

    def mask_state(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _check_masks_belong_to(model: nn.Module, masks: MaskSet) -> None:
    """A MaskSet built for another model (or before a re-creation) would silently mask nothing."""
    ids = {id(p) for p in unwrap(model).parameters()}
    strangers = [name for name, p in masks.params.items() if id(p) not in ids]
    if strangers:
        raise ValueError(f"masks hold parameters that are not the model's: {strangers[:3]}")


class Static:
    """Fixed masks: pruned weights stay exactly zero and nothing regrows.

    Used for random static sparsity (``random_static``), Robust Bird's stage 2 and (boosting /
    lottery) tickets. Construction applies the masks to the weights and zeroes the optimizer state
    of pruned weights, so a MaskSet can be handed over mid-training.
    """

    topology_updates = 0  # fixed masks (DynamicSparse counts its updates)
    done = False  # trains to the end of its stage
    epoch_val_images: int | None = 0  # no per-epoch validation (AdaptiveDensity sets it)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, masks: MaskSet):
        _check_masks_belong_to(model, masks)
        self.model, self.optimizer, self.masks = model, optimizer, masks
        masks.apply_()
        masks.zero_optimizer_state_(optimizer)

    def after_backward(self, step: int) -> None:
        self.masks.mask_grads_()  # one fused multiply

    def after_step(self, step: int) -> None:
        # Not needed for SGD (momentum, nesterov, weight decay), Adam or AdamW (with amsgrad): with a
        # masked grad and zeroed state every term of their update at a pruned position is zero, so the
        # weight stays exactly zero (tests/test_controllers.py proves it with this hook skipped). The
        # one fused multiply is cheap insurance for optimizers where that does not hold (an update that
        # is not a multiple of grad, state or weight) and against in-place edits of the weights.
        self.masks.apply_()

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def epoch_log(self) -> dict[str, Any]:
        return {"density": self.masks.density()}

    def mask_state(self) -> dict[str, Any]:
        return self.masks.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["masks"])
        # No-ops when model and optimizer state come from the same checkpoint as the masks; otherwise
        # (e.g. masks loaded into a freshly trained model) they make the loaded masks hold at once.
        self.masks.apply_()
        self.masks.zero_optimizer_state_(self.optimizer)


def random_static(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    density: float,
    distribution: str = "igq",
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> Static:
    """Static sparsity from a random mask with exact per-layer counts (see ``MaskSet.random``)."""
    return Static(model, optimizer, MaskSet.random(model, density, distribution, seed=seed, exclude=exclude))


def _ceil(x: float) -> int:
    """ceil that ignores float noise, e.g. 0.1 * 3 * 10 = 3.0000000000000004 counts as 3."""
    return math.ceil(round(x, 9))


GROWTH_MODES = ("random", "gradient")
REGROWTH_RULES = ("exclusive", "authors")  # see DynamicSparse


class DynamicSparse(Static):
    """Flying Bird (Chen et al., ICLR 2022, "Sparsity Winning Twice"): dynamic sparse adversarial
    training at a fixed density, in the style of SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

    Every ``update_every`` steps (``update_every_late`` from ``late_from_step`` on; None means half of
    ``total_steps``), each layer with ``nnz`` active weights drops its ``ceil(r * nnz)`` smallest-|w|
    active weights and grows as many: uniformly at random (``growth="random"``, SET; from a generator
    seeded with ``seed``) or those with the largest |dense gradient| of the current batch
    (``growth="gradient"``, RigL). ``regrowth`` says where growth may land:

    - ``"exclusive"`` (RigL's rule): only positions that were inactive before the drop, so a
      just-dropped weight is never regrown in the same update. Dropped and grown weights are set to
      exactly 0 and their optimizer state zeroed.
    - ``"authors"`` (the paper's code, built on the sparselearning library of Dettmers & Zettlemoyer
      2019 / Liu et al. 2021): every position inactive after the drop, just-dropped ones included. A
      weight dropped and drawn again is left untouched (value and optimizer state), as there death
      only edits the mask and weights are multiplied by the mask after growth; a dropped-only weight
      is set to 0 with zeroed optimizer state; a newly grown one (inactive before) starts at 0 with
      zeroed state. With random growth a dropped weight is drawn again with probability
      n_drop / (inactive + n_drop), so a layer changes 2 n_drop inactive / (inactive + n_drop) weights
      per update on average against 2 min(n_drop, inactive) under ``"exclusive"``: the ratio,
      1 + min / max of n_drop and inactive, is largest (up to 2) where n_drop is near the inactive
      count, i.e. in the denser layers (the early ones under IGQ).

    In both, the weights that change are exactly those whose mask flipped; ``update_log`` and
    ``last_update`` count them (``changed``). Per-layer counts never change. ``r`` (the paper's death
    rate) follows a cosine decay from ``drop_fraction`` to ``drop_fraction_final`` over
    ``total_steps``: r(t) = final + (initial - final) (1 + cos(pi t / T)) / 2.

    Unlike the paper's code (Bernoulli growth, so densities drift), counts are exact under both rules.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        masks: MaskSet,
        *,
        total_steps: int,
        update_every: int = 900,
        update_every_late: int | None = 1200,
        late_from_step: int | None = None,
        drop_fraction: float = 0.5,
        drop_fraction_final: float = 0.005,
        growth: Literal["random", "gradient"] = "random",
        regrowth: Literal["exclusive", "authors"] = "exclusive",
        seed: int = 0,
    ):
        if total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
        if update_every < 1 or (update_every_late is not None and update_every_late < 1):
            raise ConfigError(
                f"update_every and update_every_late must be >= 1, got {update_every}, {update_every_late}"
            )
        if not (0.0 < drop_fraction <= 1.0 and 0.0 <= drop_fraction_final <= 1.0):
            raise ConfigError(
                "drop_fraction must be in (0, 1] and drop_fraction_final in [0, 1], "
                f"got {drop_fraction}, {drop_fraction_final}"
            )
        if growth not in GROWTH_MODES:
            raise ConfigError(f"unknown growth {growth!r}; valid: {', '.join(GROWTH_MODES)}")
        if regrowth not in REGROWTH_RULES:
            raise ConfigError(f"unknown regrowth {regrowth!r}; valid: {', '.join(REGROWTH_RULES)}")
        super().__init__(model, optimizer, masks)
        self.total_steps = total_steps
        self.update_every = update_every
        self.update_every_late = update_every_late
        self.late_from_step = None
        if update_every_late is not None:
            self.late_from_step = total_steps // 2 if late_from_step is None else late_from_step
        self.initial_drop_fraction = drop_fraction
        self.final_drop_fraction = drop_fraction_final
        self.growth = growth
        self.regrowth = regrowth
        self.generator = torch.Generator().manual_seed(seed)  # CPU: same draws on every device and rank
        self.topology_updates = 0
        # one entry per update: step, drop_fraction, dropped, grown, changed (totals), changed_by_layer
        self.update_log: list[dict[str, Any]] = []
        self.last_update: dict[str, dict[str, int]] = {}  # per layer: {"dropped": {name: n}, "grown", "changed"}
        self.last_step = 0

    # -- schedule ----------------------------------------------------------------------------------
    def drop_fraction(self, step: int) -> float:
        """Cosine-decayed fraction r of each layer's active weights replaced at ``step``."""
        t = min(max(step, 0), self.total_steps)
        start, end = self.initial_drop_fraction, self.final_drop_fraction
        return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t / self.total_steps))

    def update_every_at(self, step: int) -> int:
        late = self.late_from_step is not None and step >= self.late_from_step  # set iff update_every_late is
        return self.update_every_late if late and self.update_every_late is not None else self.update_every

    def is_update_step(self, step: int) -> bool:
        return 0 < step < self.total_steps and step % self.update_every_at(step) == 0

    # -- hooks -------------------------------------------------------------------------------------
    def after_backward(self, step: int) -> None:
        self.last_step = step
        if self.is_update_step(step):
            self._update_topology(step)  # reads the dense grads, so before they are masked
        self.masks.mask_grads_()

    def _update_topology(self, step: int) -> None:
        """Overridden by AdaptiveDensity to add extra drop / growth."""
        self._drop_and_grow(step)

    @torch.no_grad()
    def _drop_and_grow(self, step: int, extra_drop_fraction: float = 0.0, extra_grow_fraction: float = 0.0) -> None:
        """One topology update. Per layer with ``nnz`` active weights, ``inactive`` inactive ones and
        drop fraction ``r``:

        - drop ``n_drop = ceil(r * nnz)`` plus ``ceil(extra_drop_fraction * r * nnz)`` that are not
          regrown (kept >= 1 weight alive). Under ``"exclusive"`` ``n_drop`` is capped at
          ``inactive`` so that as many can be grown among the positions inactive before the drop;
        - grow ``n_drop + ceil(extra_grow_fraction * n_drop)``, the extra capped so that the growth
          fits the candidates: ``inactive`` positions (``"exclusive"``) or every position inactive
          after the drop, ``inactive + dropped`` (``"authors"``).

        Positions whose mask flipped (dropped and not re-drawn, or newly grown) are set to 0 with
        their optimizer state zeroed; a re-drawn position (``"authors"`` only) keeps both.
        """
        r = self.drop_fraction(step)
        authors = self.regrowth == "authors"
        changed: dict[str, torch.Tensor] = {}
        dropped: dict[str, int] = {}
        grown: dict[str, int] = {}
        flipped: dict[str, int] = {}
        for name, mask in self.masks.items():
            weight = self.masks.params[name]
            active = mask.view(-1)  # (numel,) view: in-place edits below update the stored mask
            nnz = int(active.count_nonzero())  # host sync: update steps only
            inactive = active.numel() - nnz
            n_drop = _ceil(r * nnz) if authors else min(_ceil(r * nnz), inactive)
            n_drop_extra = max(0, min(_ceil(extra_drop_fraction * r * nnz), nnz - n_drop - 1))
            candidates = inactive + n_drop + n_drop_extra if authors else inactive
            n_grow = n_drop + min(_ceil(extra_grow_fraction * n_drop), candidates - n_drop)
            dropped[name], grown[name], flipped[name] = n_drop + n_drop_extra, n_grow, 0
            if n_drop + n_drop_extra == 0 and n_grow == 0:
                continue
            # (numel,) scores; positions that may not be chosen get +inf
            drop = select_k_mask(weight.abs().reshape(-1).masked_fill(~active, math.inf), n_drop + n_drop_extra,
                                 largest=False)
            # (numel,) bool, growth among the positions inactive after the drop ("authors") or before it
            grow = self._grow_positions(weight, active & ~drop if authors else active, n_grow)
            active.masked_fill_(drop, False).masked_fill_(grow, True)
            # the mask flipped here: dropped and not re-drawn, or grown and inactive before (under
            # "exclusive" drop and grow are disjoint, so this is every dropped and grown position)
            changed[name] = (drop ^ grow).view(mask.shape)
            flipped[name] = int(changed[name].count_nonzero())
            weight.masked_fill_(changed[name], 0.0)  # dropped weights vanish, grown ones start at 0
        self.masks.zero_optimizer_state_(self.optimizer, changed)  # no stale momentum / Adam moments
        self.topology_updates += 1
        self.last_update = {"dropped": dropped, "grown": grown, "changed": flipped}
        self.update_log.append(
            {"step": step, "drop_fraction": r, "dropped": sum(dropped.values()), "grown": sum(grown.values()),
             "changed": sum(flipped.values()), "changed_by_layer": dict(flipped)}
        )

    def _grow_positions(self, weight: torch.Tensor, active: torch.Tensor, n_grow: int) -> torch.Tensor:
        """(numel,) bool: ``n_grow`` positions among those False in ``active`` (numel,), the candidates."""
        if n_grow == 0:
            return torch.zeros_like(active)
        if self.growth == "random":  # SET: uniform over inactive positions
            candidates = (~active).nonzero().squeeze(1)  # (inactive,) flat indices
            pick = torch.randperm(candidates.numel(), generator=self.generator)[:n_grow]
            grow = torch.zeros_like(active)
            grow[candidates[pick.to(candidates.device)]] = True
            return grow
        # RigL: largest |dense gradient|; p.grad still holds this batch's unmasked gradient here
        grad = weight.grad
        magnitude = torch.zeros_like(weight).reshape(-1) if grad is None else grad.abs().reshape(-1)
        return select_k_mask((-magnitude).masked_fill(active, math.inf), n_grow, largest=False)

    # -- logging and checkpoints -------------------------------------------------------------------
    def epoch_log(self) -> dict[str, Any]:
        return {
            "density": self.masks.density(),
            "topology_updates": self.topology_updates,
            "drop_fraction": self.drop_fraction(self.last_step),
            "topology_changed_total": sum(entry["changed"] for entry in self.update_log),  # churn so far
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "topology_updates": self.topology_updates,
            "update_log": [dict(entry) for entry in self.update_log],
            "generator": self.generator.get_state(),
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.topology_updates = int(state["topology_updates"])
        self.update_log = [dict(entry) for entry in state["update_log"]]
        for entry in self.update_log:  # states saved before churn was logged: only "exclusive" existed then,
            entry.setdefault("changed", entry["dropped"] + entry["grown"])  # where drop and grow are disjoint
        self.generator.set_state(state["generator"])
        self.last_step = int(state["last_step"])


class AdaptiveDensity(DynamicSparse):
    """Flying Bird+ (Chen et al., ICLR 2022): Flying Bird whose density adapts to robust overfitting.

    ``end_epoch`` records, after every epoch (whatever ``eval.every`` is), the robust generalization
    gap proxy ``train_robust_acc - window_val_robust_acc`` and ``window_val_robust_loss``: the epoch's
    training robust accuracy and the evaluation attack's robust accuracy and loss on the same
    ``window_val_images`` validation images every epoch (the loop measures them: ``epoch_val_images``;
    None = every validation image of the stage). At each topology update from epoch
    ``adapt_from_epoch`` on (``epoch = step // steps_per_epoch``) with at least ``window`` recorded
    epochs, over the last ``window`` entries, i.e. the last ``window`` epochs (``window - 1``
    consecutive differences):

    - gap increased in >= ``threshold`` of the differences -> prune more: each layer drops an extra
      ``ceil(extra_prune_fraction * r * nnz)`` weights that are not regrown (density falls);
    - val robust loss did not decrease (equal counts as not decreased, as in the paper's code) in
      >= ``threshold`` of the differences -> grow more: regrow ``ceil(extra_grow_fraction * n_drop)``
      more than were dropped (density rises).

    Both may fire. Every evaluated rule is appended to ``decisions``. The other keyword arguments are
    DynamicSparse's (``total_steps``, ``update_every``, ...).
    """

    REQUIRED_METRICS = ("train_robust_acc", "window_val_robust_acc", "window_val_robust_loss")

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        masks: MaskSet,
        *,
        steps_per_epoch: int,
        adapt_from_epoch: int,
        window: int = 5,
        threshold: float = 0.5,
        extra_prune_fraction: float = 0.4,
        extra_grow_fraction: float = 0.05,
        window_val_images: int | None = None,
        **dynamic_sparse_args: Any,
    ):
        if steps_per_epoch < 1 or adapt_from_epoch < 0:
            raise ConfigError(
                f"steps_per_epoch must be >= 1 and adapt_from_epoch >= 0, got {steps_per_epoch}, {adapt_from_epoch}"
            )
        if window < 2:
            raise ConfigError(f"window must be >= 2 epochs (one difference), got {window}")
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
        if extra_prune_fraction < 0 or extra_grow_fraction < 0:
            raise ConfigError(f"extra fractions must be >= 0, got {extra_prune_fraction}, {extra_grow_fraction}")
        if window_val_images is not None and window_val_images < 1:
            raise ConfigError(f"window_val_images must be >= 1 (or None: all), got {window_val_images}")
        super().__init__(model, optimizer, masks, **dynamic_sparse_args)
        self.steps_per_epoch = steps_per_epoch
        self.adapt_from_epoch = adapt_from_epoch
        self.window = window
        self.threshold = threshold
        self.extra_prune_fraction = extra_prune_fraction
        self.extra_grow_fraction = extra_grow_fraction
        self.epoch_val_images = window_val_images  # the loop measures them after every epoch
        self.history: list[dict[str, float]] = []  # per epoch: epoch, robust_gap, val_robust_loss
        self.decisions: list[dict[str, Any]] = []  # one per topology update once the rule is active

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        missing = [key for key in self.REQUIRED_METRICS if metrics.get(key) is None]
        if missing:
            raise ConfigError(
                f"Flying Bird+ needs {', '.join(missing)} after every epoch (the loop measures the window's "
                "validation statistics for controllers with epoch_val_images != 0)"
            )
        self.history.append(
            {
                "epoch": epoch,
                "robust_gap": float(metrics["train_robust_acc"]) - float(metrics["window_val_robust_acc"]),
                "val_robust_loss": float(metrics["window_val_robust_loss"]),
            }
        )

    def decide(self, step: int) -> tuple[bool, bool] | None:
        """(prune_more, grow_more) at ``step``, or None while the rule is not active yet."""
        if step // self.steps_per_epoch < self.adapt_from_epoch or len(self.history) < self.window:
            return None
        recent = self.history[-self.window :]
        needed = self.threshold * (self.window - 1)
        gap_rises = sum(b["robust_gap"] > a["robust_gap"] for a, b in pairwise(recent))
        loss_stalls = sum(not b["val_robust_loss"] < a["val_robust_loss"] for a, b in pairwise(recent))
        return gap_rises >= needed, loss_stalls >= needed

    def _update_topology(self, step: int) -> None:
        decision = self.decide(step)
        if decision is None:
            return super()._update_topology(step)
        prune_more, grow_more = decision
        density_before = self.masks.density()
        self._drop_and_grow(
            step,
            extra_drop_fraction=self.extra_prune_fraction if prune_more else 0.0,
            extra_grow_fraction=self.extra_grow_fraction if grow_more else 0.0,
        )
        self.decisions.append(
            {
                "step": step,
                "epoch": step // self.steps_per_epoch,
                "prune_more": prune_more,
                "grow_more": grow_more,
                "density_before": density_before,
                "density_after": self.masks.density(),
            }
        )

    def epoch_log(self) -> dict[str, Any]:
        """Adds how often each rule fired in the epoch of the last step seen (``step // steps_per_epoch``,
        so it does not matter whether the loop calls this before or after ``end_epoch``) and in total
        (for runs that do not log every epoch)."""
        epoch = self.last_step // self.steps_per_epoch
        this_epoch = [d for d in self.decisions if d["epoch"] == epoch]
        return {
            **super().epoch_log(),
            "fbplus_prune_more": sum(d["prune_more"] for d in this_epoch),
            "fbplus_grow_more": sum(d["grow_more"] for d in this_epoch),
            "fbplus_prune_more_total": sum(d["prune_more"] for d in self.decisions),
            "fbplus_grow_more_total": sum(d["grow_more"] for d in self.decisions),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "history": [dict(h) for h in self.history],
            "decisions": [dict(d) for d in self.decisions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = [dict(h) for h in state["history"]]
        self.decisions = [dict(d) for d in state["decisions"]]
