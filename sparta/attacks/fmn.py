"""Minimum-norm L∞ attack: the fast minimum-norm attack (FMN, Pintor et al. 2021) of secml-torch and a
small seeded search over its loss, optimizer and step-size schedule per model (after HO-FMN, Mura et
al. 2024), giving per-image minimal distances; ``sparta.min_norm`` reads robust accuracy at any eps
and security curves off them, as the adversarial pruning benchmark (Piras et al. 2024) reports them.

The attack is secml-torch's own modular min-distance attack
(``secmlt.adv.evasion.modular_attacks.modular_attack_min_distance.ModularEvasionAttackMinDistance``)
with FMN's eps-ball update (``secmlt.adv.evasion.fmn.FMNNative``), built here with a chosen loss
module, optimizer partial and scheduler partial; nothing of the attack is written here. secml-torch
is optional (``pip install --no-deps secml-torch==1.5``: its torchvision requirement is never
imported by the modules used, and installing it would pull another torch) and imported only when
a function here runs.

A *setting* is a dict: ``loss`` (``dlr``: Croce & Hein's difference-of-logits ratio; ``ce``:
cross-entropy; ``ll``: the logit difference max_{j≠y} z_j − z_y), ``optimizer`` (``sgd`` with
``lr``, ``momentum``, ``weight_decay``, ``dampening``; ``adam`` with ``lr``, ``weight_decay``,
``beta1``, ``beta2``) and ``scheduler`` (``calr``: cosine annealing from lr to lr/100 over the
steps; ``none``: constant). secml-torch's loop steps the scheduler without a metric, so HO-FMN's
reduce-on-plateau schedule is not searched, and Adamax is left out.

Distances (:func:`min_norm_distances`): the L∞ norm of x_adv − x measured here, 0.0 for an image the
model misclassifies clean, ``inf`` where the attack found no adversarial example; a distance is
kept only after its x_adv was checked to be misclassified and inside [0, 1].

secml-torch 1.5's min-distance loop keeps its bookkeeping tensors on the CPU (``torch.zeros``
without a device), so the attack runs on a CPU device only; a CUDA device is refused in one line.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..distributed import SINGLE, Distributed
from ..errors import ConfigError, SpartaError

__all__ = ["min_norm_distances", "tune_min_norm", "distances_of", "median_distance", "cpu_only", "require_secmlt",
           "DEFAULT_SETTING", "DEFAULT_EPS_GRID", "search_space"]

SECMLT_VERSION = "1.5"
SECMLT_MISSING = (f"--attack fmn needs secml-torch: pip install --no-deps secml-torch=={SECMLT_VERSION} "
                  "(--no-deps: its torchvision requirement pulls another torch and is never imported)")
LOSSES = ("dlr", "ce", "ll")
OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("calr", "none")
# FMN's usual start (adv-lib's alpha_init = 1; the gradient is scaled to unit L2 norm before the step)
DEFAULT_SETTING: dict[str, Any] = {"loss": "dlr", "optimizer": "sgd", "scheduler": "calr", "lr": 1.0,
                                   "momentum": 0.0, "weight_decay": 0.0, "dampening": 0.0}
DEFAULT_EPS_GRID = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 12 / 255, 16 / 255, 32 / 255)
LR_RANGE = (8 / 255, 10.0)  # HO-FMN's search space (log scale), as the other ranges below
GAMMA = 0.05  # FMN's eps-ball step, cosine-annealed to 0.001 (secml-torch's defaults)


def require_secmlt() -> Any:
    """The ``secmlt`` package, or a one-line ``SpartaError`` saying how to install it."""
    try:
        import secmlt  # noqa: PLC0415 (optional dependency: secml-torch)
        from secmlt.adv.evasion.fmn import FMNNative  # noqa: F401, PLC0415 (optional dependency: secml-torch)
    except ImportError:
        raise SpartaError(SECMLT_MISSING) from None
    return secmlt


def cpu_only(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type != "cpu":
        raise SpartaError(f"--attack fmn runs on the CPU only: secml-torch {SECMLT_VERSION}'s min-distance loop keeps "
                          f"its bookkeeping tensors on the CPU, so it fails on {device}; evaluate with device=cpu")
    return device


class DLRLoss(nn.Module):
    """Difference of logits ratio (Croce & Hein 2020), untargeted, per image and to be maximised as
    secml-torch's attacks maximise their loss: (max_{j≠y} z_j − z_y) / (z_(1) − z_(3) + 1e-12), z_(k) the
    k-th largest logit. Needs 3 classes or more."""

    def forward(self, logits: Tensor, y: Tensor) -> Tensor:  # (B, C), (B,) -> (B,)
        top = logits.sort(dim=1, descending=True).values
        true = logits.gather(1, y[:, None])[:, 0]
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        return (other - true) / (top[:, 0] - top[:, 2] + 1e-12)


def _loss_module(name: str) -> nn.Module:
    from secmlt.optimization.losses import LogitDifferenceLoss  # noqa: PLC0415 (optional dependency: secml-torch)

    losses: dict[str, Callable[[], nn.Module]] = {
        "dlr": DLRLoss, "ce": partial(nn.CrossEntropyLoss, reduction="none"),
        "ll": partial(LogitDifferenceLoss, reduction="none")}
    return losses[name]()


def _check_setting(setting: dict[str, Any], num_classes: int) -> None:
    for key, choices in (("loss", LOSSES), ("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS)):
        if setting.get(key) not in choices:
            raise ConfigError(f"FMN setting {key} must be one of {', '.join(choices)}, got {setting.get(key)!r}")
    if not (isinstance(setting.get("lr"), (int, float)) and setting["lr"] > 0):
        raise ConfigError(f"FMN setting lr must be > 0, got {setting.get('lr')!r}")
    if setting["loss"] == "dlr" and num_classes < 3:
        raise ConfigError(f"the DLR loss needs 3 classes or more, the model has {num_classes}; use loss ce or ll")


def _no_schedule(optimizer: torch.optim.Optimizer, **_: Any) -> Any:
    """A constant step size (secml-torch passes T_max and eta_min to every scheduler)."""
    from secmlt.optimization.scheduler_factory import NoScheduler  # noqa: PLC0415 (optional dependency: secml-torch)

    return NoScheduler(optimizer)


def _build_attack(setting: dict[str, Any], steps: int) -> Any:
    """A fresh FMN (L∞, box [0, 1]) with ``setting``'s loss, optimizer and schedule (it mutates its own
    eps-ball while running, so every batch gets its own)."""
    from secmlt.adv.evasion.fmn import FMNNative  # noqa: PLC0415 (optional dependency: secml-torch)
    from secmlt.optimization.scheduler_factory import LRSchedulerFactory  # noqa: PLC0415 (optional dependency: secml-torch)

    attack = FMNNative(perturbation_model="linf", num_steps=steps, max_step_size=float(setting["lr"]), gamma=GAMMA)
    if setting["optimizer"] == "sgd":
        attack.optimizer_cls = partial(torch.optim.SGD, momentum=setting.get("momentum", 0.0),
                                       weight_decay=setting.get("weight_decay", 0.0),
                                       dampening=setting.get("dampening", 0.0))
    else:
        attack.optimizer_cls = partial(torch.optim.Adam, weight_decay=setting.get("weight_decay", 0.0),
                                       betas=(setting.get("beta1", 0.9), setting.get("beta2", 0.999)))
    attack.scheduler_cls = (LRSchedulerFactory.create_cosine_annealing() if setting["scheduler"] == "calr"
                            else _no_schedule)
    attack.loss_function = _loss_module(setting["loss"])
    return attack


class _Frozen:
    """Eval mode and no weight gradients while secml-torch runs (its backward would fill ``.grad``);
    both restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        self.training = self.model.training
        self.grads = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.grads:
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for p, flag in self.grads:
            p.requires_grad_(flag)
        self.model.train(self.training)


