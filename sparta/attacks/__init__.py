"""Adversarial attacks in pixel space (inputs in [0, 1]).

``build_attack(name, **settings)`` validates the settings and returns ``attack(model, x, y) ->
x_adv``. Registered: ``pgd``, ``fgsm``, ``none``. The TRADES attack has its own signature (no
labels) and is used directly by the TRADES method: :func:`trades_attack`, :func:`trades_loss`.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Registry
from .pgd import attack_loss, fgsm, none, pgd
from .trades import trades_attack, trades_loss

__all__ = ["ATTACKS", "build_attack", "seeded", "pgd", "fgsm", "none", "attack_loss", "trades_attack", "trades_loss"]

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]  # (model, x, y) -> x_adv, as every caller runs one

ATTACKS: Registry[Callable[..., Tensor]] = Registry("attack")
ATTACKS.register("pgd")(pgd)
ATTACKS.register("fgsm")(fgsm)
ATTACKS.register("none")(none)

_CHOICES = {"norm": ("linf", "l2"), "loss": ("ce", "cw")}


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"attack {name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"attack {name} must be an integer >= {low}, got {value!r}")
    return value


def build_attack(name: str, **settings: Any) -> Attack:
    """``functools.partial`` of the registered attack over ``settings``, after checking them.

    Raises ``ConfigError`` (one line) for an unknown attack or setting, a missing one, eps < 0,
    alpha <= 0 (unless steps == 0), steps < 0, restarts < 1, or an unknown norm/loss. ``none``
    accepts and ignores any settings (so a config can keep its eps while training clean).
    """
    fn = ATTACKS.get(name)
    if name == "none":
        return functools.partial(fn, **settings)
    params = {k: p for k, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(settings) - set(params))
    if unknown:
        raise ConfigError(f"attack {name!r} got unknown setting(s) {', '.join(unknown)}; valid: {', '.join(params)}")
    missing = [k for k, p in params.items() if p.default is p.empty and k not in settings]
    if missing:
        raise ConfigError(f"attack {name!r} needs setting(s) {', '.join(missing)}")
    if _number("eps", settings["eps"]) < 0:
        raise ConfigError(f"attack eps must be >= 0, got {settings['eps']!r}")
    steps = _integer("steps", settings["steps"], 0) if "steps" in settings else 1
    alpha = settings.get("alpha")
    if alpha is None and params["alpha"].default is inspect.Parameter.empty and steps > 0:
        raise ConfigError(f"attack {name!r} needs a step size alpha > 0, got None")
    if alpha is not None and _number("alpha", alpha) <= 0 and steps > 0:
        raise ConfigError(f"attack alpha must be > 0, got {alpha!r}")
    if "restarts" in settings:
        _integer("restarts", settings["restarts"], 1)
    if "random_start" in settings and not isinstance(settings["random_start"], bool):
        raise ConfigError(f"attack random_start must be true or false, got {settings['random_start']!r}")
    for key, valid in _CHOICES.items():
        if key in settings and settings[key] not in valid:
            raise ConfigError(f"attack {key} must be one of {', '.join(valid)}, got {settings[key]!r}")
    return functools.partial(fn, **settings)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block from ``torch.manual_seed(seed)`` and restore the caller's RNG state after: the
    attacks draw from torch's global RNG, and a chunked evaluation seeds each chunk alike."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        fork = torch.random.fork_rng(devices=[index], device_type="cuda")
    else:
        fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        yield
