"""One training run from a config: data, model, optimizer, controller, the loop, the run directory.

``train(cfg)`` is what ``sparta train`` calls. It owns everything around the loop: building the
pieces, resuming from ``checkpoints/last.pt``, evaluating each epoch, keeping the best checkpoint
(selected on validation robust accuracy, never on test), and writing ``summary.json``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .config import Config, dump_yaml, load_config
from .data import DatasetSplits, first_images, load_dataset
from .data.loader import DeviceLoader
from .distributed import Distributed, resolve_device, setup
from .epoch import StageRun, end_epoch, end_step, save_checkpoint
from .errors import CheckpointError, ConfigError
from .layout import channels_last_problem
from .methods import build_recipe
from .netspec import build_model, model_spec
from .objectives import build_objective
from .precision import StepPrecision, resolve_precision
from .protocol import eval_attack
from .rundir import RunDir, TensorBoardLog
from .schedules import LrSchedule
from .signals import StopRequests
from .sparse.controllers import SparsityController
from .stages import RunContext, Stage
from .summary import summarize
from .train import SILENT, Progress, TrainState, fit


def load_model(path: str | Path, device: str | torch.device = "cpu",
               state: checkpoint.RunCheckpoint | None = None) -> nn.Module:
    """The network stored in a checkpoint, in eval mode, masks applied (pruned weights exactly 0);
    ``state``: the checkpoint at ``path`` already read (it is not read again)."""
    if state is None:
        state = checkpoint.load(path)
    model = build_model(state.model_spec)
    try:
        model.load_state_dict(state.model)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit its recorded architecture: "
                              f"{str(e).splitlines()[0]}") from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in state.masks.items():
            params[name].mul_(mask.to(params[name].dtype))
    return model.to(device).eval()


def prepare_resume(run_dir: str | Path, overrides: list[str], *, force: bool) -> Config:
    """The config of a run to resume; overrides that change it are refused unless ``force``."""
    rd = RunDir(run_dir)
    rd.require_run()
    saved = load_config(rd.config, saved=True)
    cfg = load_config(rd.config, overrides, saved=True)
    changed = changed_keys(saved.to_dict(), cfg.to_dict())
    if changed and not force:
        raise ConfigError(f"resume would change {', '.join(changed)} of {run_dir}; drop those overrides or "
                          "pass --force")
    cfg.out_dir = str(rd.path)  # the run lives where it is, whatever out_dir says
    return cfg


def changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (a key only one of them has included:
    two methods have different settings)."""
    keys = []
    for k in [*a, *(k for k in b if k not in a)]:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += changed_keys(a[k], b[k], f"{prefix}{k}.")
        elif k not in a or k not in b or a[k] != b[k]:
            keys.append(f"{prefix}{k}")
    return keys


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, progress: Progress = SILENT,
          on_epoch: Callable[[dict[str, Any]], None] = lambda record: None) -> dict[str, Any]:
    """Run (or resume) every stage of the configured method; returns the summary also written to
    summary.json. ``on_epoch`` gets each evaluated epoch's metrics record, after it was saved.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this and gets the same records and summary;
    only rank 0 writes the run directory (see ``sparta.distributed``).
    """
    # fp16 without CUDA fails here, before any work (the device type is all the rule needs)
    precision, rule = resolve_precision(cfg.train.precision, resolve_device(cfg.device))
    data = load_dataset(cfg.data.name, cfg.data.root, val_size=cfg.data.val_size, train_subset=cfg.data.train_subset)
    stages = build_recipe(cfg)
    # after the checks every rank does alike, before any collective: a bad config or missing data
    # stops each rank on its own, none waits in the process group for the others
    dist = setup(cfg)
    device = dist.device
    torch.manual_seed(cfg.seed)
    spec = model_spec(cfg, data)
    run = RunContext(build_model(spec).to(device), spec, device)
    dist.seed_ranks(cfg.seed)
    rd = RunDir(cfg.run_dir)
    ckpt = None
    if resume:
        ckpt = checkpoint.load(rd.last, map_location=device)
        run.load_state_dict(ckpt.run, ckpt.model_spec, ckpt.model)
        # records written after this checkpoint will be written again; a write cut by a kill left a temporary file
        def clean_up() -> None:
            rd.truncate_metrics(run.records)
            rd.remove_torn_writes()

        dist.on_main(clean_up)
    if not (cfg.train.precision == "auto" and "train_precision" in run.info):  # auto is decided once per run
        run.info.update(train_precision=precision, train_precision_rule=rule)
    if data.val is None:
        warnings.warn("data.val_size is 0: there is no validation set, so the best epoch is the final one",
                      stacklevel=2)
    if cfg.logging.tensorboard and dist.is_main:
        board, report = TensorBoardLog(rd.path, rd.read_metrics() if resume else []), on_epoch

        def logged(record: dict[str, Any]) -> None:
            board.add(record)
            report(record)

        on_epoch = logged
    with StopRequests() as stop:  # SIGTERM/SIGINT: save at the next step, then stop
        for index in range(ckpt.stage_index if ckpt else 0, len(stages)):
            resumed = ckpt if ckpt is not None and index == ckpt.stage_index else None
            controller = _run_stage(stages, index, run, data, rd, resumed, progress=progress, on_epoch=on_epoch,
                                    stop=stop, dist=dist, create=None if resume or index else
                                    (lambda: rd.create(dump_yaml(cfg), overwrite=overwrite)))
    if cfg.logging.tensorboard and dist.is_main:
        board.close()
    masks = controller.mask_state()
    summary = summarize(cfg, stages, run, dist.on_main(rd.read_metrics), data, masks, dist=dist,
                        on_outcomes=lambda line: dist.on_main(lambda: rd.append_outcomes(line)))
    summary.update(dist.report(run.model, masks))
    dist.on_main(lambda: rd.write_summary(summary))
    return summary


