"""``summary.json``: the final numbers of a run, its robust generalization gap and its training cost."""
from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from . import outcomes
from .config import Config
from .data.base import DatasetSplits
from .distributed import Distributed
from .evaluate import evaluate
from .flops import (
    attack_full_backward_flops,
    attack_steps_of,
    dense_training_flops,
    forward_flops_by_layer,
    inference_flops,
    mask_densities,
    paper_table_flops,
    savings,
)
from .netspec import build_model, input_shape
from .protocol import best_index, eval_attack, eval_protocol
from .stages import RunContext, Stage


def summarize(cfg: Config, stages: list[Stage], run: RunContext, records: list[dict[str, Any]],
              data: DatasetSplits, masks: dict[str, torch.Tensor], *, dist: Distributed,
              on_outcomes: Callable[[dict[str, Any]], None] = lambda line: None) -> dict[str, Any]:
    """Final numbers of the last stage (the one that produces the model); accuracies in percent.

    best = the first epoch with the highest validation robust accuracy (the final epoch when there
    is no validation split); robust_overfitting = RA_best - RA_final (test); robust_gap = RA on the
    first ``eval.gap_subset`` training images (eval mode, no augmentation) - test RA, at the end.
    ``on_outcomes`` gets the ``outcomes.record`` of those training images (split "gap", the final
    stage and epoch); called on every rank.
    """
    final_cfg = stages[-1].cfg
    mine = [r for r in records if r["stage"] == stages[-1].name]
    final = mine[-1]
    with_val = [r for r in mine if r.get("val_robust_acc") is not None]
    best = mine[best_index(mine)]  # the rule that picks checkpoints/best.pt
    summary = {
        "name": cfg.name, "method": cfg.method.name, "dataset": cfg.data.name, "model": cfg.model.name,
        "seed": cfg.seed,
        "sa_best": best["test_clean_acc"], "ra_best": best["test_robust_acc"],
        "sa_final": final["test_clean_acc"], "ra_final": final["test_robust_acc"],
        "robust_overfitting": best["test_robust_acc"] - final["test_robust_acc"],
        "sa_overfitting": best["test_clean_acc"] - final["test_clean_acc"],
        "best_epoch": best["epoch"],
        "best_selected_on": "val_robust_acc" if with_val else "final epoch (no validation set)",
        "epochs": final["epoch"], "steps": final["step"], "wall_time_s": run.wall_time_s(),
        "stages": run.stages,
        **run.info,
    }
    n = final_cfg.eval.gap_subset
    if n is not None:
        subset = data.train.subset(0, min(n, len(data.train)))
        g = evaluate(run.model, subset, eval_attack(final_cfg), batch_size=final_cfg.eval.batch_size, device=run.device,
                     dist=dist, precision=final_cfg.eval.precision, outcomes=True)
        on_outcomes(outcomes.record(g["outcomes"], stage=stages[-1].name, epoch=final["epoch"], split="gap"))
        summary.update(gap_subset=g["n"], train_clean_acc=g["clean_acc"], train_robust_acc=g["robust_acc"],
                       robust_gap=g["robust_acc"] - final["test_robust_acc"],
                       clean_gap=g["clean_acc"] - final["test_clean_acc"])
    summary.update(training_cost(run, masks, final_cfg, train_images=len(data.train)))
    summary.update(
        density_final=final.get("density", 1.0),
        layer_densities_final={name: mask.float().mean().item() for name, mask in masks.items()},
        params=sum(p.numel() for p in run.model.parameters()),
        eval_protocol=eval_protocol(final_cfg), train_attack=asdict(final_cfg.attack),
        device=str(run.device), torch=str(torch.__version__), python=platform.python_version())
    return summary


def training_cost(run: RunContext, masks: dict[str, torch.Tensor], cfg: Config, *, train_images: int) -> dict[str, Any]:
    """FLOPs of the run (see ``sparta.flops`` for every formula) against the dense model of the same
    architecture (the full network, before any channel slimming) trained for the same steps.

    ``cfg``: the final stage's config; ``train_images``: training images per epoch.
    ``train_flops_paper_table`` is the formula of Chen et al. 2022's training-FLOPs columns, epochs x
    ``train_images`` x (3k + 3) x the final network's inference FLOPs for the final stage, plus each
    earlier stage (Robust Bird's search, a boosting finder: the dense network) as its images x (3k + 3)
    x the dense inference FLOPs, as the paper's table includes Robust Bird's search stage. None for
    TRADES (the formula is PGD-AT's).
    """
    dense_spec = {k: v for k, v in run.spec.items() if k != "channel_plan"}
    dense = forward_flops_by_layer(build_model(dense_spec), input_shape(dense_spec))
    final = forward_flops_by_layer(run.model, input_shape(run.spec))
    cost = run.cost
    assert cost is not None, "the run's FLOPs meter is set when its first stage starts"  # RunContext.start_cost
    stages = cost.state_dict()["stages"]
    dense_total = sum(dense_training_flops(dense, steps_images=s["images"], attack_steps=s["attack_steps"],
                                           objective=s["objective"]) for s in stages)
    final_f = inference_flops(final, mask_densities(masks) if masks else None)  # the slim network for a channel ticket
    epochs = int(run.stages[-1]["epochs"])  # the final stage's (recorded when it finished)
    table = paper_table_flops(epochs, train_images, final_f, attack_steps_of(cfg), cfg.objective.name)
    for stage in stages[:-1]:  # an earlier stage (Robust Bird's search, a finder) trains the dense network
        earlier = paper_table_flops(1, int(stage["images"]), dense.total, int(stage["attack_steps"]),
                                    stage["objective"])
        table = None if table is None or earlier is None else table + earlier
    return {"train_flops": cost.total, "train_flops_dense": dense_total,
            "train_flops_saving": savings(cost.total, dense_total),
            "train_flops_attack_full_backward": attack_full_backward_flops(stages),
            "train_flops_paper_table": table,
            "inference_flops": final_f,
            "inference_flops_dense": dense.total,
            "flops_convention": "2 FLOPs per multiply-add; attack step = forward + input-only backward (2F), "
                                "training step = forward + full backward (3F), at the densities in force, every stage; "
                                "train_flops_attack_full_backward: the same with every attack step as 3F; "
                                "train_flops_paper_table: final stage epochs x training images x (3k+3) x final "
                                "inference FLOPs, plus earlier stages' images x (3k+3) x dense inference FLOPs "
                                "(null for TRADES); the same at every train.precision "
                                f"(this run: {run.info['train_precision']})"}