def _attack_batch(model: nn.Module, x: Tensor, y: Tensor, setting: dict[str, Any], steps: int) -> tuple[Tensor, int]:
    """Distances (B,) of one batch and the number of attack outputs rejected by the checks."""
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    if steps == 0 or not clean_ok.any():
        return torch.where(clean_ok, math.inf, 0.0), 0
    attack = _build_attack(setting, steps)
    loader = attack(model, DataLoader(TensorDataset(x, y), batch_size=len(x)))
    x_adv = torch.cat([xa for xa, _ in loader]).to(x.device).detach()
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    size = (x_adv - x).flatten(1).abs().amax(1)
    valid = torch.isfinite(x_adv).flatten(1).all(1) & (x_adv >= 0).flatten(1).all(1) & (x_adv <= 1).flatten(1).all(1)
    found = clean_ok & fooled & valid & (size > 0)
    # not found: the attack hands back x itself (still correct); anything else failing the checks is rejected
    rejected = int((clean_ok & ~found & ((size > 0) | ~valid)).sum())
    dist = torch.where(found, size, torch.full_like(size, math.inf))
    return torch.where(clean_ok, dist, torch.zeros_like(dist)).float().cpu(), rejected


def min_norm_distances(model: nn.Module, x: Tensor, y: Tensor, *, setting: dict[str, Any] | None = None, steps: int,
                       batch_size: int, device: torch.device | str = "cpu") -> Tensor:
    """Each image's minimal adversarial L∞ distance found by FMN with ``setting`` (default
    ``DEFAULT_SETTING``) in ``steps`` steps, ``batch_size`` images at a time -> (N,) float32 on the CPU:
    0.0 where ``model`` misclassifies the clean image, ``inf`` where no adversarial example was found.
    Model mode and ``requires_grad`` are restored after."""
    return distances_of(model, x, y, setting=setting, steps=steps, batch_size=batch_size, device=device)[0]


