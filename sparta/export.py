"""``sparta export``: a checkpoint as a plain, sparta-free model folder, its result card, and the
adversarial pruning benchmark's submission statement.

``export_checkpoint(ckpt, out_dir)`` writes

- ``model.pt``: a plain state_dict (masks folded in: pruned weights are exactly 0) whose names follow
  the benchmark's base models (``resnet18`` -> ``base_resnet18``, ``vgg16_bn_hydra`` -> ``base_vgg16``,
  ``preact_resnet18`` -> the Flying Bird entry's PreActResNet-18) or kuangliu's VGG-16 (``vgg16_bn``),
  loadable with ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``; see
  ``docs/export.md`` for the name mapping;
- ``architecture.py``: those definitions in plain torch (a copy of ``sparta/export_arch.py``);
- ``architecture.json``: name, classes, input channels, every layer's width (a channel ticket is the
  smaller dense network) and the input normalisation (mean/std);
- ``card.json`` + ``card.md``: clean and AutoAttack (standard, L∞) accuracy at eps 8/255 and 0.031,
  sparsity overall and per layer, structure, training FLOPs and wall time (from the run's
  ``summary.json``), model, dataset, method;
- ``submission.json``: the benchmark's model key (``<ap>_<R18|V16>_<CIFAR10|SVHN>_<US|S>_<sparsity>``),
  which base model the state_dict loads into (or why not, and which network to use instead), the
  normalisation statement, and the AutoAttack result at the benchmark's eps 0.031.

Normalisation is exported as separate mean/std, not folded into the first convolution: the first
convolution zero-pads its input, and a folded convolution would read that padding as pixel 0 where
the trained network read it as the normalised 0 (the mean pixel), so border outputs would change. The
submission states it (``normalization.required``), as the benchmark asks.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint
from .attacks.autoattack import require_autoattack
from .commands.evaluate import evaluate_checkpoint
from .config import from_saved
from .data import first_images, load_dataset
from .distributed import resolve_device
from .errors import CheckpointError, ConfigError
from .experiment import load_model
from .fmt import eps as format_eps
from .min_norm import autoattack_check, robust_accuracy_at
from .models import NormalizedModel
from .netspec import build_model
from .robustness import EvalSettings, evaluate_robustness
from .rundir import atomic_write, dumps, write_text_atomic

FORMATS = ("benchmark",)
# sparta model -> (the benchmark's architecture tag in the model key, the network its state_dict loads into)
SUPPORTED = {"resnet18": ("R18", "base_resnet18 (models/base_resnet18.py)"),
             "vgg16_bn_hydra": ("V16", "base_vgg16 (models/base_vgg16.py)"),
             "preact_resnet18": ("R18", "the Flying Bird entry's ResNet18 (models/flyingbird.py), not base_resnet18"),
             "vgg16_bn": ("V16", "kuangliu's VGG('VGG16'); not base_vgg16 (HYDRA's VGG-16): train vgg16_bn_hydra")}
KEY_DATASETS = {"cifar10": "CIFAR10", "svhn": "SVHN"}
# the benchmark's sparsity levels (percent of the conv + linear weights removed) per structure
KEY_LEVELS = {"US": (90, 95, 99), "S": (50, 75, 90)}
# "<Name>_<AuthorYearWord>": one underscore, as the taxonomy's keys
AP_KEY = re.compile(r"^[A-Za-z0-9-]+_[A-Za-z0-9-]+$")
CARD_EPS = (8 / 255, 0.031)  # RobustBench's CIFAR budget and the Adversarial Pruning Benchmark's value
ARCHITECTURE_SOURCE = Path(__file__).with_name("export_arch.py")


def benchmark_name(model_name: str, name: str) -> str:
    """A sparta body state_dict key -> the standard definition's key (the mapping of docs/export.md)."""
    if model_name == "preact_resnet18" and name.split(".")[-2:-1] == ["shortcut"]:
        # sparta's projection shortcut is a bare Conv2d; the reference wraps it in nn.Sequential
        return name.replace(".shortcut.", ".shortcut.0.")
    return name


def benchmark_state_dict(model_name: str, body: nn.Module) -> dict[str, Tensor]:
    """The body's state_dict under the standard names; VGG convolutions get the zero bias the standard
    definition has (sparta's convolutions have none, so the outputs are unchanged)."""
    out: dict[str, Tensor] = {}
    modules = dict(body.named_modules())
    for name, t in body.state_dict().items():
        out[benchmark_name(model_name, name)] = t.detach().clone().cpu()
        owner = modules[name.rsplit(".", 1)[0]]
        if (model_name == "vgg16_bn" and isinstance(owner, nn.Conv2d) and name.endswith(".weight")
                and owner.bias is None):
            out[name[: -len("weight")] + "bias"] = torch.zeros(owner.out_channels)
    return out


