"""Channel tickets made physically smaller: Robust Bird's channel variant (Chen et al. 2022,
"Sparsity Winning Twice"), after network slimming's |BN gamma| channel scores (Liu et al. 2017) as
used by early-bird tickets (You et al. 2020).

- ``bn_channel_masks(model, keep_fraction)``: a keep-mask per BatchNorm, one global threshold on
  |gamma|.
- ``slim(model, channel_masks, example_input)``: a deep copy of ``model`` with the masked-out
  channels removed for real, through torch-pruning's dependency graph, so every conv, BN, shortcut
  and the classifier input stay consistent; returns ``(small_model, plan)``.
- ``apply_plan(full_model, plan, example_input)``: the same removal replayed on a freshly built full
  network, so a checkpoint of a channel ticket stores ``model_spec + plan`` and loads its
  parameters with ``load_state_dict``.

Coupling rule for residual networks. Channels tied together by a residual sum form one torch-pruning
group (e.g. in PreActResNet-18: the stem conv's outputs, every stage-1 ``conv2`` output, the ``bn1``
of each block reading the stream, the next stage's ``conv1``/shortcut inputs). A channel of a group
is removed only if EVERY BatchNorm of the group masks it out — equivalently, the group's score for a
channel is the largest |gamma| over its BNs, compared with the same global threshold. Why: a
residual-stream channel is read only through these BNs, so when all of them output zero for it
(gamma = beta = 0) the channel is dead and removing it everywhere changes nothing; if any BN still
uses it, removing it would change that block. A BN absent from ``channel_masks`` keeps all its
channels (it vetoes removal in its group). Channels of the network input (the ``Normalize`` layer /
the stem conv's inputs) and the classifier's outputs are never in a BN-rooted group, and ``slim``
checks that.

A plan is plain data: ``{root BatchNorm name: removed channel indices}``, the root being the first
BN (in ``named_modules`` order) of its group, indices in the ORIGINAL numbering. Groups are disjoint
channel sets, so removing one group never renumbers another; groups are applied in
``named_modules`` order, whatever the dict order.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import CheckpointError, ConfigError
from .select import unwrap
from .tickets import top_k_mask


def batchnorm_modules(model: nn.Module) -> dict[str, _BatchNorm]:
    """``{name: BatchNorm}`` for every affine BatchNorm of the unwrapped model, in module order
    (BNs without a learnable gamma have no channel score and are left alone)."""
    return {name: m for name, m in unwrap(model).named_modules() if isinstance(m, _BatchNorm) and m.affine}


@torch.no_grad()
def bn_channel_masks(model: nn.Module, keep_fraction: float) -> dict[str, Tensor]:
    """``{BN module name: (C,) bool keep-mask}``: the ``round(keep_fraction * total)`` channels with
    the largest |gamma| over ALL BatchNorms (one global threshold, ties to the lowest index in module
    order), plus, for a BN that would lose every channel, its largest-|gamma| channel (at least one
    channel kept per BN, so no layer vanishes). Masks live on each BN's device.
    """
    if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, (int, float)) or not 0.0 < keep_fraction <= 1.0:
        raise ConfigError(f"keep_fraction must be a number in (0, 1], got {keep_fraction!r}")
    bns = batchnorm_modules(model)
    if not bns:
        raise ConfigError("the model has no affine BatchNorm layer to score channels with")
    device = next(iter(bns.values())).weight.device
    scores = [bn.weight.detach().abs().float().to(device) for bn in bns.values()]
    flat = torch.cat(scores)  # (total channels,)
    keep = top_k_mask(flat, round(keep_fraction * flat.numel()))
    masks, start = {}, 0
    for (name, bn), score in zip(bns.items(), scores):
        mask = keep[start:start + score.numel()].clone()
        start += score.numel()
        if not bool(mask.any()):
            mask[int(torch.argmax(score))] = True  # argmax: first maximal index
        masks[name] = mask.to(bn.weight.device)
    return masks


# -- torch-pruning plumbing --------------------------------------------------------------------------

def _tp():
    try:
        import torch_pruning as tp  # noqa: PLC0415 (optional dependency: torch-pruning)
    except ImportError as err:  # an optional extra: pip install "sparta[pruning]"
        raise ConfigError("channel tickets need torch-pruning: pip install torch-pruning==1.6.1") from err
    return tp


def _dependency_graph(model: nn.Module, example_input: Tensor):
    """torch-pruning's DependencyGraph of ``model``, traced with one forward in eval mode.

    Tracing needs autograd and switches the model to eval mode (so BN running statistics are not
    touched); each module's train/eval flag is restored afterwards.
    """
    tp = _tp()
    first = next(model.parameters())
    x = example_input.to(device=first.device, dtype=first.dtype)
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad():
            # a list, so torch-pruning calls model(x) rather than unpacking x along the batch dim
            return tp.DependencyGraph().build_dependency(model, example_inputs=[x], verbose=False)
    finally:
        for m, training in modes.items():
            m.training = training


def _classifier(model: nn.Module) -> nn.Linear | None:
    """The last Linear in module order: its outputs are the logits and are never pruned."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _group(dg, model: nn.Module, bn: _BatchNorm, idxs: list[int]):
    tp = _tp()
    group = dg.get_pruning_group(bn, tp.prune_batchnorm_out_channels, idxs=idxs)
    classifier = _classifier(model)
    for item in group:
        if item.dep.target.module is classifier and dg.is_out_channel_pruning_fn(item.dep.handler):
            raise ValueError("a BatchNorm's channel group reaches the classifier's outputs; refusing to prune it")
    return group