def distances_of(model: nn.Module, x: Tensor, y: Tensor, *, setting: dict[str, Any] | None, steps: int,
               batch_size: int, device: torch.device | str) -> tuple[Tensor, int]:
    require_secmlt()
    device = cpu_only(device)
    setting = dict(DEFAULT_SETTING if setting is None else setting)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"FMN steps must be an integer >= 0, got {steps!r}")
    if batch_size < 1:
        raise ConfigError(f"FMN batch size must be >= 1, got {batch_size}")
    out, rejected = [], 0
    with _Frozen(model), torch.autocast(device.type, enabled=False):
        if len(x):
            with torch.no_grad():
                _check_setting(setting, model(x[:1].to(device)).shape[1])
        for start in range(0, len(x), batch_size):
            d, r = _attack_batch(model, x[start:start + batch_size].to(device), y[start:start + batch_size].to(device),
                                 setting, steps)
            out.append(d)
            rejected += r
    return (torch.cat(out) if out else torch.zeros(0)), rejected


# ------------------------------------------------------------------------------------------ tuning

def search_space(trials: int, seed: int) -> list[dict[str, Any]]:
    """The settings the tuner tries, in trial order (a pure function of ``trials`` and ``seed``).

    Trial 0 is ``DEFAULT_SETTING`` (the benchmark's DLR, SGD, cosine annealing). Trial i > 0 takes the
    (loss, optimizer, scheduler) combination i mod 12 of the grid LOSSES x OPTIMIZERS x SCHEDULERS
    (so 12 trials or more try every combination) and draws its numbers from HO-FMN's ranges with
    ``random.Random(seed)``: lr log-uniform in [8/255, 10]; SGD momentum in [0, 0.9], weight decay in
    [0.01, 1], dampening in [0, 0.2]; Adam weight decay in [0.01, 1], beta1 and beta2 in [0, 0.999].
    """
    rng = random.Random(seed)
    grid = [(loss, opt, sch) for loss in LOSSES for opt in OPTIMIZERS for sch in SCHEDULERS]
    out = []
    for i in range(trials):
        if i == 0:
            out.append(dict(DEFAULT_SETTING))
            continue
        loss, opt, sch = grid[i % len(grid)]
        lr = math.exp(rng.uniform(math.log(LR_RANGE[0]), math.log(LR_RANGE[1])))
        if opt == "sgd":
            numbers = {"momentum": rng.uniform(0.0, 0.9), "weight_decay": rng.uniform(0.01, 1.0),
                       "dampening": rng.uniform(0.0, 0.2)}
        else:
            numbers = {"weight_decay": rng.uniform(0.01, 1.0), "beta1": rng.uniform(0.0, 0.999),
                       "beta2": rng.uniform(0.0, 0.999)}
        out.append({"loss": loss, "optimizer": opt, "scheduler": sch, "lr": lr,
                    **{k: round(v, 6) for k, v in numbers.items()}})
    return out


def median_distance(distances: Tensor) -> float:
    """HO-FMN's objective: the median distance over the images correctly classified clean (``inf``
    counts as larger than any distance); ``inf`` when there are none."""
    kept = distances[distances > 0].tolist()
    return statistics.median_low(kept) if kept else math.inf


def _trial_batch(n: int, i: int, batch: int) -> list[int]:
    """Trial i's images: the i-th run of ``batch`` consecutive tuning images, wrapping around."""
    batch = min(batch, n)
    return [(i * batch + j) % n for j in range(batch)]


def tune_min_norm(model: nn.Module, x: Tensor, y: Tensor, *, trials: int, steps: int, batch_size: int, seed: int,
                  device: torch.device | str = "cpu",
                  dist: Distributed = SINGLE) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pick FMN's setting for ``model`` on tuning images ``x``, ``y`` (never the evaluated ones) ->
    (best_setting, trials_list).

    Trial i runs ``search_space(trials, seed)[i]`` for ``steps`` steps on its own batch of
    ``batch_size`` tuning images (wrapping around when there are fewer than trials x batch_size) and
    scores it by the median distance (:func:`_median`); the lowest median wins, the earlier trial on a
    tie (so ``DEFAULT_SETTING`` when nothing beats it). Each trial depends on i only, so under torchrun
    the trials are shared among the ranks and gathered: every rank returns the same choice.
    ``trials_list``: ``{trial, setting, median (None for inf), images, found}`` per trial.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ConfigError(f"FMN trials must be an integer >= 0, got {trials!r}")
    if trials and len(x) == 0:
        raise ConfigError("FMN tuning needs tuning images, got none")
    settings = search_space(trials, seed)
    first, last = dist.shard(trials)
    mine: list[dict[str, Any]] = []
    for i in range(first, last):
        index = torch.tensor(_trial_batch(len(x), i, batch_size))
        d = min_norm_distances(model, x[index], y[index], setting=settings[i], steps=steps, batch_size=batch_size,
                               device=device)
        median = median_distance(d)
        mine.append({"trial": i, "setting": settings[i], "median": None if math.isinf(median) else median,
                     "images": len(index), "found": int(torch.isfinite(d[d > 0]).sum())})
    done = [t for part in dist.all_gather(mine) for t in part]
    if not done:
        return dict(DEFAULT_SETTING), []
    best = min(done, key=lambda t: (math.inf if t["median"] is None else t["median"], t["trial"]))
    return dict(best["setting"]), done
