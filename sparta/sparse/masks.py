"""``MaskSet``: the one source of truth for which weights exist.

A MaskSet holds a bool keep-mask per prunable parameter, keyed by the names of the unwrapped model
(see ``select.py``). The model itself stays a plain ``nn.Module`` whose pruned weights are exactly zero,
so every checkpoint loads into any evaluator without sparta.

Masks are mutated in place and never rebound: other code (controllers, DDP broadcast, loggers) holds
references to them. Build the MaskSet after the model has been moved to its device and dtype.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .distributions import exact_counts, layer_densities, random_masks
from .select import prunable_parameters

# Optimizer state tensors shaped like their parameter (SGD ``momentum_buffer``, Adam/AdamW ``exp_avg``,
# ``exp_avg_sq``, ``max_exp_avg_sq``; also RMSprop/Adagrad accumulators) are zeroed where a weight is
# pruned, so a pruned weight with zero gradient gets a zero update. Scalars such as ``step`` are left.


def hamming_distance(a: Tensor | Mapping[str, Tensor], b: Tensor | Mapping[str, Tensor]) -> float:
    """Normalised Hamming distance: the fraction of positions where two bool masks differ.

    ``a`` and ``b`` are two tensors with the same number of elements (compared flat), or two
    ``{name: tensor}`` mappings with the same names and shapes (compared name by name, each on the
    device of ``a``'s tensor, and pooled over all positions). 0.0 when there are no positions.
    Early-bird detection and ``MaskSet.distance`` both use it.
    """
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping), "a mapping of masks compares with a mapping"
        if set(a) != set(b):
            raise ValueError(f"masks name different tensors: {sorted(set(a) ^ set(b))}")
        pairs = [(a[name], b[name]) for name in a]
        for name, (x, y) in zip(a, pairs):
            if tuple(x.shape) != tuple(y.shape):
                raise ValueError(f"mask {name}: shape {tuple(y.shape)} != {tuple(x.shape)}")
    else:
        assert isinstance(b, Tensor), "a mask tensor compares with a tensor"
        if a.numel() != b.numel():
            raise ValueError(f"masks of different sizes: {a.numel()} vs {b.numel()}")
        pairs = [(a.reshape(-1), b.reshape(-1))]
    total = sum(x.numel() for x, _ in pairs)
    differ = sum(int((x != y.to(x.device)).count_nonzero()) for x, y in pairs)  # one host sync per tensor
    return differ / total if total else 0.0


class MaskSet:
    """Bool keep-masks ``{name: BoolTensor shaped like the parameter}`` over a model's prunable weights.

    The hot path (``mask_grads_``, ``apply_``) is one ``torch._foreach_mul_`` over the parameters (or
    their grads) and float copies of the masks. The float copies have the parameter's dtype and
    device; each one is refreshed, in place, only when its bool mask's autograd version counter shows
    it was modified in place (by this class or by anyone else), so steady-state steps allocate nothing.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]):
        if set(params) != set(masks):
            raise ValueError(f"masks and parameters name different tensors: {sorted(set(params) ^ set(masks))}")
        self.params: dict[str, nn.Parameter] = dict(params)
        self.masks: dict[str, torch.Tensor] = {}
        for name, p in self.params.items():
            if masks[name].shape != p.shape:
                raise ValueError(f"mask {name}: shape {tuple(masks[name].shape)} != parameter {tuple(p.shape)}")
            # contiguous whatever the weight's layout (channels_last): controllers edit masks through view(-1)
            self.masks[name] = masks[name].to(device=p.device, dtype=torch.bool).clone(
                memory_format=torch.contiguous_format)
        self._param_list: list[Tensor] = list(self.params.values())  # as torch._foreach_* take them
        self._mask_list = list(self.masks.values())
        self._float_list = [m.to(p.dtype) for m, p in zip(self._mask_list, self._param_list)]
        self._synced_versions = [m._version for m in self._mask_list]

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, exclude: Sequence[str] = ()) -> MaskSet:
        """All-ones masks over ``prunable_parameters(model, exclude)``."""
        params = prunable_parameters(model, exclude)
        return cls(params, {name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()})

    @classmethod
    def random(
        cls,
        model: nn.Module,
        density: float,
        distribution: str = "igq",
        *,
        seed: int = 0,
        exclude: Sequence[str] = (),
    ) -> MaskSet:
        """Random masks with exact per-layer counts from ``distributions.layer_densities(distribution)``.

        The total kept is exactly ``round(density * total)``; positions come from a CPU generator seeded
        with ``seed``, so every DDP rank draws the same masks.
        """
        params = prunable_parameters(model, exclude)
        shapes = {name: p.shape for name, p in params.items()}
        counts = exact_counts(shapes, layer_densities(distribution, shapes, density), density)
        return cls(params, random_masks(shapes, counts, torch.Generator().manual_seed(seed)))

    # -- mapping access ----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def items(self):
        return self.masks.items()

    # -- hot path ----------------------------------------------------------------------------------
    def _float_masks(self) -> list[torch.Tensor]:
        """Float masks, refreshed in place where a bool mask changed since the last call."""
        for i, mask in enumerate(self._mask_list):
            if mask._version != self._synced_versions[i]:
                self._float_list[i].copy_(mask)
                self._synced_versions[i] = mask._version
        return self._float_list

    @torch.no_grad()
    def apply_(self) -> None:
        """weights *= masks, in place (one fused multiply).

        Not ``tickets.zero_pruned_`` (``masked_fill``), on purpose: a multiply leaves -0.0 where a
        negative weight is pruned (and NaN where an inf / NaN one is), ``masked_fill`` +0.0. Both
        are zero to every comparison, but every sparse checkpoint saved so far holds this
        multiply's bits, and the hot path needs one fused kernel with cached masks.
        """
        torch._foreach_mul_(self._param_list, self._float_masks())

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """grads *= masks, in place (one fused multiply); parameters without a grad are skipped."""
        floats = self._float_masks()
        grads, grad_masks = [], []
        for p, m in zip(self._param_list, floats):
            if p.grad is not None:
                grads.append(p.grad)
                grad_masks.append(m)
        if grads:
            torch._foreach_mul_(grads, grad_masks)

    # -- optimizer state ---------------------------------------------------------------------------
    @torch.no_grad()
    def zero_optimizer_state_(
        self, optimizer: torch.optim.Optimizer, positions: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Zero the per-weight optimizer state at ``positions[name]`` (bool, parameter-shaped), or at
        every masked-out position when ``positions`` is None.

        Covers SGD ``momentum_buffer`` and Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` —
        in general every state tensor shaped like its parameter. Parameters without state are skipped.
        """
        names = self.masks if positions is None else positions
        for name in names:
            p = self.params[name]
            where = ~self.masks[name] if positions is None else positions[name].to(p.device, torch.bool)
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.masked_fill_(where, 0)

    # -- statistics (each one host sync: for logging and topology updates, not every step) ---------
    def counts(self) -> dict[str, int]:
        """Kept weights per layer."""
        return {name: int(m.count_nonzero()) for name, m in self.masks.items()}

    def numels(self) -> dict[str, int]:
        return {name: m.numel() for name, m in self.masks.items()}

    def layer_densities(self) -> dict[str, float]:
        return {name: kept / self.masks[name].numel() for name, kept in self.counts().items()}

    def density(self) -> float:
        """Kept / total over all masked parameters (1.0 for an empty MaskSet)."""
        total = sum(self.numels().values())
        return sum(self.counts().values()) / total if total else 1.0

    def distance(self, other: MaskSet | Mapping[str, torch.Tensor]) -> float:
        """Normalised Hamming distance: fraction of positions (over all masked parameters) that differ."""
        other_masks = other.masks if isinstance(other, MaskSet) else other
        self._check_same_layout(other_masks, ValueError)
        return hamming_distance(self.masks, other_masks)

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: bool mask}``: CPU clones, safe to keep while training continues."""
        return {name: m.detach().to("cpu", copy=True) for name, m in self.masks.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy saved masks into the existing mask tensors (never rebinds them)."""
        self._check_same_layout(state, CheckpointError)
        for name, m in self.masks.items():
            m.copy_(state[name].to(m.device, torch.bool))

    def _check_same_layout(self, other: Mapping[str, torch.Tensor], error: type[Exception]) -> None:
        if set(other) != set(self.masks):
            missing, unexpected = sorted(set(self.masks) - set(other)), sorted(set(other) - set(self.masks))
            raise error(f"mask names differ: missing {missing}, unexpected {unexpected}")
        for name, m in self.masks.items():
            if tuple(other[name].shape) != tuple(m.shape):
                raise error(f"mask {name}: shape {tuple(other[name].shape)} != expected {tuple(m.shape)}")
