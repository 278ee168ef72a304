"""Training objectives: how an adversarial example is made and what loss the step minimises.

An objective is built once from the config and gives the loop two functions:

- ``attack(model, x, y, step) -> x_adv`` (run under the configured BatchNorm mode; ``step`` drives
  the optional eps warm-up, ``attack.eps_warmup_epochs``), and
- ``loss(model, x_adv, x, y) -> (loss, logits)`` where ``logits`` (B, classes) are the ones whose
  accuracy counts as the running train robust accuracy.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import build_attack
from .attacks.trades import trades_attack, trades_loss
from .config import Config


@dataclass
class Objective:
    attack: Callable[[nn.Module, Tensor, Tensor, int], Tensor]
    loss: Callable[[nn.Module, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _warmed_up(attack: Callable[..., Tensor], eps: float, alpha: float, warmup_steps: int) -> Callable[..., Tensor]:
    """``attack`` whose eps (and step size, in proportion) rise linearly over the first
    ``warmup_steps`` steps: without it, small nets trained at a large budget (MNIST at 0.3) can stay
    at chance for many epochs."""
    if warmup_steps <= 0:
        return lambda model, x, y, step: attack(model, x, y)

    def ramped(model: nn.Module, x: Tensor, y: Tensor, step: int) -> Tensor:
        scale = min(1.0, (step + 1) / warmup_steps)
        return attack(model, x, y, eps=eps * scale, alpha=alpha * scale)

    return ramped


def _ce_on_adversarial(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Madry et al. 2018: minimise cross-entropy on the adversarial batch."""
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits


def build_objective(cfg: Config, steps_per_epoch: int) -> Objective:
    a = cfg.attack
    warmup_steps = round(a.eps_warmup_epochs * steps_per_epoch)
    if cfg.objective.name == "ce":
        attack = build_attack(a.name, **attack_settings(cfg))
        if a.name == "none":
            warmup_steps = 0
        return Objective(attack=_warmed_up(attack, a.eps, a.alpha, warmup_steps), loss=_ce_on_adversarial)

    beta = cfg.objective.beta

    def trades_adv(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = a.eps, alpha: float = a.alpha) -> Tensor:
        return trades_attack(model, x, eps=eps, alpha=alpha, steps=a.steps)

    def trades(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Zhang et al. 2019: CE on clean logits + beta * KL(clean || adversarial)."""
        logits_clean, logits_adv = model(x), model(x_adv)
        return trades_loss(logits_clean, logits_adv, y, beta), logits_adv

    return Objective(attack=_warmed_up(trades_adv, a.eps, a.alpha, warmup_steps), loss=trades)


def attack_settings(cfg: Config) -> dict:
    """Keyword settings of the training attack for ``build_attack`` (none takes none)."""
    a = cfg.attack
    if a.name == "none":
        return {}
    settings = dict(eps=a.eps, alpha=a.alpha, norm=a.norm, loss=a.loss, random_start=a.random_start)
    if a.name == "pgd":
        settings["steps"] = a.steps
    return settings