def _width(module: nn.Module, name: str) -> int:
    """The output width of the layer ``module.<name>``: a convolution's channels, a linear layer's features."""
    layer = module.get_submodule(name)
    if isinstance(layer, nn.Linear):
        return layer.out_features
    assert isinstance(layer, nn.Conv2d), f"{name} is a {type(layer).__name__}, not a convolution"
    return layer.out_channels


def _body(model: nn.Module) -> nn.Module:
    """The network inside the input normalisation of a model ``build_model`` made."""
    assert isinstance(model, NormalizedModel), f"not a sparta model: {type(model).__name__}"
    return model.body


def architecture_spec(spec: dict[str, Any], body: nn.Module) -> dict[str, Any]:
    """``architecture.json``: what ``architecture.build`` needs, every width read from the (possibly
    slimmed) network itself."""
    arch: dict[str, Any] = {"name": spec["name"], "num_classes": spec["num_classes"],
                            "in_channels": spec["in_channels"], "image_size": spec["image_size"],
                            "mean": list(spec["mean"]), "std": list(spec["std"]),
                            "input_range": [0.0, 1.0]}
    if spec["name"] in ("preact_resnet18", "resnet18"):
        stages = [list(body.get_submodule(f"layer{i}").children()) for i in (1, 2, 3, 4)]  # each stage's blocks
        arch["streams"] = [_width(stage[0], "conv2") for stage in stages]
        arch["mids"] = [_width(block, "conv1") for stage in stages for block in stage]
        for stage, width in zip(stages, arch["streams"]):  # residual sums tie each stage's outputs together
            assert all(_width(block, "conv2") == width for block in stage), "uncoupled residual widths"
        assert _width(body, "conv1") == arch["streams"][0]
    else:
        arch["widths"] = [m.out_channels for m in body.get_submodule("features").children() if isinstance(m, nn.Conv2d)]
        if spec["name"] == "vgg16_bn_hydra":
            arch["hidden"] = _width(body, "classifier.0")
    arch["channel_ticket"] = bool(spec.get("channel_plan"))
    return arch


def sparsity(spec: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Any]:
    """Sparsity of the exported weights (conv and linear, ``dim >= 2``) against the full network of the
    same spec (for a channel ticket: before slimming), overall and per layer (standard names)."""
    full_spec = {k: v for k, v in spec.items() if k != "channel_plan"}
    full = {benchmark_name(spec["name"], n): p.numel() for n, p in _body(build_model(full_spec)).named_parameters()
            if p.dim() >= 2}
    layers: dict[str, dict[str, Any]] = {}
    for name, total in full.items():
        w = state[name]
        nonzero = int((w != 0).sum())
        layers[name] = {"weights": total, "kept_shape": list(w.shape), "nonzero": nonzero,
                        "sparsity": 1.0 - nonzero / total}
    total, nonzero = sum(full.values()), sum(v["nonzero"] for v in layers.values())
    return {"overall": 1.0 - nonzero / total, "weights": total, "nonzero": nonzero, "per_layer": layers}


def structure_of(ckpt: checkpoint.RunCheckpoint) -> str:
    plan, masked = bool(ckpt.model_spec.get("channel_plan")), bool(ckpt.masks)
    return "channel+unstructured" if plan and masked else "channel" if plan else "unstructured" if masked else "dense"


