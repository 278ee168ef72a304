"""AutoAttack (Croce & Hein 2020) adapter: runs the optional ``pyautoattack`` package (``pip install
'sparta[autoattack]'``) quietly and under a fixed seed, and reads back what it only logs.

:func:`run_autoattack` attacks one batch of images and returns x_adv with the package's flags and
per-attack accuracy; :func:`merge_autoattack` unites the infos of several chunks; :func:`replay`
hands precomputed x_adv to :func:`sparta.evaluate.evaluate` as an attack. It runs under
:func:`sparta.attacks.seeded`, as every chunked evaluation does. The package is imported only
when :func:`require_autoattack` runs.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, SpartaError
from . import seeded

__all__ = ["AUTOATTACK_MISSING", "require_autoattack", "run_autoattack", "merge_autoattack", "replay"]

AUTOATTACK_MISSING = "AutoAttack needs the pyautoattack package: pip install 'sparta[autoattack]'"
_AFTER = re.compile(r"robust accuracy after (\S+): ([0-9.]+)%")


def require_autoattack() -> Any:
    """The ``pyautoattack`` module, or a one-line ``SpartaError`` saying how to install it."""
    try:
        import pyautoattack  # noqa: PLC0415 (optional dependency: pyautoattack, only when AutoAttack is asked for)
        pyautoattack.AutoAttack  # noqa: B018  (a stub module without it is as good as missing)
    except (ImportError, AttributeError):
        raise SpartaError(AUTOATTACK_MISSING) from None
    return pyautoattack


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _captured(logger: logging.Logger) -> Iterator[_Capture]:
    """Collect every record of ``logger`` (not propagated) and restore its level, its propagation and
    the caller's tracer afterwards (the package's dynamic-defense check clears any tracer: debugger,
    coverage)."""
    handler = _Capture()
    saved = (logger.level, logger.propagate)
    trace = sys.gettrace()
    try:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        sys.settrace(trace)


def _reset_counters(aa_module: Any) -> None:
    """Zero the package's dynamic-defense counters: they are global and never reset."""
    checks_module = getattr(aa_module, "checks", None)
    if checks_module is not None and isinstance(getattr(checks_module, "funcs", None), dict):
        for key in checks_module.funcs:
            checks_module.funcs[key] = 0


def _flags(records: list[logging.LogRecord], ours: list[warnings.WarningMessage]) -> list[str]:
    """The package's warnings (logged at WARNING or above, or raised as Python warnings from its own
    files), each message once up to its numbers."""
    flags, seen = [], set()
    for message in [r.getMessage() for r in records if r.levelno >= logging.WARNING] + [str(w.message) for w in ours]:
        key = re.sub(r"[0-9.]+", "#", message)  # "there are 15 points with zero gradient", once per batch
        if key not in seen:
            seen.add(key)
            flags.append(message)
    return flags


def _per_attack(records: list[logging.LogRecord]) -> dict[str, float]:
    """Robust accuracy in percent after each of its attacks, read from its log."""
    per_attack = {}
    for record in records:
        match = _AFTER.search(record.getMessage())
        if match:
            per_attack[match.group(1).lower()] = float(match.group(2))
    return per_attack


