"""A network's spec: the plain data that rebuilds it (stored in every checkpoint as ``model_spec``).

``{"name", "kwargs", "num_classes", "in_channels", "image_size", "mean", "std"}`` plus, for a
channel ticket, ``"channel_plan"``: the channels removed from the full network, so that
``build_model`` returns the physically smaller network whose state_dict the checkpoint holds.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import Config
from .data.base import DatasetSplits
from .models import create_model
from .sparse.channels import apply_plan


def model_spec(cfg: Config, data: DatasetSplits) -> dict[str, Any]:
    """Everything ``create_model`` needs to rebuild this network from a checkpoint alone."""
    return {"name": cfg.model.name, "kwargs": cfg.model.kwargs(), "num_classes": data.num_classes,
            "in_channels": data.in_channels, "image_size": data.image_size,
            "mean": list(data.mean), "std": list(data.std)}


def build_model(spec: dict[str, Any]) -> nn.Module:
    model = create_model(spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                         image_size=spec["image_size"], mean=spec["mean"], std=spec["std"], **spec["kwargs"])
    if spec.get("channel_plan"):
        model = apply_plan(model, spec["channel_plan"], example_input(spec))
    return model


def input_shape(spec: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of one input image."""
    return spec["in_channels"], spec["image_size"], spec["image_size"]


def example_input(spec: dict[str, Any]):
    """One zero image shaped like the network's input, (1, C, H, W), for tracing the network."""
    return torch.zeros(1, *input_shape(spec))
