"""Minimum-norm L∞ evaluation as the adversarial pruning benchmark (Piras et al. 2024) reports it:
per-image minimal distances under FMN tuned per model (``sparta.attacks.fmn``: the attack and its
HO-FMN search), robust accuracy read off them at any eps, security curves, the benchmark's distances
file, and the check against AutoAttack on the same images. Behind ``sparta eval --attack fmn``.
"""
from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .attacks import fmn, seeded
from .attacks.autoattack import require_autoattack, run_autoattack
from .distributed import SINGLE, Distributed
from .errors import ConfigError
from .fmt import eps as format_eps
from .pareto import binomial_se
from .robustness import chunk_seed, chunks, stack_images
from .rundir import atomic_write

__all__ = ["robust_accuracy_at", "security_curve", "write_distances", "autoattack_check", "evaluate_min_norm"]


# ------------------------------------------------------------------------------ reading distances

def robust_accuracy_at(distances: Tensor | Sequence[float], eps: float) -> float:
    """Robust accuracy (percent) at L∞ budget ``eps``: the share of images whose minimal distance is
    above ``eps`` (0.0, misclassified clean, is never robust; ``inf`` always is). ``eps`` is rounded to the
    distances' precision first (float32 for a tensor of them), so a distance equal to eps counts as broken."""
    d = distances.float() if isinstance(distances, Tensor) else \
        torch.tensor([math.inf if v is None else v for v in distances], dtype=torch.float64)
    return 100.0 * float((d > torch.tensor(eps, dtype=d.dtype)).sum()) / len(d) if len(d) else 0.0


def security_curve(distances: Tensor | Sequence[float], eps_values: Sequence[float]) -> list[tuple[float, float]]:
    """``[(eps, robust accuracy in percent)]`` for each eps of ``eps_values`` (sorted)."""
    return [(float(e), robust_accuracy_at(distances, e)) for e in sorted(eps_values)]


def write_distances(path: str | Path, distances: Tensor | Sequence[float]) -> Path:
    """The benchmark's per-model distances file: a pickle of a 1-D float32 CPU torch tensor, one minimal
    L∞ distance per test image in test-set order (0 = misclassified clean, inf = none found)."""
    d = torch.as_tensor([math.inf if v is None else v for v in distances] if not isinstance(distances, Tensor)
                        else distances, dtype=torch.float32).detach().cpu().reshape(-1)
    path = Path(path)
    atomic_write(path, lambda f: pickle.dump(d, f, protocol=4))
    return path


# -------------------------------------------------------------------------------------- evaluation

def autoattack_check(robust: float, autoattack: float, n: int, eps: float,
                     note: str = "") -> tuple[dict[str, Any], float]:
    """``fmn_le_autoattack``: FMN's robust accuracy at ``eps`` (percent) is not above AutoAttack's on the
    same ``n`` images by more than twice the pooled binomial standard error; returns the check
    (``name``, ``passed``, ``detail`` + ``note``) and that margin."""
    two_se = 2 * binomial_se((autoattack + robust) / 2, n)
    return {"name": "fmn_le_autoattack", "passed": robust <= autoattack + two_se,
            "detail": f"FMN robust {robust:.2f}% <= AutoAttack {autoattack:.2f}% + 2 SE ({two_se:.2f}) at eps "
                      f"{format_eps(eps)} on the same {n} images{note}"}, two_se


def _autoattack_flags(model: nn.Module, data: Any, *, eps: float, batch_size: int, device: torch.device, seed: int,
                      dist: Distributed) -> tuple[list[bool], dict[str, Any]]:
    """AutoAttack (standard) chunk by chunk as ``sparta eval --attack autoattack`` runs it: per image,
    whether the model is still correct; plus the merged checks of its x_adv."""
    flags: list[bool] = []
    valid, package = True, ""
    for k, start, stop in chunks(len(data), batch_size, dist):
        x, y = stack_images(data.subset(start, stop), batch_size, device)
        x_adv, info = run_autoattack(model, x, y, eps=eps, batch_size=batch_size, device=device,
                                     seed=chunk_seed(seed, k))
        with torch.no_grad():
            flags += (model(x_adv).argmax(1) == y).cpu().tolist()
        valid = valid and info["in_ball"] and info["in_range"] and info["finite"]
        package = info["package"]
    parts = dist.all_gather((flags, valid, package))
    return [f for p in parts for f in p[0]], {"valid": all(p[1] for p in parts), "package": parts[0][2]}