def run_autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf",
                   batch_size: int = 256, device: torch.device | str = "cpu", seed: int = 0,
                   version: str = "standard") -> tuple[Tensor, dict[str, Any]]:
    """AutoAttack (``pyautoattack``) on ``x`` (N, C, H, W) in [0, 1] and labels ``y`` -> (x_adv, info).

    The model is put in eval mode (and restored). ``info``: ``flags`` (the package's own warnings,
    which it only logs: randomized/dynamic defense, probability outputs, zero gradients, Square
    beating the gradient attacks, too many target classes), ``per_attack`` (robust accuracy in
    percent after each of its attacks, from its log), ``max_perturbation`` (in ``norm``),
    ``in_ball``, ``in_range`` and ``finite`` (x_adv checked here), ``attacks`` and
    ``target_classes``. Nothing is printed; the caller's RNG state is restored.
    """
    aa_module = require_autoattack()
    if norm not in ("linf", "l2"):
        raise ConfigError(f"AutoAttack norm must be linf or l2, got {norm!r}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    _reset_counters(aa_module)
    stdout = io.StringIO()
    try:
        with _captured(logging.getLogger("auto-attack")) as handler, seeded(seed, device), \
                warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout), \
                torch.autocast(device.type, enabled=False):
            warnings.simplefilter("always")
            adversary = aa_module.AutoAttack(model, eps=float(eps), norm={"linf": "Linf", "l2": "L2"}[norm],
                                             version=version, device=device, seed=seed)
            targets = min(9, num_classes - 1)
            if version == "standard" and targets >= 1:  # the package fixes 9: too many below 10 classes
                adversary.apgd_targeted.n_target_classes = targets
                adversary.fab.n_target_classes = targets
            result = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        model.train(was_training)
    x_adv = (result[0] if isinstance(result, tuple) else result).detach().to(device)  # (N, C, H, W)

    package_dir = str(Path(aa_module.__file__).parent)
    ours = [w for w in caught if str(w.filename).startswith(package_dir)]
    delta = (x_adv - x).flatten(1)  # (N, C*H*W)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)  # (N,)
    slack = 1e-6 if norm == "linf" else 1e-5 * max(1.0, float(eps))  # float rounding of the projection
    finite = bool(torch.isfinite(x_adv).all())
    info = {
        "package": f"pyautoattack {getattr(aa_module, '__version__', '?')}", "version": version,
        "attacks": list(adversary.attacks_to_run), "target_classes": targets, "seed": seed,
        "flags": _flags(handler.records, ours), "per_attack": _per_attack(handler.records),
        "max_perturbation": float(size.max()) if len(size) else 0.0,
        "in_ball": finite and bool((size <= eps + slack).all()),
        "in_range": finite and bool(((x_adv >= 0) & (x_adv <= 1)).all()),
        "finite": finite,
        "output": stdout.getvalue().strip().splitlines(),  # anything it printed
        "other_warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught if w not in ours}),
    }
    return x_adv, info


def replay(x_all: Tensor, x_adv_all: Tensor) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """An 'attack' handing back precomputed x_adv (``x_adv_all``, the same (N, C, H, W) as ``x_all``)
    for the unshuffled batches of ``evaluate``; a batch that is not the next slice of ``x_all`` is a
    ``RuntimeError``."""
    offset = 0

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        nonlocal offset
        stop = offset + len(x)
        if stop > len(x_all) or not torch.equal(x_all[offset:stop], x):
            raise RuntimeError("precomputed adversarial examples do not match the evaluation batches")
        out, offset = x_adv_all[offset:stop], stop
        return out

    return attack


def merge_autoattack(infos: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """One ``run_autoattack`` info from the chunks' (``sizes``: images per chunk): flags and warnings
    united, ``per_attack`` robust accuracy recounted over all images, perturbation checks over all."""
    total = sum(sizes)
    per_attack: dict[str, float] = {}
    for name in [a for a in infos[0]["attacks"] if any(a in i["per_attack"] for i in infos)]:
        # the package logs each chunk's accuracy with 2 decimals of a percent: exact counts up to 10,000 images
        count = sum(round(i["per_attack"].get(name, 0.0) * m / 100) for i, m in zip(infos, sizes))
        per_attack[name] = 100.0 * count / total
    united = lambda key: list(dict.fromkeys(x for i in infos for x in i[key]))  # noqa: E731  (order kept)
    return {**infos[0], "flags": united("flags"), "per_attack": per_attack, "chunks": len(infos),
            "max_perturbation": max(i["max_perturbation"] for i in infos),
            **{key: all(i[key] for i in infos) for key in ("in_ball", "in_range", "finite")},
            "output": united("output"), "other_warnings": sorted(set(united("other_warnings")))}
