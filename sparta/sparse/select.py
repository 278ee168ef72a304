"""Which parameters are prunable, under the names of the unwrapped model.

Every weight with ``p.dim() >= 2`` (conv ``(out, in, kh, kw)`` and linear ``(out, in)``) is prunable;
biases and BatchNorm affine parameters (1-D) stay dense, and so does anything kept as a buffer (BN
running statistics, the ``Normalize`` mean/std), because buffers are not parameters.
"""
from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

# Prefixes added by wrappers: DistributedDataParallel / DataParallel (``module.``) and
# torch.compile (``_orig_mod.``). Masks are keyed by the names of the bare model.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside any nesting of DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = inner
        else:
            return model


def strip_wrapper_prefixes(name: str) -> str:
    """``"module._orig_mod.conv1.weight"`` -> ``"conv1.weight"``."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def prunable_parameters(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` for every parameter with ``dim() >= 2``, in ``named_parameters`` order.

    ``exclude`` holds fnmatch patterns matched against the unwrapped names (e.g. ``"conv1.*"`` keeps
    the stem dense, ``"*linear*"`` the classifier).
    """
    if isinstance(exclude, str):  # a lone pattern would otherwise be iterated character by character
        exclude = (exclude,)
    return {
        strip_wrapper_prefixes(name): p
        for name, p in unwrap(model).named_parameters()
        if p.dim() >= 2 and not any(fnmatchcase(strip_wrapper_prefixes(name), pat) for pat in exclude)
    }
