"""Dense weights from another run's checkpoint (``method.pretrained`` of the after-training methods).

The checkpoint must be a sparta checkpoint of a dense run of the same network (architecture, width,
classes, input shape); its normalisation constants (the model's mean/std buffers) come with its
weights. Anything else is refused in one ``ConfigError`` line, before the run directory is written.
Its training cost is recorded, not added: ``run.info["pretrained"]`` holds the path, the epochs and
steps it had trained, its own ``train_flops`` and stage costs (null when the checkpoint predates
them) and ``cost_included: false``; the run's ``train_flops`` counts the stages it trains itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import checkpoint
from .errors import CheckpointError, ConfigError
from .stages import RunContext

# spec keys that fix the network's shape; mean/std are buffers that load with the weights
_SHAPE_KEYS = ("name", "kwargs", "num_classes", "in_channels", "image_size")


def load_pretrained(run: RunContext, path: str) -> None:
    """Replace ``run.model``'s parameters and buffers with those of the dense checkpoint ``path``."""
    where = f"method.pretrained={path}"
    if not Path(path).is_file():
        raise ConfigError(f"{where} does not exist; give a checkpoint .pt of a dense sparta run "
                          "(e.g. runs/NAME/checkpoints/last.pt)")
    try:
        state = checkpoint.load(path, map_location="cpu")
    except CheckpointError as e:
        raise ConfigError(f"{where}: {e}") from None
    spec = state.model_spec
    if spec.get("channel_plan") or state.masks:
        raise ConfigError(f"{where} holds a sparse network "
                          f"({'slimmed channels' if spec.get('channel_plan') else 'masks'}); "
                          "give a checkpoint of a dense run (method.name=dense)")
    differ = [k for k in _SHAPE_KEYS if spec.get(k) != run.spec.get(k)]
    if differ:
        got = ", ".join(f"{k} {spec.get(k)!r} (this run: {run.spec.get(k)!r})" for k in differ)
        raise ConfigError(f"{where} is another network: {got}; give a checkpoint of the same model and dataset")
    try:
        run.model.load_state_dict(state.model)
    except RuntimeError as e:
        raise ConfigError(f"{where} does not fit this model: {str(e).splitlines()[0]}") from None
    cost: dict[str, Any] = state.run.get("cost") or {}
    run.info["pretrained"] = {"path": str(path), "epochs": state.epoch, "steps": state.step,
                              "train_flops": cost.get("total"), "stages": state.run.get("stages"),
                              "cost_included": False}