def _check_settings(data: Any, tune_data: Any | None, *, steps: int, tune_steps: int, tune_batch: int,
                    batch_size: int, trials: int) -> None:
    """One-line errors for settings :func:`evaluate_min_norm` cannot run with."""
    for name, value, low in (("steps", steps, 0), ("tune_steps", tune_steps, 0), ("tune_batch", tune_batch, 1),
                             ("batch_size", batch_size, 1), ("trials", trials, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"FMN {name} must be an integer >= {low}, got {value!r}")
    if len(data) == 0:
        raise ConfigError("nothing to evaluate: the evaluation set is empty")
    if trials and (tune_data is None or len(tune_data) == 0):
        raise ConfigError("FMN tuning needs images other than the evaluated ones (a validation split, or test images "
                          "after the evaluated ones); set eval.fmn.trials=0 to use the default setting")


def _distances(model: nn.Module, data: Any, setting: dict[str, Any], *, steps: int, batch_size: int,
               device: torch.device, seed: int, dist: Distributed) -> tuple[Tensor, int]:
    """The (N,) float32 minimal distances of every image of ``data`` in order, chunk k under the seed
    ``chunk_seed(seed, k)`` and gathered over the ranks, and how many attack outputs were rejected."""
    mine: list[float] = []
    rejected = 0
    for k, start, stop in chunks(len(data), batch_size, dist):
        x, y = stack_images(data.subset(start, stop), batch_size, device)
        with seeded(chunk_seed(seed, k), device):
            d, r = fmn.distances_of(model, x, y, setting=setting, steps=steps, batch_size=batch_size, device=device)
        mine += d.tolist()
        rejected += r
    parts = dist.all_gather((mine, rejected))
    return torch.tensor([v for p in parts for v in p[0]], dtype=torch.float32), sum(p[1] for p in parts)


def evaluate_min_norm(model: nn.Module, data: Any, *, tune_data: Any | None, trials: int = 32, tune_steps: int = 100,
                      tune_batch: int = 64, steps: int = 200, batch_size: int = 256,
                      device: torch.device | str = "cpu", seed: int = 0, dist: Distributed = SINGLE,
                      compare_autoattack: bool = True, eps: float = 8 / 255,
                      eps_grid: Sequence[float] = fmn.DEFAULT_EPS_GRID) -> dict[str, Any]:
    """Minimal L∞ distances of every image of ``data`` (an ``ImageSet``) under FMN tuned for ``model``,
    robust accuracy read off them, and checks. Returns a JSON-able dict (never prints).

    Tuning (:func:`tune_min_norm`): ``trials`` settings, ``tune_steps`` steps each, on batches of
    ``tune_batch`` images of ``tune_data`` (which must not hold the evaluated images; ``trials`` = 0
    skips tuning and uses ``fmn.DEFAULT_SETTING``). Then the best setting runs ``steps`` steps on ``data``
    chunk by chunk (chunk k: images [k*batch_size, (k+1)*batch_size), under the seed
    ``chunk_seed(seed, k)``), so under torchrun each rank takes a contiguous run of whole chunks and the
    gathered distances equal one process's image by image. The defaults are the benchmark's (32
    trials of 100 steps on 64 images, 200 final steps).

    With ``compare_autoattack`` AutoAttack (standard, ``pyautoattack``) runs at ``eps`` on the same
    chunks, for the check that FMN's robust accuracy at ``eps`` is not above AutoAttack's by more
    than twice the pooled binomial standard error (a minimum-norm attack with few steps may be
    weaker than AutoAttack, never much weaker if it works).

    Keys: ``attack`` ("fmn"), ``norm``, ``n``, ``seed``, ``world_size``, ``clean_acc``, ``eps``,
    ``robust_acc`` (at ``eps``), ``robust_acc_at`` (``{format_eps(e): percent}`` over ``eps_grid``),
    ``median_distance`` (over images correct clean; None when it is inf), ``not_found`` (images correct
    clean without an adversarial example), ``distances`` (per image in order; JSON null for inf),
    ``best_setting``, ``trials``, ``tuning`` (``trials``, ``steps``, ``batch``, ``images``), ``steps``,
    ``chunk_size``, ``autoattack`` (``robust_acc``, ``n``, ``package``; None without the comparison),
    ``checks`` (``[{name, passed, detail}]``), ``warnings`` and ``package`` (the secml-torch version).
    """
    secmlt = fmn.require_secmlt()
    device = fmn.cpu_only(device)
    _check_settings(data, tune_data, steps=steps, tune_steps=tune_steps, tune_batch=tune_batch,
                    batch_size=batch_size, trials=trials)
    if compare_autoattack:
        require_autoattack()
    model.float()
    if trials:
        assert tune_data is not None  # refused above otherwise
        tune_images = tune_data.subset(0, min(len(tune_data), trials * tune_batch))
        tx, ty = stack_images(tune_images, tune_batch, device)
        with seeded(seed, device):
            best, tried = fmn.tune_min_norm(model, tx, ty, trials=trials, steps=tune_steps, batch_size=tune_batch,
                                            seed=seed, device=device, dist=dist)
    else:
        best, tried = dict(fmn.DEFAULT_SETTING), []

    distances, rejected = _distances(model, data, best, steps=steps, batch_size=batch_size, device=device, seed=seed,
                                     dist=dist)
    n = len(distances)
    clean = 100.0 * float((distances > 0).sum()) / n
    robust = robust_accuracy_at(distances, eps)
    median = fmn.median_distance(distances)
    not_found = int(torch.isinf(distances).sum())

    checks: list[dict[str, Any]] = []
    warns: list[str] = []

    def add(name: str, passed: bool, detail: str, warning: str) -> None:
        checks.append({"name": name, "passed": bool(passed), "detail": detail})
        if not passed:
            warns.append(warning)

    finite_ok = bool(((distances >= 0) | torch.isinf(distances)).all()) and not bool(torch.isnan(distances).any())
    add("distances_valid", finite_ok and rejected == 0,
        f"{n} distances >= 0 (0 = misclassified clean, inf = none found: {not_found}); every adversarial example "
        f"checked misclassified and in [0, 1] ({rejected} rejected)",
        f"{rejected} FMN outputs were not misclassified or left [0, 1] (their distances were dropped as inf); "
        "check the model for randomness or train-mode layers")
    add("robust_le_clean", robust <= clean, f"FMN robust {robust:.2f}% at eps {format_eps(eps)} <= clean {clean:.2f}%",
        f"FMN robust accuracy ({robust:.2f}%) is above clean accuracy ({clean:.2f}%): the distances are inconsistent")
    autoattack = None
    if compare_autoattack:
        flags, info = _autoattack_flags(model, data, eps=eps, batch_size=batch_size, device=device, seed=seed,
                                        dist=dist)
        aa = 100.0 * sum(flags) / n
        missed = sum(1 for f, d in zip(flags, distances.tolist()) if not f and d > eps)
        autoattack = {"robust_acc": aa, "n": n, "package": info["package"], "x_adv_valid": info["valid"]}
        check, two_se = autoattack_check(robust, aa, n, eps, f"; AutoAttack broke {missed} images FMN found no "
                                                             "adversarial example within eps for")
        add(check["name"], check["passed"], check["detail"],
            f"FMN's robust accuracy at eps {format_eps(eps)} ({robust:.2f}%) is above AutoAttack's ({aa:.2f}%) by more "
            f"than 2 standard errors ({two_se:.2f}): the tuned FMN is too weak on this model (more steps or trials), "
            "or the model masks gradients")
    if median == math.inf and clean > 0:
        warns.append("FMN found no adversarial example for half or more of the correctly classified images: raise "
                     "eval.fmn.steps, or check the model for gradient masking")
    return {
        "attack": "fmn", "norm": "linf", "n": n, "seed": seed, "world_size": dist.world_size, "clean_acc": clean,
        "eps": eps, "robust_acc": robust,
        "robust_acc_at": {format_eps(e): a for e, a in security_curve(distances, sorted({*eps_grid, eps}))},
        "median_distance": None if math.isinf(median) else median, "not_found": not_found,
        "best_setting": best, "trials": tried,
        "tuning": {"trials": trials, "steps": tune_steps, "batch": tune_batch,
                   "images": 0 if tune_data is None else min(len(tune_data), trials * tune_batch)},
        "steps": steps, "chunk_size": batch_size, "autoattack": autoattack, "checks": checks, "warnings": warns,
        "package": f"secml-torch {secmlt.__version__.strip()}",
        "distances": [None if math.isinf(v) else v for v in distances.tolist()],
    }
