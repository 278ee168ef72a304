"""``sparta export``: a checkpoint as a plain, sparta-free model folder plus its result card.

``export_checkpoint(ckpt, out_dir)`` writes

- ``model.pt``: a plain state_dict (masks folded in: pruned weights are exactly 0) whose names follow
  the standard CIFAR PreActResNet-18 (Rice et al. 2020) / VGG-16 (kuangliu) definitions, loadable with
  ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``; see ``docs/export.md`` for the
  name mapping;
- ``architecture.py``: those definitions in plain torch (a copy of ``sparta/export_arch.py``);
- ``architecture.json``: name, classes, input channels, every layer's width (a channel ticket is the
  smaller dense network) and the input normalisation (mean/std);
- ``card.json`` + ``card.md``: clean and AutoAttack (standard, L∞) accuracy at eps 8/255 and 0.031,
  sparsity overall and per layer, structure, training FLOPs and wall time (from the run's
  ``summary.json``), model, dataset, method.

Normalisation is exported as separate mean/std, not folded into the first convolution: the first
convolution zero-pads its input, and a folded convolution would read that padding as pixel 0 where
the trained network read it as the normalised 0 (the mean pixel), so border outputs would change.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import checkpoint
from .config import from_saved
from .errors import CheckpointError, ConfigError
from .fmt import eps as format_eps
from .netspec import build_model
from .rundir import dumps, write_text_atomic

FORMATS = ("benchmark",)
SUPPORTED = ("preact_resnet18", "vgg16_bn")
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
        if model_name == "vgg16_bn" and isinstance(owner, nn.Conv2d) and name.endswith(".weight") and owner.bias is None:
            out[name[: -len("weight")] + "bias"] = torch.zeros(owner.out_channels)
    return out


def architecture_spec(spec: dict[str, Any], body: nn.Module) -> dict[str, Any]:
    """``architecture.json``: what ``architecture.build`` needs, every width read from the (possibly
    slimmed) network itself."""
    arch: dict[str, Any] = {"name": spec["name"], "num_classes": spec["num_classes"], "in_channels": spec["in_channels"],
                            "image_size": spec["image_size"], "mean": list(spec["mean"]), "std": list(spec["std"]),
                            "input_range": [0.0, 1.0]}
    if spec["name"] == "preact_resnet18":
        stages = [body.layer1, body.layer2, body.layer3, body.layer4]
        arch["streams"] = [stage[0].conv2.out_channels for stage in stages]
        arch["mids"] = [block.conv1.out_channels for stage in stages for block in stage]
        for stage, width in zip(stages, arch["streams"]):  # residual sums tie each stage's outputs together
            assert all(block.conv2.out_channels == width for block in stage), "uncoupled residual widths"
        assert body.conv1.out_channels == arch["streams"][0]
    else:
        arch["widths"] = [m.out_channels for m in body.features if isinstance(m, nn.Conv2d)]
    arch["channel_ticket"] = bool(spec.get("channel_plan"))
    return arch


def sparsity(spec: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Any]:
    """Sparsity of the exported weights (conv and linear, ``dim >= 2``) against the full network of the
    same spec (for a channel ticket: before slimming), overall and per layer (standard names)."""
    full_spec = {k: v for k, v in spec.items() if k != "channel_plan"}
    full = {benchmark_name(spec["name"], n): p.numel() for n, p in build_model(full_spec).body.named_parameters()
            if p.dim() >= 2}
    layers = {}
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
    from .data import load_dataset
    from .distributed import resolve_device
    from .experiment import _first, load_model
    from .robustness import evaluate_robustness, require_autoattack

    aa = require_autoattack()
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data.name, cfg.data.root, val_size=cfg.data.val_size, train_subset=cfg.data.train_subset)
    test = _first(data.test, n_examples)
    model = load_model(path, device)
    e = cfg.eval
    ref_eps = e.eps if e.eps is not None else cfg.attack.eps
    results: dict[str, Any] = {}
    clean = None
    for eps in CARD_EPS:
        log(f"AutoAttack at eps {format_eps(eps)} on {len(test)} test images")
        alpha = e.alpha * eps / ref_eps if ref_eps > 0 else e.alpha  # the config's step/eps ratio for the PGD reference
        r = evaluate_robustness(model, test, attack="autoattack", eps=eps, alpha=alpha, steps=e.steps,
                                restarts=e.restarts, norm="linf", batch_size=e.batch_size, device=device, seed=cfg.seed)
        clean = r["clean_acc"]
        results[format_eps(eps)] = {"eps": eps, "robust_acc": r["robust_acc"], "pgd_robust_acc": r["pgd_robust_acc"],
                                    "per_attack": r["autoattack"]["per_attack"],
                                    "checks_passed": all(c["passed"] for c in r["checks"]),
                                    "warnings": r["warnings"]}
    return {"clean_acc": clean, "autoattack": results, "n_examples": len(test), "test_set_size": len(data.test),
            "full_test_set": len(test) == len(data.test), "skipped": None,
            "attack": f"AutoAttack standard, Linf (pyautoattack {getattr(aa, '__version__', '?')})",
            "seed": cfg.seed, "device": str(device)}


def export_checkpoint(path: str | Path, out_dir: str | Path, *, fmt: str = "benchmark", n_examples: int | None = None,
                      attack: bool = True, overrides: list[str] | tuple[str, ...] = (),
                      log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Write the export folder (see the module docstring); returns the card with ``written`` (the paths)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if n_examples is not None and n_examples < 1:
        raise ConfigError(f"--n-examples must be >= 1, got {n_examples}")
    if n_examples is not None and not attack:
        raise ConfigError("--n-examples limits the attack; leave it out with --no-attack")
    path = Path(path)
    ckpt = checkpoint.load(path)
    spec = ckpt.model_spec
    if spec["name"] not in SUPPORTED:
        raise ConfigError(f"--format benchmark exports {' and '.join(SUPPORTED)}; this checkpoint holds a "
                          f"{spec['name']}")
    cfg = from_saved(ckpt.config, overrides) if ckpt.config is not None else None
    if cfg is None and attack:
        raise CheckpointError(f"checkpoint {path} has no config to find its test set; pass --no-attack")
    from .experiment import load_model

    model = load_model(path)  # masks folded in
    state = benchmark_state_dict(spec["name"], model.body)
    arch = architecture_spec(spec, model.body)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(out / "model.pt", lambda f: torch.save(state, f))
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
        "params": sum(p.numel() for p in model.body.parameters()),
        "sparsity": sparsity(spec, state), **evaluation, "training": training,
    }
    write_text_atomic(out / "card.json", dumps(card))
    write_text_atomic(out / "card.md", card_markdown(card))
    return {**card, "written": [str(out / n) for n in ("model.pt", "architecture.py", "architecture.json", "card.json",
                                                       "card.md")]}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def card_markdown(card: dict[str, Any]) -> str:
    """card.json as a short markdown page."""
    sp = card["sparsity"]
    lines = [f"# {card['model']} on {card['dataset']} ({card['method']})", "",
             "| field | value |", "|---|---|",
             f"| structure | {card['structure']} |",
             f"| sparsity (conv + linear weights) | {100 * sp['overall']:.2f}% ({sp['nonzero']:,} of {sp['weights']:,} kept) |",
             f"| threat model | {card['threat_model']}, inputs in [0, 1] |",
             f"| clean accuracy (%) | {_pct(card['clean_acc'])} |"]
    for label, r in card["autoattack"].items():
        lines.append(f"| AutoAttack accuracy at eps {label} (%) | {_pct(r and r['robust_acc'])} |")
    evaluated = card["skipped"] or f"{card['n_examples']} of {card['test_set_size']} test images"
    t = card["training"]
    flops = "n/a" if t["train_flops"] is None else f"{t['train_flops']:.3e}"
    wall = "n/a" if t["wall_time_s"] is None else f"{t['wall_time_s']:.0f}"
    lines += [f"| evaluated on | {evaluated} |", f"| training FLOPs | {flops} |", f"| training wall time (s) | {wall} |",
              f"| checkpoint | {card['checkpoint']} (epoch {card['epoch']}) |", "",
              "## Per-layer sparsity", "", "| layer | weights | kept | sparsity |", "|---|---|---|---|"]
    for name, layer in sp["per_layer"].items():
        lines.append(f"| {name} | {layer['weights']:,} | {layer['nonzero']:,} | {100 * layer['sparsity']:.2f}% |")
    return "\n".join(lines) + "\n"
