"""Ticket drawing and rewinding: one-shot / iterative magnitude pruning, rewinding, random reinit.

Pure functions on ``{parameter name: tensor}`` mappings (names of the unwrapped model, as in
``select.prunable_parameters``) plus two helpers that act on a whole model. They run once per
ticket, so they favour exactness over speed:

- every criterion keeps EXACTLY ``round(density * total)`` weights, with one global threshold and
  ties broken by the lowest global flat index (parameters concatenated in the mapping's order, each
  flattened row-major);
- ``layer_top_k_masks`` keeps a given number of the largest scores in each layer (``layer_counts``:
  the counts of a layer-density distribution), the one-shot layer-wise magnitude pruning of
  ``method.name: magnitude`` and HYDRA's top-k of the learned scores;
- ``global_magnitude_masks`` is Robust Bird's unstructured ticket (Chen et al. 2022, "Sparsity
  Winning Twice": prune globally over conv + linear weights), ``layer_normalized_masks`` the
  boosting-ticket criterion (Li et al. 2020, "Towards practical lottery ticket hypothesis for
  adversarial training").
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .distributions import exact_counts, layer_densities
from .select import strip_wrapper_prefixes, unwrap


def _check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
        raise ConfigError(f"density must be a number in [0, 1], got {density!r}")
    return float(density)


def select_k_mask(scores: Tensor, k: int, *, largest: bool) -> Tensor:
    """(N,) bool marking exactly ``k`` entries of the 1-D ``scores``: the largest (``largest=True``) or
    the smallest. Entries tied with the k-th value are taken lowest index first, so the choice is
    deterministic on every device.

    The one top-k selection of sparta: tickets, channel masks, early-bird masks and Flying Bird's
    drop / RigL growth all call it. ``kthvalue`` is a linear-time selection (no full sort), and
    nothing here waits for the device (no host sync), so the caller checks ``0 <= k <= N``; scores
    of +inf / -inf are fine (Flying Bird marks positions that may not be chosen with them).
    """
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(scores.numel() - k + 1 if largest else k).values  # () the k-th largest / smallest
    inside = scores > kth if largest else scores < kth  # strictly among the k
    tied = scores == kth
    return inside | (tied & (tied.cumsum(0) <= k - inside.sum()))


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """(N,) bool: the ``k`` largest of the 1-D ``scores``, ties broken by the lowest index
    (``select_k_mask`` after checking ``k`` and that no score is NaN)."""
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} entries")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN (did training diverge?)")
    return select_k_mask(scores, k, largest=True)


def _global_top(scores: Mapping[str, Tensor], density: float, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Keep ``round(density * total)`` of the concatenated ``scores``; split back per parameter."""
    density = _check_density(density)
    if not scores:
        return {}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])  # (total,) float32, mapping order
    keep = top_k_mask(flat, round(density * flat.numel()))
    masks, start = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        masks[name] = keep[start:start + size].view(shape)
        start += size
    return masks


@torch.no_grad()
def global_magnitude_masks(params: Mapping[str, Tensor], density: float) -> dict[str, Tensor]:
    """``{name: bool keep-mask}``: the ``round(density * total)`` largest |w| over ALL given tensors.

    One global threshold (Robust Bird prunes "globally over conv + linear weights"): per-layer
    densities are whatever that threshold gives, so a layer may keep nothing at all when all its
    weights are below the threshold — that is the global rule, not an error. Ties at the threshold
    go to the lowest global flat index. Masks live on each parameter's device.
    """
    device = next(iter(params.values())).device if params else None  # score on one device
    scores = {name: p.detach().abs().float().to(device) for name, p in params.items()}
    masks = _global_top(scores, density, {name: p.shape for name, p in params.items()})
    return {name: m.to(params[name].device) for name, m in masks.items()}


@torch.no_grad()
def layer_normalized_masks(params: Mapping[str, Tensor], density: float) -> dict[str, Tensor]:
    """Boosting tickets (Li et al. 2020): score = |w| / mean(|w|) of its own layer, then one global
    threshold keeping exactly ``round(density * total)`` weights (ties: lowest global flat index).

    Dividing by the layer mean puts layers of very different scales (a 3x3 stem vs. the classifier)
    on one footing. A layer whose weights are all zero scores 0 everywhere.
    """
    device = next(iter(params.values())).device if params else None
    scores = {}
    for name, p in params.items():
        magnitude = p.detach().abs().float().to(device)
        mean = magnitude.mean()
        scores[name] = magnitude / mean if float(mean) > 0 else torch.zeros_like(magnitude)
    masks = _global_top(scores, density, {name: p.shape for name, p in params.items()})
    return {name: m.to(params[name].device) for name, m in masks.items()}