def run_summary(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The run's summary.json beside ``checkpoints/`` and where it was looked for."""
    where = path.resolve().parent.parent / "summary.json"
    try:
        return json.loads(where.read_text()), str(where)
    except (OSError, ValueError):
        return None, str(where)


def attack_card(path: Path, cfg, *, n_examples: int | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Clean and AutoAttack accuracy at each of ``CARD_EPS`` on the first ``n_examples`` test images."""
    aa = require_autoattack()
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data.name, cfg.data.root, val_size=cfg.data.val_size, train_subset=cfg.data.train_subset)
    test = first_images(data.test, n_examples)
    model = load_model(path, device)
    e = cfg.eval
    ref_eps = e.eps if e.eps is not None else cfg.attack.eps
    results: dict[str, Any] = {}
    clean = None
    for eps in CARD_EPS:
        log(f"AutoAttack at eps {format_eps(eps)} on {len(test)} test images")
        alpha = e.alpha * eps / ref_eps if ref_eps > 0 else e.alpha  # the config's step/eps ratio for the PGD reference
        settings = EvalSettings(eps=eps, alpha=alpha, steps=e.steps, restarts=e.restarts, norm="linf",
                                batch_size=e.batch_size, seed=cfg.seed)
        r = evaluate_robustness(model, test, settings, attack="autoattack", device=device)
        clean = r["clean_acc"]
        results[format_eps(eps)] = {"eps": eps, "robust_acc": r["robust_acc"], "pgd_robust_acc": r["pgd_robust_acc"],
                                    "per_attack": r["autoattack"]["per_attack"],
                                    "checks_passed": all(c["passed"] for c in r["checks"]),
                                    "warnings": r["warnings"]}
    return {"clean_acc": clean, "autoattack": results, "n_examples": len(test), "test_set_size": len(data.test),
            "full_test_set": len(test) == len(data.test), "skipped": None,
            "attack": f"AutoAttack standard, Linf (pyautoattack {getattr(aa, '__version__', '?')})",
            "seed": cfg.seed, "device": str(device)}


def min_norm_result(path: Path, cfg: Any, *, overrides: list[str] | tuple[str, ...], n_examples: int | None,
                    autoattack: dict[str, Any] | None, log: Callable[[str], None]) -> dict[str, Any]:
    """HO-FMN's part of a submission: ``sparta eval --attack fmn`` of the checkpoint (on the CPU, where
    secml-torch's loop runs; kept from an earlier call when its JSON beside the checkpoint has the same
    images and settings ``cfg.eval.fmn``), AutoAttack not rerun: its accuracy on the same images
    (``autoattack``: ``eps``, ``robust_acc``, ``n``) is compared with FMN's at that eps by the eval's
    own check (:func:`sparta.min_norm.autoattack_check`)."""
    wanted = cfg.eval.fmn
    kept_file = path.with_name(f"{path.stem}.eval-fmn.json")
    kept = json.loads(kept_file.read_text()) if kept_file.is_file() else None
    if kept is not None and kept.get("steps") == wanted.steps and kept.get("tuning", {}).get("trials") == \
            wanted.trials and (n_examples is None or kept.get("n") == n_examples):
        result = kept
    else:
        log(f"FMN (minimal L-inf distances, {wanted.trials} tuning trials, {wanted.steps} steps) on "
            f"{'all' if n_examples is None else n_examples} test images")
        result = evaluate_checkpoint(path, attack="fmn",
                                     overrides=[*overrides, "device=cpu", "eval.fmn.autoattack=false"],
                                     n_examples=n_examples)
    out = {"n": result["n"], "robust_acc_at": result["robust_acc_at"], "median_distance": result["median_distance"],
           "best_setting": result["best_setting"], "steps": result["steps"], "tuning": result["tuning"],
           "package": result["package"], "distances_file": result["distances_file"], "plot": result.get("plot"),
           "check": None}
    if autoattack is not None and autoattack.get("eps") is not None and autoattack["n"] == result["n"]:
        eps = autoattack["eps"]
        fmn = robust_accuracy_at([math.inf if d is None else d for d in result["distances"]], eps)
        out["robust_acc_at"] = {**out["robust_acc_at"], format_eps(eps): fmn}
        out["check"], _ = autoattack_check(fmn, autoattack["robust_acc"], result["n"], eps)
    return out


def export_checkpoint(path: str | Path, out_dir: str | Path, *, fmt: str = "benchmark", n_examples: int | None = None,
                      attack: bool = True, overrides: list[str] | tuple[str, ...] = (), ap_key: str | None = None,
                      level: int | None = None, autoattack: dict[str, Any] | None = None,
                      min_norm: bool | None = None, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Write the export folder (see the module docstring); returns the card with ``submission`` and
    ``written`` (the paths). ``autoattack``: an AutoAttack result measured elsewhere for the submission
    (``final-eval.json`` of ``sparta grid``: ``clean``, ``autoattack``, ``n``, ``eps``), used when the
    card measures none (``attack=False``). ``min_norm`` (default: as ``attack``): FMN distances for the
    submission (:func:`min_norm_result`), written as ``<model key>.pickle``."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if n_examples is not None and n_examples < 1:
        raise ConfigError(f"--n-examples must be >= 1, got {n_examples}")
    min_norm = attack if min_norm is None else min_norm
    if n_examples is not None and not (attack or min_norm):
        raise ConfigError("--n-examples limits the attack; leave it out with --no-attack")
    path = Path(path)
    ckpt = checkpoint.load(path)
    spec = ckpt.model_spec
    if spec["name"] not in SUPPORTED:
        raise ConfigError(f"--format benchmark exports {', '.join(SUPPORTED)}; this checkpoint holds a "
                          f"{spec['name']}")
    if ap_key is not None and not AP_KEY.match(ap_key):
        raise ConfigError(f"--ap-key must be <Name>_<AuthorYearWord> (letters, digits, '-', one underscore), as "
                          f"the benchmark's taxonomy keys, e.g. HYDRA_Sehwag2020Hydra; got {ap_key!r}")
    cfg = from_saved(ckpt.config, overrides) if ckpt.config is not None else None
    if cfg is None and (attack or min_norm):
        raise CheckpointError(f"checkpoint {path} has no config to find its test set; pass --no-attack")
    body = _body(load_model(path))  # masks folded in
    state = benchmark_state_dict(spec["name"], body)
    arch = architecture_spec(spec, body)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.pt", lambda f: torch.save(state, f))
    shutil.copyfile(ARCHITECTURE_SOURCE, out / "architecture.py")
    write_text_atomic(out / "architecture.json", dumps(arch))

    summary, summary_path = run_summary(path)
    training = {"source": summary_path if summary else None,
                "train_flops": summary and summary.get("train_flops"),
                "train_flops_dense": summary and summary.get("train_flops_dense"),
                "wall_time_s": summary and summary.get("wall_time_s"),
                "note": "whole run (every stage, to the last epoch), whichever checkpoint is exported" if summary else
                        f"no summary.json at {summary_path} (run unfinished or moved): training cost unknown"}
    if attack:
        evaluation = attack_card(path, cfg, n_examples=n_examples, log=log)
    else:
        evaluation = {"clean_acc": None, "autoattack": {format_eps(e): None for e in CARD_EPS}, "n_examples": None,
                      "test_set_size": None, "full_test_set": None,
                      "skipped": "--no-attack: clean and AutoAttack accuracy were not measured"}
    card = {
        "card_format": 1, "checkpoint": str(path), "epoch": ckpt.epoch, "step": ckpt.step,
        "model": spec["name"], "dataset": cfg.data.name if cfg else None, "method": cfg.method.name if cfg else None,
        "structure": structure_of(ckpt), "threat_model": "Linf", "input_range": [0.0, 1.0],
        "normalization": {"mean": arch["mean"], "std": arch["std"], "where": "architecture.json (not in model.pt)"},
        "params": sum(p.numel() for p in body.parameters()),
        "sparsity": sparsity(spec, state), **evaluation, "training": training,
    }
    write_text_atomic(out / "card.json", dumps(card))
    write_text_atomic(out / "card.md", card_markdown(card))
    submission = submission_statement(card, arch, ap_key=ap_key, level=level, measured=autoattack)
    written = ["model.pt", "architecture.py", "architecture.json", "card.json", "card.md", "submission.json"]
    if min_norm:
        aa = submission["autoattack"]
        fmn = min_norm_result(path, cfg, overrides=overrides, n_examples=n_examples, log=log,
                              autoattack=aa and {"eps": aa["eps"], "robust_acc": aa["robust_acc"],
                                                 "n": aa["n_examples"]})
        name = f"{submission['model_key'] or 'distances'}.pickle"  # the benchmark reads <model key>.pickle
        shutil.copyfile(fmn.pop("distances_file"), out / name)
        plot = fmn.pop("plot")
        if plot:
            shutil.copyfile(plot, out / "security-curve.png")
            written.append("security-curve.png")
        submission["hofmn"] = {**fmn, "distances": name}
        written.append(name)
    else:
        submission["hofmn"] = None
    write_text_atomic(out / "submission.json", dumps(submission))
    return {**card, "submission": submission, "written": [str(out / n) for n in written]}


def default_ap_key(method: str | None) -> str:
    """``<Method>_sparta``: a placeholder for the taxonomy key the benchmark assigns to a new entry."""
    name = "".join(part.capitalize() for part in (method or "dense").split("_"))
    return f"{name}_sparta"


def model_key(card: dict[str, Any], *, ap_key: str | None, level: int | None) -> tuple[str | None, str]:
    """The benchmark's ``<ap>_<R18|V16>_<CIFAR10|SVHN>_<US|S>_<sparsity>`` key and a note on how it was
    made (or why there is none). The sparsity level is ``level`` when given (a grid run's nominal level),
    else the measured weight sparsity rounded to the nearest benchmark level within 1 point."""
    dataset = KEY_DATASETS.get(card["dataset"] or "")
    structure = {"unstructured": "US", "channel": "S"}.get(card["structure"])
    if dataset is None or structure is None:
        return None, (f"no benchmark key: the benchmark has {' and '.join(KEY_DATASETS.values())} models with "
                      f"unstructured or channel sparsity; this is {card['dataset']}, {card['structure']}")
    measured = 100 * card["sparsity"]["overall"]
    if level is None:
        nearest = min(KEY_LEVELS[structure], key=lambda v: abs(v - measured))
        if abs(nearest - measured) > 1:
            return None, (f"no benchmark key: {measured:.2f}% of the weights are pruned, not within 1 point of the "
                          f"benchmark's {structure} levels {KEY_LEVELS[structure]}")
        level, how = nearest, f"level {nearest}% = the measured weight sparsity {measured:.2f}% rounded"
    else:
        how = f"level {level}% given (nominal); measured weight sparsity {measured:.2f}%"
    key = "_".join([ap_key or default_ap_key(card["method"]), SUPPORTED[card["model"]][0], dataset, structure,
                    str(level)])
    return key, how


def submission_statement(card: dict[str, Any], arch: dict[str, Any], *, ap_key: str | None, level: int | None,
                         measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the benchmark's submission issue asks of each model, from the card and the architecture."""
    key, how = model_key(card, ap_key=ap_key, level=level)
    target = SUPPORTED[card["model"]][1]
    standard = card["model"] in ("resnet18", "vgg16_bn_hydra") and not arch["channel_ticket"] and \
        arch["num_classes"] == 10 and arch["in_channels"] == 3 and (arch.get("streams") or arch["widths"])[0] == 64
    loads = {"network": target, "strict_load": standard,
             "why_not": None if standard else
             "a channel ticket is a smaller network: use architecture.py with architecture.json"
             if arch["channel_ticket"]
             else f"{card['model']} at these widths/classes is not the benchmark's base model: use architecture.py"}
    aa = card["autoattack"].get("0.031")
    if aa is not None:
        result = {"eps": 0.031, "clean_acc": card["clean_acc"], "robust_acc": aa["robust_acc"],
                  "n_examples": card["n_examples"], "source": "card.json"}
    elif measured is not None:
        result = {"eps": measured.get("eps"), "clean_acc": measured["clean"], "robust_acc": measured["autoattack"],
                  "n_examples": measured["n"], "source": "the run's final-eval.json"}
    else:
        result = None
    return {
        "model_key": key, "model_key_note": how + ("" if ap_key else "; pass --ap-key with the taxonomy key the "
                                                   "benchmark assigns to the method"),
        "state_dict": "model.pt", "loads_into": loads,
        "normalization": {"required": True, "mean": arch["mean"], "std": arch["std"],
                          "how": "inputs in [0, 1] are normalised as (x - mean) / std before the network "
                                 "(architecture.load(folder) returns the wrapped model that takes [0, 1] inputs)"},
        "autoattack": result and {"version": "standard", "norm": "Linf", **result},
        "sparsity": {"weights_pruned": card["sparsity"]["overall"], "structure": card["structure"]},
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def card_markdown(card: dict[str, Any]) -> str:
    """card.json as a short markdown page."""
    sp = card["sparsity"]
    lines = [f"# {card['model']} on {card['dataset']} ({card['method']})", "",
             "| field | value |", "|---|---|",
             f"| structure | {card['structure']} |",
             f"| sparsity (conv + linear weights) | {100 * sp['overall']:.2f}% "
             f"({sp['nonzero']:,} of {sp['weights']:,} kept) |",
             f"| threat model | {card['threat_model']}, inputs in [0, 1] |",
             f"| clean accuracy (%) | {_pct(card['clean_acc'])} |"]
    for label, r in card["autoattack"].items():
        lines.append(f"| AutoAttack accuracy at eps {label} (%) | {_pct(r and r['robust_acc'])} |")
    evaluated = card["skipped"] or f"{card['n_examples']} of {card['test_set_size']} test images"
    t = card["training"]
    flops = "n/a" if t["train_flops"] is None else f"{t['train_flops']:.3e}"
    wall = "n/a" if t["wall_time_s"] is None else f"{t['wall_time_s']:.0f}"
    lines += [f"| evaluated on | {evaluated} |", f"| training FLOPs | {flops} |",
              f"| training wall time (s) | {wall} |",
              f"| checkpoint | {card['checkpoint']} (epoch {card['epoch']}) |", "",
              "## Per-layer sparsity", "", "| layer | weights | kept | sparsity |", "|---|---|---|---|"]
    for name, layer in sp["per_layer"].items():
        lines.append(f"| {name} | {layer['weights']:,} | {layer['nonzero']:,} | {100 * layer['sparsity']:.2f}% |")
    return "\n".join(lines) + "\n"
