"""``sparta eval``: the test-set robustness of a checkpoint, written beside it, and what the command prints.

:func:`evaluate_checkpoint` is also how ``sparta export`` and the final evaluations of ``sparta reproduce``
and ``sparta grid`` evaluate a trained model; it never prints. :func:`print_evaluation` prints a result.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint
from ..attacks.autoattack import require_autoattack
from ..attacks.fmn import require_secmlt
from ..config import Config, from_saved
from ..data import DatasetSplits, first_images, load_dataset
from ..distributed import Distributed, setup
from ..errors import CheckpointError, ConfigError
from ..experiment import load_model
from ..fmt import eps as format_eps
from ..min_norm import evaluate_min_norm, security_curve, write_distances
from ..plots import PLOTS_SKIPPED, matplotlib_or_none, plot_security_curve
from ..protocol import eval_protocol
from ..robustness import ATTACKS, EvalSettings, evaluate_robustness
from ..rundir import dumps, write_text_atomic
from .console import table

__all__ = ["evaluate_checkpoint", "print_evaluation", "print_min_norm"]


def evaluate_checkpoint(path: str | Path, *, attack: str = "pgd", overrides: list[str] | tuple[str, ...] = (),
                        n_examples: int | None = None, eps_list: str | list[float] | None = None) -> dict[str, Any]:
    """Test-set robustness of a checkpoint: ``attack`` is ``pgd`` (CE loss), ``cw`` (CW-L∞: PGD on the
    CW margin), ``autoattack`` (standard, needs ``pyautoattack``) or ``sweep`` (PGD over ``eps_list``
    and over steps), each with the sanity checks of :func:`sparta.robustness.evaluate_robustness`;
    or ``fmn``: per-image minimal L∞ distances (:func:`sparta.min_norm.evaluate_min_norm`, settings
    ``eval.fmn.*``, tuned on the validation split, else on the test images after the evaluated ones),
    also written as ``<name>.fmn-distances.pickle`` with a security curve ``<name>.fmn-security-curve.png``.

    Settings come from the checkpoint's config ``eval.*`` and ``seed`` (overridable); the result
    (with ``rows``, ``checks`` and ``warnings``) is also written as JSON beside the checkpoint
    (``<name>.eval-<attack>.json``). Under torchrun the test set is sharded in whole chunks of
    ``eval.batch_size`` images over the ranks (see :mod:`sparta.robustness`), every rank returns the
    merged result and rank 0 writes it.
    """
    if attack not in (*ATTACKS, "fmn"):
        raise ConfigError(f"unknown evaluation attack {attack!r}; valid: {', '.join((*ATTACKS, 'fmn'))}")
    if eps_list is not None and attack != "sweep":
        raise ConfigError("--eps-list applies only to --attack sweep")
    if attack == "autoattack":
        require_autoattack()  # before any work
    if attack == "fmn":
        require_secmlt()
    path = Path(path)
    state = checkpoint.load(path)
    if state.config is None:  # was an AttributeError deep in from_saved
        raise CheckpointError(f"{path} holds no config; cannot tell its dataset and evaluation settings")
    cfg = from_saved(state.config, overrides)
    if n_examples is not None:
        if n_examples < 1:
            raise ConfigError(f"--n-examples must be >= 1, got {n_examples}")
        cfg.eval.test_subset = n_examples
    data = load_dataset(cfg.data.name, cfg.data.root, val_size=cfg.data.val_size, train_subset=cfg.data.train_subset)
    spec = state.model_spec
    for what, have, want in (("classes", data.num_classes, spec["num_classes"]),
                             ("input channels", data.in_channels, spec["in_channels"]),
                             ("pixels a side", data.image_size, spec["image_size"])):
        if have != want:  # a network with adaptive pooling would run, on the wrong task
            raise ConfigError(f"{cfg.data.name} has {have} {what} but the checkpoint's model was trained with {want}; "
                              "evaluate on the dataset it was trained on")
    # under torchrun (`sparta eval --nproc N`) every rank attacks its share of the chunks; after every check
    dist = setup(cfg, training=False)
    device = dist.device
    model = load_model(path, device, state)
    protocol = {**eval_protocol(cfg), "precision": "fp32"}  # evaluate_robustness always runs in float32
    e = cfg.eval
    if attack == "fmn":
        return _evaluate_fmn(path, cfg, model, data, protocol, dist)
    settings = EvalSettings(eps=protocol["eps"], alpha=e.alpha, steps=e.steps, restarts=e.restarts,
                            norm=protocol["norm"], batch_size=e.batch_size, seed=cfg.seed, eps_list=eps_list)
    result = evaluate_robustness(model, first_images(data.test, e.test_subset), settings, attack=attack,
                                 device=device, dist=dist)
    name = {"pgd": "pgd", "cw": "pgd-cw", "autoattack": "autoattack-standard", "sweep": "pgd-sweep"}[attack]
    result = {"checkpoint": str(path), **result, "protocol": {**protocol, "attack": name, "seed": cfg.seed},
              "device": str(device), "torch": str(torch.__version__)}
    out = path.with_name(f"{path.stem}.eval-{attack}.json")
    dist.on_main(lambda: write_text_atomic(out, dumps(result)))
    return {**result, "written": str(out)}


def _evaluate_fmn(path: Path, cfg: Config, model: nn.Module, data: DatasetSplits, protocol: dict[str, Any],
                  dist: Distributed) -> dict[str, Any]:
    """``evaluate_checkpoint(attack="fmn")``: distances, JSON, pickle and security curve beside the checkpoint."""
    e, f = cfg.eval, cfg.eval.fmn
    if protocol["norm"] != "linf":
        raise ConfigError(f"--attack fmn measures L∞ distances; the checkpoint's eval norm is {protocol['norm']}")
    test = first_images(data.test, e.test_subset)
    tune = data.val if data.val is not None and len(data.val) else \
        (data.test.subset(len(test), len(data.test)) if len(test) < len(data.test) else None)
    result = evaluate_min_norm(model, test, tune_data=tune, trials=f.trials, tune_steps=f.tune_steps,
                               tune_batch=f.tune_batch, steps=f.steps, batch_size=e.batch_size, device=dist.device,
                               seed=cfg.seed, dist=dist, compare_autoattack=f.autoattack, eps=protocol["eps"])
    split = None if tune is None else "validation" if tune is data.val else "test images after the evaluated ones"
    result = {"checkpoint": str(path), **result, "tuning_split": split,
              "protocol": {**protocol, "attack": "fmn", "seed": cfg.seed}, "device": str(dist.device),
              "torch": str(torch.__version__)}
    out = path.with_name(f"{path.stem}.eval-fmn.json")
    pickled = path.with_name(f"{path.stem}.fmn-distances.pickle")
    png = path.with_name(f"{path.stem}.fmn-security-curve.png")
    mpl = matplotlib_or_none()
    distances = [float("inf") if d is None else d for d in result["distances"]]
    finite = sorted({d for d in distances if d != float("inf")})
    top = max([32 / 255, *(1.1 * d for d in finite[-1:])])
    written = {"written": str(out), "distances_file": str(pickled), "plot": str(png) if mpl else None,
               "notes": [] if mpl else [PLOTS_SKIPPED]}

    def write() -> None:
        write_distances(pickled, distances)
        if mpl:
            plot_security_curve({path.stem: security_curve(distances, [0.0, *finite, top])}, png, mpl,
                                eps=protocol["eps"], title=f"{path.stem}: FMN security curve ({len(distances)} images)")
        write_text_atomic(out, dumps({**result, **written}))

    dist.on_main(write)
    return {**result, **written}


def print_evaluation(result: dict[str, Any], attack: str) -> None:
    """``sparta eval``: the rows of an :func:`evaluate_checkpoint` result and its checks on stdout, its
    warnings and the file written on stderr (``--attack fmn``: :func:`print_min_norm`)."""
    if attack == "fmn":
        print_min_norm(result)
        return
    rows = [{**r, "eps": format_eps(r["eps"]), **{k: "-" for k in ("steps", "restarts") if r.get(k) is None}}
            for r in result["rows"]]
    print(table(rows, [("kind", "row"), ("attack", "attack"), ("norm", "norm"), ("eps", "eps"), ("steps", "steps"),
                       ("restarts", "restarts"), ("n", "n"), ("clean_acc", "clean %"), ("robust_acc", "robust %")]))
    _print_checks(result["checks"], result["warnings"])
    print(f"written: {result['written']}", file=sys.stderr)


def _print_checks(checks: list[dict[str, Any]], warnings: list[str]) -> None:
    """Each sanity check on stdout (``check NAME: ok|FAILED  (detail)``), each warning on stderr."""
    for check in checks:
        print(f"check {check['name']}: {'ok' if check['passed'] else 'FAILED'}  ({check['detail']})")
    for message in warnings:
        print(f"warning: {message}", file=sys.stderr)


def print_min_norm(result: dict[str, Any]) -> None:
    """``sparta eval --attack fmn``: robust accuracy at a few eps, the tuned setting, the checks, the files."""
    eps_rows = [{"eps": eps, "robust_acc": acc} for eps, acc in result["robust_acc_at"].items()]
    print(table(eps_rows, [("eps", "eps (L∞)"), ("robust_acc", "FMN robust %")]))
    median = result["median_distance"]
    print(f"n {result['n']}  clean {result['clean_acc']:.1f}%  median distance "
          f"{'inf' if median is None else f'{255 * median:.2f}/255'}  not found {result['not_found']}")
    aa = result["autoattack"]
    if aa is not None:
        print(f"at eps {format_eps(result['eps'])}: FMN {result['robust_acc']:.1f}%  "
              f"AutoAttack {aa['robust_acc']:.1f}% (same {aa['n']} images)")
    best = result["best_setting"]
    print("best setting (" + (f"{len(result['trials'])} trials): " if result["trials"] else "default, no tuning): ") +
          "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items()))
    _print_checks(result["checks"], result["warnings"] + result["notes"])
    for key in ("written", "distances_file", "plot"):
        if result[key]:
            print(f"written: {result[key]}", file=sys.stderr)