def _groups(dg, model: nn.Module) -> list[tuple[str, list[tuple[str, Tensor, Tensor]]]]:
    """Coupled BN groups: ``[(root BN name, [(BN name, own indices, root indices), ...]), ...]``.

    Built on full index sets, so for each member ``own[j]`` is the member's channel that moves with
    the root's channel ``root[j]`` (the identity here: these models have no concat / split).
    """
    names = {m: name for name, m in model.named_modules()}
    assigned: set[nn.Module] = set()
    groups = []
    for name, bn in batchnorm_modules(model).items():
        if bn in assigned or bn not in dg.module2node:
            continue
        group = _group(dg, model, bn, list(range(bn.num_features)))
        members = []
        for item in group:
            module = item.dep.target.module
            if isinstance(module, _BatchNorm) and module.affine and module not in assigned:
                assigned.add(module)
                members.append((names[module], torch.as_tensor(item.idxs), torch.as_tensor(item.root_idxs)))
        groups.append((name, members))
    return groups


def coupled_bn_groups(model: nn.Module, example_input: Tensor) -> list[list[str]]:
    """Names of the BatchNorms whose channels are coupled (one list per group, root first)."""
    probe = copy.deepcopy(unwrap(model))
    groups = _groups(_dependency_graph(probe, example_input), probe)
    return [[member for member, _, _ in members] for _, members in groups]


def _check_plan(model: nn.Module, plan: Mapping[str, Any], error: type[Exception]) -> None:
    """Names are BatchNorms of ``model``; each entry lists distinct channel indices and keeps one."""
    bns = batchnorm_modules(model)
    unknown = sorted(set(plan) - set(bns))
    if unknown:
        raise error(f"channel plan names modules that are not BatchNorms of this model: {unknown[:5]}")
    for name, idxs in plan.items():
        size = bns[name].num_features
        if not isinstance(idxs, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idxs):
            raise error(f"channel plan entry {name!r} must be a list of ints, got {idxs!r}")
        if len(set(idxs)) != len(idxs) or not all(0 <= i < size for i in idxs) or len(idxs) >= size:
            raise error(
                f"channel plan entry {name!r} must hold distinct indices in [0, {size}) and keep at least "
                f"one channel, got {len(idxs)} indices"
            )


def _prune_by_plan(model: nn.Module, dg, plan: Mapping[str, list[int]], error: type[Exception]) -> None:
    """Remove the planned channels of each group, in ``named_modules`` order, in place."""
    _check_plan(model, plan, error)
    done: set[nn.Module] = set()  # BNs already pruned as members of an earlier group
    for name, bn in batchnorm_modules(model).items():
        if name not in plan or not plan[name]:
            continue
        if bn in done:
            raise error(f"channel plan prunes the group of {name!r} twice (two entries for one coupled group)")
        group = _group(dg, model, bn, sorted(plan[name]))
        if not dg.check_pruning_group(group):
            raise error(f"pruning {len(plan[name])} channels of {name!r}'s group would leave a layer without channels")
        done.update(item.dep.target.module for item in group if isinstance(item.dep.target.module, _BatchNorm))
        group.prune(record_history=False)


