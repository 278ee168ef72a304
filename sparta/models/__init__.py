"""Image classifiers. Every model is ``NormalizedModel(Normalize(mean, std), body)``: it takes
pixels in [0, 1] and normalises them itself, so attacks work in pixel space.

``create_model(name, num_classes=..., in_channels=..., image_size=..., mean=..., std=..., **kw)``
builds a registered model; the extra keyword arguments are the body's own (e.g. ``base_width``).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .layers import Normalize, NormalizedModel, check_positive_int
from .preact_resnet import PreActResNet18
from .resnet import ResNet18
from .small import SmallCNN
from .vgg import VGG, VGG16Hydra
from .wide_resnet import WideResNet

__all__ = ["MODELS", "create_model", "Normalize", "NormalizedModel", "model_kwargs"]

# Each entry builds the body: ``builder(num_classes, in_channels, **kwargs) -> nn.Module``.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
MODELS.register("preact_resnet18")(PreActResNet18)
MODELS.register("resnet18")(ResNet18)
MODELS.register("vgg16_bn")(VGG)
MODELS.register("vgg16_bn_hydra")(VGG16Hydra)
MODELS.register("wide_resnet")(WideResNet)
MODELS.register("small_cnn")(SmallCNN)

_COMMON = ("num_classes", "in_channels")


def model_kwargs(name: str) -> dict[str, Any]:
    """The model-specific keyword arguments of ``name`` and their defaults."""
    params = inspect.signature(MODELS.get(name)).parameters
    return {k: p.default for k, p in params.items() if k not in _COMMON}


def create_model(name: str, *, num_classes: int, in_channels: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], **kwargs: Any) -> nn.Module:
    """Build model ``name`` for ``in_channels`` x ``image_size`` x ``image_size`` pixels in [0, 1].

    Weights are drawn from the global torch RNG (seed it first for reproducible models). Raises
    ``ConfigError`` for an unknown name, an unknown keyword argument, or bad sizes/statistics.
    """
    builder = MODELS.get(name)
    valid = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(
            f"model {name!r} got unknown argument(s) {', '.join(unknown)}; valid: {', '.join(valid) or '(none)'}"
        )
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)
    check_positive_int("image_size", image_size)
    mean, std = list(mean), list(std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(
            f"mean and std need one value per input channel ({in_channels}), got {len(mean)} and {len(std)}"
        )
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ConfigError(f"mean must be finite numbers and std finite numbers > 0, got mean={mean} std={std}")
    body = builder(num_classes, in_channels, **kwargs)
    return NormalizedModel(Normalize(mean, std), body)