def layer_counts(shapes: Mapping[str, torch.Size], density: float, distribution: str) -> dict[str, int]:
    """Weights kept per layer: ``distribution``'s layer densities (``sparse.distributions``) as exact
    integer counts summing to ``round(density * total)`` (uniform: each layer ``round(density * numel)``,
    up to one weight moved to meet the total exactly)."""
    return exact_counts(shapes, layer_densities(distribution, shapes, density), density)


@torch.no_grad()
def layer_top_k_masks(scores: Mapping[str, Tensor], counts: Mapping[str, int]) -> dict[str, Tensor]:
    """``{name: bool keep-mask}``: the ``counts[name]`` largest entries of each ``scores[name]`` (ties:
    lowest flat row-major index), on the score's device. Layer-wise magnitude pruning passes |w|."""
    return {name: top_k_mask(s.detach().float().reshape(-1), counts[name]).view(s.shape) for name, s in scores.items()}


def iterative_densities(density: float, rounds: int) -> list[float]:
    """Densities after each of ``rounds`` iterative pruning rounds: d_k = density ** (k / rounds),
    k = 1..rounds, so each round keeps the same fraction of the survivors; the last is ``density``."""
    density = _check_density(density)
    if density == 0.0:
        raise ConfigError("density must be > 0 for iterative pruning")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")
    return [density ** (k / rounds) for k in range(1, rounds)] + [density]


@torch.no_grad()
def zero_pruned_(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """In place: ``params[name] = +0.0`` where ``masks[name]`` (bool, parameter-shaped, any device)
    is False; kept positions and parameters without a mask are not touched.

    The mask application of ``rewind_``, ``rewind_model_`` and ``reinit_``. ``MaskSet.apply_`` (the
    training hot path) multiplies instead; its docstring says why the two stay apart.
    """
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"masks name parameters the model does not have: {unknown[:5]}")
    for name, mask in masks.items():
        params[name].masked_fill_(~mask.to(params[name].device, torch.bool), 0.0)


@torch.no_grad()
def rewind_(params: Mapping[str, Tensor], initial: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """In place: ``params[name] = initial[name]`` where ``masks[name]`` keeps, exactly 0 elsewhere.

    Surviving positions get the saved values bit for bit (a copy, no arithmetic); parameters
    without a mask are restored entirely. ``initial`` may live on another device (e.g. a CPU copy).
    """
    unknown = sorted(set(masks) - set(params))
    missing = sorted(set(params) - set(initial))
    if unknown or missing:
        raise ValueError(f"masks name unknown parameters {unknown}; no initial values for {missing}")
    for name, p in params.items():
        saved = initial[name].to(device=p.device, dtype=p.dtype)
        if saved.shape != p.shape:
            raise ValueError(f"{name}: initial shape {tuple(saved.shape)} != parameter {tuple(p.shape)}")
        p.copy_(saved)
    zero_pruned_(params, masks)


def rewind_model_(model: nn.Module, initial_state_dict: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Restore ALL parameters and buffers (BN running statistics too) from ``initial_state_dict``,
    in place (parameter objects are kept, so optimizers and MaskSets still point at them), then
    zero the pruned positions of ``masks`` (``{unwrapped parameter name: bool mask}`` or a MaskSet).

    Keys with DDP / torch.compile prefixes are accepted; the load is strict.
    """
    bare = unwrap(model)
    state = {strip_wrapper_prefixes(k): v for k, v in initial_state_dict.items()}
    bare.load_state_dict(state, strict=True)
    zero_pruned_(dict(bare.named_parameters()), dict(masks.items()))


def reinit_(model: nn.Module, masks: Mapping[str, Tensor], seed: int) -> None:
    """Lottery-ticket control "random reinit" (Frankle & Carbin 2019): same mask, fresh weights.

    Every module's own ``reset_parameters()`` runs again (BatchNorm also resets its running
    statistics) under ``torch.random.fork_rng()`` seeded with ``seed``, so the result depends only on
    ``seed`` and the global RNG stream of the caller is untouched; then the masks are applied.
    Note: this gives PyTorch's default initialisation of each layer; a model that applies its own
    scheme in ``__init__`` (WideResNet's He-normal convs) is not re-drawn with that scheme.
    """
    bare = unwrap(model)
    devices = sorted({p.device.index or 0 for p in bare.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for module in bare.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    zero_pruned_(dict(bare.named_parameters()), dict(masks.items()))