def _run_stage(stages: list[Stage], index: int, run: RunContext, data: DatasetSplits, rd: RunDir,
               ckpt: checkpoint.RunCheckpoint | None, *, progress: Progress, on_epoch: Callable[[dict[str, Any]], None],
               stop: StopRequests, create: Callable[[], None] | None, dist: Distributed) -> SparsityController:
    """Train one stage (or finish it from ``ckpt``), apply its transition to ``run``; returns its controller."""
    stage, cfg, device = stages[index], stages[index].cfg, run.device
    if ckpt is None and stage.before is not None:
        stage.before(run)
    model = run.model
    channels_last = cfg.train.channels_last
    if channels_last and (problem := channels_last_problem(model, device)) is not None:
        if index == 0:  # before the run directory exists: refused like any bad setting
            raise ConfigError(problem)
        # a transition (channel slimming) made the network narrow: this stage trains NCHW rather than crash
        warnings.warn(f"{problem}; stage {stage.name} trains in the default layout", stacklevel=3)  # train's caller
        channels_last = False
        # in place, as below; a no-op for a freshly built network. The ignore: Module.to takes memory_format
        # (documented, and it works), but torch's overloads of Module.to leave it out
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    optimizer = build_optimizer(cfg, model)
    precision = StepPrecision(run.info["train_precision"], device)
    loader = DeviceLoader(data.train, cfg.batch_size, device=device, shuffle=True, augment=cfg.data.augment,
                          seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    controller = stage.controller(cfg, run, optimizer, len(loader))
    schedule = LrSchedule(cfg.optim, steps_per_epoch=len(loader), epochs=cfg.epochs)
    objective = build_objective(cfg, len(loader))
    if create is not None:
        dist.on_main(create)  # the run directory is written only once the first stage proved buildable
    run.start_cost(cfg, ckpt.run["cost"] if ckpt is not None else None)
    assert run.cost is not None  # start_cost set it
    state = TrainState()
    if ckpt is not None:
        model.load_state_dict(ckpt.model)  # again: building the controller applied its initial masks
        optimizer.load_state_dict(ckpt.optimizer)
        controller.load_state_dict(ckpt.controller)
        precision.load_state_dict(ckpt.precision)  # the fp16 loss scale ({} in older checkpoints)
        state = TrainState(**ckpt.train_state)
        dist.set_rng_state(ckpt.rng, seed=cfg.seed, step=state.step)
        dist.restore_epoch_sums_(state, ckpt.epoch_sums)  # a mid-epoch checkpoint: this rank's share
    if controller.masks is not None:  # initial random masks, tickets, resumes
        dist.sync_masks_(controller.masks, f"the start of stage {stage.name}")
    if channels_last:  # in place (param.data): optimizer, controller and masks keep their tensors
        # 4-d weights only; evaluation uses the same layout. The ignore: Module.to takes memory_format
        # (documented, and it works), but torch's overloads of Module.to leave it out
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # torch.compile wraps the module without copying it: controller, optimizer and checkpoints keep the
    # plain model (parameter names without an `_orig_mod.` prefix); evaluation runs it uncompiled.
    # DDP (which broadcasts rank 0's weights) goes around the compiled module, so the attack, run on
    # the module inside DDP, is compiled too.
    compiled = torch.compile(model) if cfg.train.compile else model
    assert isinstance(compiled, nn.Module)  # torch.compile of a module is an OptimizedModule around it
    train_model = dist.wrap(compiled, sync_batchnorm=cfg.distributed.sync_batchnorm)

    s = StageRun(stages, index, run, optimizer, controller, precision, state, rd, dist, stop, eval_attack(cfg),
                 first_images(data.val, cfg.eval.val_subset), first_images(data.test, cfg.eval.test_subset))
    if not controller.done:  # a resumed stage may have met its stop condition already
        # (a stage resumed after its last epoch trains no further, unless its epochs were raised)
        fit(train_model, optimizer, dist.watch(controller), loader, schedule, objective,
            attack_bn_mode=cfg.attack.bn_mode, epochs=cfg.epochs, state=state,
            end_epoch=lambda stats: end_epoch(s, stats, on_epoch), end_step=lambda _: end_step(s), cost=run.cost,
            progress=progress, dist=dist, precision=precision)
    run.record_stage({"name": stage.name, "epochs": state.epoch, "steps": state.step,
                      "wall_time_s": state.wall_time_s, "train_flops": run.cost.stage_total})
    save_checkpoint(s, rd.last)  # the stage's cost is in; a kill during the transition below repeats it from here
    if stage.after is not None:
        stage.after(run, controller)
    return controller


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov)
    make = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return make(model.parameters(), lr=o.lr, betas=(o.momentum, 0.999), weight_decay=o.weight_decay)
