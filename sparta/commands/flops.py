"""``sparta flops``: the FLOPs report of a YAML config or a checkpoint, as plain data and as text.

The counting is :mod:`sparta.flops` (its module docstring gives the conventions); this module builds the
network a config or checkpoint describes, picks its layer densities and puts the numbers together.
A config needs no data on disk for a dataset with declared facts (``sparta.data.DATASET_FACTS``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .. import checkpoint, fmt
from ..config import from_saved, load_config
from ..data import DATASET_FACTS, load_dataset, split_sizes
from ..errors import CheckpointError, SpartaError
from ..flops import (
    attack_steps_of,
    forward_flops_by_layer,
    inference_flops,
    mask_densities,
    paper_table_flops,
    savings,
    step_multiplier,
)
from ..method_config import StagePlan
from ..netspec import build_model
from ..sparse.masks import MaskSet

__all__ = ["dataset_facts", "flops_report", "format_report", "print_flops"]


def dataset_facts(cfg: Any) -> tuple[int, int, int, int, str]:
    """(in_channels, image_size, num_classes, training images, how known) of the config's dataset:
    the official release's facts for a dataset whose reader declared them (no data read), else the
    dataset itself, read from ``data.root``."""
    if cfg.data.name in DATASET_FACTS:
        f = DATASET_FACTS.get(cfg.data.name)
        val_size = cfg.data.val_size if cfg.data.val_size is not None else f.default_val_size
        _, n_train = split_sizes(cfg.data.name, f.train_images, val_size, cfg.data.train_subset)
        return f.in_channels, f.image_size, f.num_classes, n_train, f"official {cfg.data.name} release sizes"
    data = load_dataset(cfg.data.name, cfg.data.root, val_size=cfg.data.val_size, train_subset=cfg.data.train_subset)
    return data.in_channels, data.image_size, data.num_classes, len(data.train), f"{cfg.data.name} read from data.root"


def _config_densities(cfg: Any, model: nn.Module) -> tuple[dict[str, float] | None, str]:
    m = cfg.method
    planned = m.planned_masks()  # what the method's class says its masks are before training
    if planned == "none":
        return None, f"dense (method {m.name})"
    if planned == "channels":
        return None, ("dense: a channel ticket is a smaller network only known once drawn; "
                      "run `sparta flops` on its checkpoint")
    # a ticket's layer densities are only known once drawn: IGQ's stand in for them
    distribution = getattr(m, "distribution", "igq")
    masks = MaskSet.random(model, m.density, distribution, seed=0, exclude=m.exclude)
    if planned == "initial":
        what = f"initial mask of {m.name}: {distribution} layer densities at density {m.density:g}"
    else:
        what = (f"estimate for {m.name}: the ticket's layer densities are only known once drawn; "
                f"shown: {distribution} layer densities at density {m.density:g}")
    return mask_densities(masks), what


def _earlier_stages_note(stages: list[StagePlan]) -> str:
    """What the run estimates leave out: every stage before the last, with its planned epochs."""
    if len(stages) == 1:
        return ""
    earlier = ", ".join(f"{s.name} ({'at most ' if s.capped else ''}{s.epochs} epochs)" for s in stages[:-1])
    return f"the run estimates cover the final stage ({stages[-1].name}) only; the earlier stages are extra: {earlier}"


def flops_report(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Everything ``sparta flops`` prints, as plain data, for a YAML config or a checkpoint.

    Config: the model is built as ``sparta.experiment`` builds it, with the dataset's shape from the
    official release facts in ``sparta.data.DATASET_FACTS`` (no data is read; other datasets are read from
    ``data.root``); sparse methods show their initial random mask (exact for static / Flying Bird(+),
    an estimate for ticket methods). Checkpoint: its ``model_spec`` (a slimmed channel ticket is
    rebuilt small) and its ``masks``; the config (for attack, objective and epochs) is the
    checkpoint's, with ``overrides`` applied. The run estimates are for the final stage (an
    after-training config: ``method.finetune_epochs``).
    """
    path = Path(source)
    if not path.exists():
        raise SpartaError(f"{path} does not exist; give a YAML config (see configs/) or a checkpoint (.pt)")
    if path.is_dir():
        raise SpartaError(f"{path} is a directory; give a YAML config or a checkpoint file "
                          f"(e.g. {path}/checkpoints/last.pt)")
    if path.suffix in (".yaml", ".yml"):
        cfg = load_config(path, overrides)
        c, size, classes, train_images, shapes_from = dataset_facts(cfg)
        spec: dict[str, Any] = {"name": cfg.model.name, "kwargs": cfg.model.kwargs(), "num_classes": classes,
                                "in_channels": c, "image_size": size,
                                "mean": [0.5] * c, "std": [0.5] * c}  # statistics do not change FLOPs
        model = build_model(spec)
        densities, densities_from = _config_densities(cfg, model)
        kind = "config"
    else:
        state = checkpoint.load(path)
        if not isinstance(state.config, dict):
            raise CheckpointError(f"{path} holds no config; cannot tell its attack and schedule")
        cfg = from_saved(state.config, overrides)
        spec = state.model_spec
        model = build_model(spec)
        c, size = spec["in_channels"], spec["image_size"]
        masks = state.masks
        densities = {name: float(m.float().mean()) for name, m in masks.items()} or None
        densities_from = "checkpoint masks" if masks else "dense (checkpoint has no masks)"
        if spec.get("channel_plan"):
            densities_from += "; slimmed channel ticket counted at its physical size"
        train_images, shapes_from = dataset_facts(cfg)[3], "checkpoint model_spec"
        kind = "checkpoint"
    layer_flops = forward_flops_by_layer(model, (c, size, size))
    try:
        inference_flops(layer_flops, densities)
    except ValueError as e:
        raise CheckpointError(f"{path}: masks do not fit the model ({e})") from None
    k, objective = attack_steps_of(cfg), cfg.objective.name
    dense_f, sparse_f = inference_flops(layer_flops), inference_flops(layer_flops, densities)
    mult = step_multiplier(k, objective)
    layers = [{"name": n, "dense": f, "density": (densities or {}).get(n, 1.0),
               "effective": f * (densities or {}).get(n, 1.0)} for n, f in layer_flops.per_weight.items()]
    stages = cfg.method.stages(cfg)  # the method's stages as its class plans them
    cfg.epochs = stages[-1].epochs  # the final stage's (after training: method.finetune_epochs)

    return {
        "source": str(path), "kind": kind, "model": spec["name"], "input_shape": [c, size, size],
        "num_classes": spec["num_classes"], "shapes_from": shapes_from, "densities_from": densities_from,
        "layers": layers, "other": layer_flops.other,
        "inference_flops_dense": dense_f, "inference_flops": sparse_f,
        "attack": cfg.attack.name, "attack_steps": k, "objective": objective, "step_multiplier": mult,
        "step_flops_per_image_dense": mult * dense_f, "step_flops_per_image": mult * sparse_f,
        "epochs": cfg.epochs, "train_images": train_images,
        "run_flops_dense": cfg.epochs * train_images * mult * dense_f,
        "run_flops": cfg.epochs * train_images * mult * sparse_f,
        "paper_table_run_flops_dense": paper_table_flops(cfg.epochs, train_images, dense_f, k, objective),
        "paper_table_run_flops": paper_table_flops(cfg.epochs, train_images, sparse_f, k, objective),
        "note": _earlier_stages_note(stages),
    }


