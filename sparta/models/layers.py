"""Layers shared by every model: input normalisation inside the network.

Attacks work in pixel space (inputs in [0, 1], an eps-ball measured in pixels), so the per-channel
normalisation is the model's first layer rather than a data transform: the attack never needs to
know the dataset statistics.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``mean`` and ``std`` are buffers of shape (1, C, 1, 1).

    Buffers (not parameters): they move with ``.to(device)`` and are saved in the state dict, but
    are never trained nor pruned.
    """

    mean: Tensor  # the buffers, declared for the type checker (nn.Module.__getattr__ gives Tensor | Module)
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        if mean_t.shape != std_t.shape:
            raise ValueError(f"mean has {mean_t.numel()} values but std has {std_t.numel()}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be > 0, got {list(std)}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) pixels in [0, 1]
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Module):
    """``body(normalize(x))``. ``normalize`` is registered first, so it is the first submodule, and
    parameter names read ``body.layer1.0.conv1.weight``."""

    def __init__(self, normalize: Normalize, body: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.body = body

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) in [0, 1] -> logits (B, num_classes)
        return self.body(self.normalize(x))


def check_positive_int(name: str, value: object) -> int:
    """A model size argument (``base_width``, ``depth``...) must be an int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value
