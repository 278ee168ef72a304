"""The evaluation protocol and the best-epoch rule: one definition each, used by training
(``sparta.experiment``), ``summary.json`` (``sparta.summary``) and the reports (``sparta.report``)."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .config import Config


def eval_attack(cfg: Config) -> Callable:
    """The attack used for validation/test robust accuracy (PGD-20 by default), described by ``eval_protocol``."""
    from .attacks import build_attack  # noqa: PLC0415 (torch-free module for the reports: sparta.attacks imports torch)

    e = cfg.eval
    if e.attack == "none":
        return build_attack("none")
    settings = dict(eps=cfg.attack.eps if e.eps is None else e.eps, alpha=e.alpha,
                    norm=e.norm or cfg.attack.norm, random_start=True)
    if e.attack == "pgd":
        settings.update(steps=e.steps, restarts=e.restarts)
    return build_attack(e.attack, **settings)


def eval_protocol(cfg: Config | Mapping[str, Any]) -> dict[str, Any]:
    """What validation and test accuracy are measured with (``summary.json``'s ``eval_protocol``): the
    attack ``eval_attack`` builds, the image subsets, BatchNorm mode and precision.

    ``cfg`` may also be a run's ``config.yaml`` as a dict (``sparta report`` on an unfinished run): a key
    that file lacks is None here (``eval.attack``: "pgd"), not today's default, so the file is described
    as it was written.
    """
    c = cfg.to_dict() if isinstance(cfg, Config) else cfg
    e, a = c.get("eval") or {}, c.get("attack") or {}
    return {"attack": e.get("attack", "pgd"), "norm": e.get("norm") or a.get("norm"),
            "eps": a.get("eps") if e.get("eps") is None else e.get("eps"), "alpha": e.get("alpha"),
            "steps": e.get("steps"), "restarts": e.get("restarts"), "random_start": True,
            "val_subset": e.get("val_subset"), "test_subset": e.get("test_subset"), "bn": "eval",
            "precision": e.get("precision")}


def improves(value: float, best: float | None) -> bool:
    """The best-epoch rule: an evaluated epoch is the new best when its selector (validation robust
    accuracy) is strictly above the best so far, so the earliest epoch wins a tie."""
    return best is None or value > best


def best_index(records: Sequence[Mapping[str, Any]]) -> int:
    """Index of the best of one stage's evaluated ``records`` (metrics.jsonl rows) by the rule that
    picks ``checkpoints/best.pt``: the highest finite ``val_robust_acc``, the earliest on ties; the
    last record when none has one (no validation split: the latest epoch wins)."""
    best, best_value = len(records) - 1, None
    for i, r in enumerate(records):
        v = r.get("val_robust_acc")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if improves(v, best_value):
            best, best_value = i, v
    return best