def _si(x: float) -> str:
    return fmt.flops(x, ".3f", unit="FLOPs", unscaled=".0f")  # "1.111 GFLOPs", "500 FLOPs"


def format_report(r: dict[str, Any]) -> str:
    """The text ``sparta flops`` prints for a :func:`flops_report` result."""
    c, h, w = r["input_shape"]
    width = max([len("other (no conv/linear weight)")] + [len(layer["name"]) for layer in r["layers"]])
    lines = [f"{r['kind']} {r['source']}: {r['model']}, input {c}x{h}x{w}, {r['num_classes']} classes "
             f"({r['shapes_from']})",
             f"densities: {r['densities_from']}",
             "FLOPs per image, 2 FLOPs per multiply-add (torch.utils.flop_counter), sparse = dense x layer density",
             "",
             f"{'layer':<{width}}  {'dense MFLOPs':>12}  {'density':>7}  {'effective MFLOPs':>16}"]
    lines.append("-" * len(lines[-1]))
    for layer in r["layers"]:
        lines.append(f"{layer['name']:<{width}}  {layer['dense'] / 1e6:>12.3f}  {layer['density']:>7.4f}  "
                     f"{layer['effective'] / 1e6:>16.3f}")
    lines.append(f"{'other (no conv/linear weight)':<{width}}  {r['other'] / 1e6:>12.3f}  {'':>7}  "
                 f"{r['other'] / 1e6:>16.3f}")
    dense, sparse = r["inference_flops_dense"], r["inference_flops"]
    lines.append(f"{'total':<{width}}  {dense / 1e6:>12.3f}  {sparse / dense if dense else 1.0:>7.4f}  "
                 f"{sparse / 1e6:>16.3f}")
    k, obj, mult = r["attack_steps"], r["objective"], r["step_multiplier"]
    formula = f"2k+3 = {mult}" if obj == "ce" else f"2k+7 = {mult}"
    lines += [
        "",
        f"inference per image:     dense {_si(dense)}   sparse {_si(sparse)}"
        + (f"   ({fmt.fraction(savings(sparse, dense), '.1f')} saved)" if dense else ""),
        f"training step per image: dense {_si(mult * dense)}   sparse {_si(mult * sparse)}   "
        f"(attack {r['attack']}, k={k} steps, objective {obj}: {formula} x F; "
        "each attack step = forward + input-only backward)",
        f"full run, this count:    dense {_si(r['run_flops_dense'])}   sparse {_si(r['run_flops'])}   "
        f"({r['epochs']} epochs x {r['train_images']} training images x {mult} x F, density held constant)",
    ]
    if r["paper_table_run_flops"] is None:
        lines.append(f"full run, paper table formula (epochs x images x (3k+3) x F): not given for objective {obj} "
                     "(the formula is for PGD-AT)")
    else:
        lines.append(f"full run, paper table formula (epochs x images x (3k+3) = {3 * k + 3} x F of the final "
                     "network): "
                     f"dense {_si(r['paper_table_run_flops_dense'])}   sparse {_si(r['paper_table_run_flops'])}")
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    return "\n".join(lines)


def print_flops(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """``sparta flops``: print the per-layer table, inference and training FLOPs of ``source``."""
    print(format_report(flops_report(source, overrides)))