def _fresh_copy(model: nn.Module) -> nn.Module:
    small = copy.deepcopy(unwrap(model))
    for p in small.parameters():
        p.grad = None
    return small


def _check_ends_untouched(full: nn.Module, small: nn.Module) -> None:
    """The network's input channels (first conv) and logits (classifier outputs) keep their sizes."""
    def ends(model: nn.Module) -> tuple[int | None, int | None]:
        convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        classifier = _classifier(model)
        return (convs[0].in_channels if convs else None, classifier.out_features if classifier else None)
    if ends(full) != ends(small):
        raise ValueError(f"slimming changed the network's input channels or outputs: {ends(full)} -> {ends(small)}")


def slim(
    model: nn.Module, channel_masks: Mapping[str, Tensor], example_input: Tensor
) -> tuple[nn.Module, dict[str, list[int]]]:
    """A physically smaller copy of ``model`` without the channels ``channel_masks`` removes.

    ``channel_masks``: ``{BN module name (unwrapped): (C,) bool keep-mask}`` (e.g. from
    ``bn_channel_masks``). Channels coupled through residual sums are removed only when every BN of
    their group masks them out (see the module docstring). ``example_input``: one input batch, e.g.
    ``(1, C, H, W)`` zeros, used to trace the network (eval mode; BN statistics untouched).

    Returns ``(small, plan)``: ``small`` is a deep copy (``model`` is not modified) whose kept
    parameters and buffers are the original values; ``plan`` is ``{root BN name: removed indices}``,
    plain data for ``apply_plan`` and checkpoints.
    """
    small = _fresh_copy(model)
    bns = batchnorm_modules(small)
    for name, mask in channel_masks.items():
        if name not in bns:
            raise ValueError(f"channel mask {name!r} is not an affine BatchNorm of the model")
        if tuple(mask.shape) != (bns[name].num_features,):
            raise ValueError(f"channel mask {name!r}: shape {tuple(mask.shape)} != ({bns[name].num_features},)")
    dg = _dependency_graph(small, example_input)
    plan: dict[str, list[int]] = {}
    for root, members in _groups(dg, small):
        size = bns[root].num_features
        kept = torch.zeros(size, dtype=torch.bool)  # root numbering: kept by at least one BN of the group
        for member, own, root_idxs in members:
            member_mask = channel_masks.get(member)
            if member_mask is None:  # a BN without a mask keeps everything, so it vetoes removal in its group
                member_keeps = torch.ones(own.numel(), dtype=torch.bool)
            else:
                member_keeps = member_mask.detach().cpu().bool()[own]
            kept[root_idxs] |= member_keeps
        removed = (~kept).nonzero().squeeze(1).tolist()
        if removed:
            plan[root] = [int(i) for i in removed]
    _prune_by_plan(small, dg, plan, ValueError)
    _check_ends_untouched(unwrap(model), small)
    return small, plan


def apply_plan(full_model: nn.Module, plan: Mapping[str, Any], example_input: Tensor) -> nn.Module:
    """Replay ``plan`` (from ``slim``) on a full-size network: returns a smaller deep copy with the
    same architecture (state_dict keys and shapes) as the ``slim`` result it came from, holding
    ``full_model``'s values at the kept channels. Raises ``CheckpointError`` when the plan does not
    fit the network."""
    if not isinstance(plan, Mapping) or not all(isinstance(k, str) for k in plan):
        raise CheckpointError(f"a channel plan must map BatchNorm names to index lists, got {type(plan).__name__}")
    plan = dict(plan)
    _check_plan(full_model, plan, CheckpointError)  # before the (slower) tracing
    small = _fresh_copy(full_model)
    _prune_by_plan(small, _dependency_graph(small, example_input), plan, CheckpointError)
    return small
