"""Each training method as a short recipe: a list of stages and the transitions between them.

``METHODS`` maps ``method.name`` to ``recipe(cfg) -> list[Stage]``: one-stage methods (dense, static,
Flying Bird(+)), ticket methods (Robust Bird, boosting tickets) and after-training methods (one-shot
magnitude pruning, HYDRA: dense pretraining or a ``pretrained`` checkpoint, prune, fine-tune). The
loop never knows which method it runs; the controllers (``sparse.controllers``) and transitions here
hold all of it.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from .config import Config
from .errors import ConfigError
from .method_config import (
    AfterTrainingConfig,
    BoostingTicketConfig,
    FlyingBirdConfig,
    FlyingBirdPlusConfig,
    HydraConfig,
    MagnitudeConfig,
    RandomMaskConfig,
    RobustBirdConfig,
    SparseConfig,
    method_as,
)
from .netspec import build_model, example_input
from .pretrained import load_pretrained
from .registry import Registry
from .sparse.channels import apply_plan, batchnorm_modules, bn_channel_masks, slim
from .sparse.controllers import AdaptiveDensity, Dense, DynamicSparse, SparsityController, Static
from .sparse.early_bird import EarlyBirdSearch
from .sparse.hydra import HydraScores
from .sparse.masks import MaskSet
from .sparse.select import prunable_parameters
from .sparse.tickets import (
    global_magnitude_masks,
    iterative_densities,
    layer_counts,
    layer_normalized_masks,
    layer_top_k_masks,
    reinit_,
    rewind_model_,
)
from .stages import RunContext, Stage

METHODS: Registry[Callable[[Config], list[Stage]]] = Registry("method")


def build_recipe(cfg: Config) -> list[Stage]:
    return METHODS.get(cfg.method.name)(cfg)


# ------------------------------------------------------------------ one-stage methods


def _dense(cfg: Config, run: RunContext, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> SparsityController:
    return Dense()


def _random_masks(cfg: Config, run: RunContext) -> MaskSet:
    m = method_as(cfg, RandomMaskConfig)
    return MaskSet.random(run.model, m.density, m.distribution, seed=cfg.seed, exclude=m.exclude)


def _cadence(epochs: float, steps_per_epoch: int) -> int:
    """A topology-update period given in epochs, in iterations (at least 1)."""
    return max(1, round(epochs * steps_per_epoch))


def _dynamic_args(cfg: Config, steps_per_epoch: int) -> dict[str, Any]:
    m = method_as(cfg, FlyingBirdConfig)
    if m.update_every_epochs is not None:  # cadence in epochs: the iteration settings do not apply
        early = _cadence(m.update_every_epochs, steps_per_epoch)
        late = _cadence(m.update_every_late_epochs, steps_per_epoch) if m.update_every_late_epochs else None
    else:
        assert m.update_every is not None  # FlyingBirdConfig.check: one of the two cadences is set
        early, late = m.update_every, m.update_every_late
    return dict(total_steps=cfg.epochs * steps_per_epoch, update_every=early, update_every_late=late,
                late_from_step=(cfg.epochs // 2) * steps_per_epoch,
                drop_fraction=m.drop_fraction, drop_fraction_final=m.drop_fraction_final,
                growth=m.growth, regrowth=m.regrowth, seed=cfg.seed)


def _static(cfg: Config, run: RunContext, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> SparsityController:
    return Static(run.model, optimizer, _random_masks(cfg, run))


def _flying_bird(cfg: Config, run: RunContext, optimizer: torch.optim.Optimizer,
                 steps_per_epoch: int) -> SparsityController:
    return DynamicSparse(run.model, optimizer, _random_masks(cfg, run), **_dynamic_args(cfg, steps_per_epoch))


def _flying_bird_plus(cfg: Config, run: RunContext, optimizer: torch.optim.Optimizer,
                      steps_per_epoch: int) -> SparsityController:
    m = method_as(cfg, FlyingBirdPlusConfig)
    return AdaptiveDensity(run.model, optimizer, _random_masks(cfg, run), steps_per_epoch=steps_per_epoch,
                           adapt_from_epoch=m.adapt_from_epoch,
                           window=m.window, threshold=m.threshold, extra_prune_fraction=m.extra_prune_fraction,
                           extra_grow_fraction=m.extra_grow_fraction, window_val_images=m.window_val_subset,
                           **_dynamic_args(cfg, steps_per_epoch))


def _one_stage(builder: Callable[..., SparsityController], doc: str) -> Callable[[Config], list[Stage]]:
    def recipe(cfg: Config) -> list[Stage]:
        return [Stage("train", cfg, builder)]

    recipe.__doc__ = doc
    return recipe


METHODS.register("dense")(_one_stage(_dense, "Dense PGD adversarial training (Madry et al. 2018; Rice et al. 2020)."))
METHODS.register("static")(_one_stage(
    _static, "Random static sparsity at method.density (method.distribution layer densities)."))
METHODS.register("flying_bird")(_one_stage(
    _flying_bird, "Flying Bird (Chen et al. 2022): dynamic sparse adversarial training at a fixed density."))
METHODS.register("flying_bird_plus")(_one_stage(
    _flying_bird_plus, "Flying Bird+ (Chen et al. 2022): Flying Bird whose density reacts to robust overfitting."))


# ------------------------------------------------------------------ ticket methods: shared pieces


def search_config(cfg: Config, *, epochs: int, attack: Literal["pgd", "fgsm", "none"], lr: float,
                  milestones: Sequence[float] = ()) -> Config:
    """The config of a cheap first stage: ``lr`` for ``epochs`` epochs under ``attack``, constant, or
    multiplied by ``optim.gamma`` at each of ``milestones`` (epochs of this stage), without warm-up.

    FGSM here is the boosting-ticket finder's (eps = step = attack.eps, no random start); PGD is
    the run's own training attack; none is clean training.
    """
    stage = copy.deepcopy(cfg)
    stage.epochs = epochs
    stage.optim.lr, stage.optim.warmup_epochs = lr, 0.0
    stage.optim.schedule = "multistep" if milestones else "constant"
    stage.optim.milestones = [float(x) for x in milestones] if milestones else stage.optim.milestones
    stage.attack.name = attack
    if attack == "fgsm":
        stage.attack.alpha, stage.attack.random_start = cfg.attack.eps, False
    return stage


def _save_initial_weights(run: RunContext) -> None:
    """Keep the initialisation (every parameter and buffer) for rewinding."""
    run.carry.initial = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}


def _ticket_controller(cfg: Config, run: RunContext, optimizer: torch.optim.Optimizer,
                       steps_per_epoch: int) -> SparsityController:
    """Fixed masks drawn by the previous stage (``run.carry.ticket``)."""
    params = prunable_parameters(run.model, method_as(cfg, SparseConfig).exclude)
    assert run.carry.ticket is not None, "no ticket: the previous stage's transition draws it"
    return Static(run.model, optimizer, MaskSet(params, run.carry.ticket))


# ------------------------------------------------------------------ Robust Bird


@METHODS.register("robust_bird")
def robust_bird(cfg: Config) -> list[Stage]:
    """Robust Bird (Chen et al. 2022): a cheap search stage until the early-bird ticket (You et al.
    2020) appears, then adversarial training of the ticket with a fresh optimizer and schedule.

    Unstructured: prune globally by magnitude over conv + linear weights to ``method.density``.
    Channel: remove the BN channels with the smallest |gamma| (global threshold), giving a
    physically smaller dense network (dependency-aware, through torch-pruning); the search adds
    network slimming's L1 penalty on the gammas (``method.bn_l1``, default 1e-4 for channels).

    The search's lr is ``search_lr`` (0.1), constant or decayed by ``optim.gamma`` at
    ``search_milestones``; the mask is compared after every epoch or every ``eb_every_steps`` steps,
    never drawn before ``min_search_epochs``. ``run.info`` (hence summary.json) gets ``eb_epoch``,
    ``eb_step``, ``search_ended_by`` ("early_bird" or "cap": ``max_search_epochs`` ran out) and
    ``ticket_weights``.
    """
    m = method_as(cfg, RobustBirdConfig)
    search = search_config(cfg, epochs=m.max_search_epochs, attack=m.search_attack, lr=m.search_lr,
                           milestones=m.search_milestones)

    def searcher(stage_cfg: Config, run: RunContext, optimizer, steps_per_epoch: int) -> SparsityController:
        if m.pruning == "channel" and not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
                                              for mod in run.model.modules()):
            raise ConfigError(f"method.pruning=channel scores channels by BatchNorm gamma, and {cfg.model.name} has "
                              "no BatchNorm: use preact_resnet18, resnet18, vgg16_bn or wide_resnet")
        return EarlyBirdSearch(run.model, density=m.density, kind=m.pruning, window=m.eb_window,
                               threshold=m.eb_threshold, channel_density=m.channel_density, exclude=m.exclude,
                               bn_l1=m.bn_l1, every_steps=m.eb_every_steps, min_epochs=m.min_search_epochs)

    def draw_ticket(run: RunContext, controller: SparsityController) -> None:
        assert isinstance(controller, EarlyBirdSearch)  # the controller `searcher` built
        found = controller.done
        run.info.update(eb_epoch=controller.eb_epoch if found else None,
                        eb_step=controller.eb_step if found else None,
                        search_ended_by="early_bird" if found else "cap",
                        ticket_weights=f"early-bird epoch {controller.eb_epoch}" if found else
                        f"no early bird within {m.max_search_epochs} search epochs: weights of the last search epoch")
        if m.pruning == "channel":
            keep = m.channel_density
            if m.channel_budget == "weights":
                keep = _channels_for_weight_share(run, m.density)
            _slim_to_ticket(run, keep, rewind=m.rewind == "init")
        else:
            _magnitude_ticket(run, m.density, exclude=m.exclude, rewind=m.rewind == "init")

    before = _save_initial_weights if m.rewind == "init" else None
    second = _dense if m.pruning == "channel" else _ticket_controller
    return [Stage("search", search, searcher, select_best=False, before=before, after=draw_ticket),
            Stage("train", cfg, second)]


def _magnitude_ticket(run: RunContext, density: float, *, exclude: list[str], rewind: bool) -> None:
    params = prunable_parameters(run.model, exclude)
    masks = global_magnitude_masks({n: p.detach() for n, p in params.items()}, density)
    if rewind:
        assert run.carry.initial is not None, "rewind=init keeps the initial weights (the search's before)"
        rewind_model_(run.model, run.carry.initial, masks)
    run.carry.ticket = {n: mk.cpu() for n, mk in masks.items()}


def _channels_for_weight_share(run: RunContext, density: float) -> float:
    """The channel keep fraction whose slimmed network keeps the share of the full network's conv +
    linear weights closest to ``density`` (``method.channel_budget: weights``). The global |gamma|
    top-k sets are nested in k and so is the kept weight count, so k is found by bisection over the
    channel count (about log2 of it slimmings, each a deep copy plus torch-pruning's graph)."""
    example = example_input(run.spec).to(run.device)
    total = sum(bn.num_features for bn in batchnorm_modules(run.model).values())
    full = sum(p.numel() for p in prunable_parameters(run.model).values())

    shares: dict[int, float] = {}  # k -> the share kept (each costs a slimming)

    def share(k: int) -> float:
        if k not in shares:
            small, _ = slim(run.model, bn_channel_masks(run.model, k / total), example)
            shares[k] = sum(p.numel() for p in prunable_parameters(small).values()) / full
        return shares[k]

    lo, hi = 1, total  # the largest k with share(k) <= density lies in [lo, hi] (or is below lo)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if share(mid) <= density else (lo, mid - 1)
    k = min((lo, min(lo + 1, total)), key=lambda c: abs(share(c) - density))
    run.info.update(channel_keep_fraction=k / total, weight_share_target=density, weight_share_kept=share(k))
    return k / total


def _slim_to_ticket(run: RunContext, keep_fraction: float, *, rewind: bool) -> None:
    masks = bn_channel_masks(run.model, keep_fraction)
    example = example_input(run.spec).to(run.device)
    small, plan = slim(run.model, masks, example)
    if rewind:  # the same channels removed from the initial network
        full = build_model(run.spec)
        assert run.carry.initial is not None, "rewind=init keeps the initial weights (the search's before)"
        full.load_state_dict(run.carry.initial)
        small = apply_plan(full, plan, example_input(run.spec))
    run.info["params_before_slimming"] = sum(p.numel() for p in run.model.parameters())
    run.replace_model(small, {**run.spec, "channel_plan": plan})
    run.info["params_after_slimming"] = sum(p.numel() for p in small.parameters())


# ------------------------------------------------------------------ boosting tickets


@METHODS.register("boosting_ticket")
def boosting_ticket(cfg: Config) -> list[Stage]:
    """Boosting tickets (Li et al. 2020): train the dense net from a saved initialisation with a small
    lr (constant, or stepped at ``search_milestones``; naturally or with FGSM), prune with one global
    threshold on |w| / mean |w| of its layer over all conv and linear weights, rewind the survivors to
    the initialisation, retrain adversarially (the run's own schedule). ``rounds > 1`` repeats finder +
    prune + rewind with densities density^(k/rounds); ``reinit: random`` gives the lottery-ticket control.
    """
    m = method_as(cfg, BoostingTicketConfig)
    finder = search_config(cfg, epochs=m.finder_epochs, attack=m.search_attack, lr=m.search_lr,
                           milestones=m.search_milestones)
    densities = iterative_densities(m.density, m.rounds)

    def prune_and_rewind(round_index: int) -> Callable[[RunContext, SparsityController], None]:
        def transition(run: RunContext, controller: SparsityController) -> None:
            params = prunable_parameters(run.model, m.exclude)
            masks = layer_normalized_masks({n: p.detach() for n, p in params.items()}, densities[round_index])
            last = round_index == len(densities) - 1
            if last and m.reinit == "random":
                reinit_(run.model, masks, seed=cfg.seed + 1)
            else:
                assert run.carry.initial is not None, "the first finder's before keeps the initial weights"
                rewind_model_(run.model, run.carry.initial, masks)
            run.carry.ticket = {n: mk.cpu() for n, mk in masks.items()}
            run.info["ticket_densities"] = densities[: round_index + 1]
        return transition

    stages = []
    for k in range(len(densities)):
        controller = _dense if k == 0 else _ticket_controller
        name = "finder" if len(densities) == 1 else f"finder{k + 1}"
        stages.append(Stage(name, finder, controller, select_best=False,
                            before=_save_initial_weights if k == 0 else None, after=prune_and_rewind(k)))
    stages.append(Stage("train", cfg, _ticket_controller))
    return stages


# ------------------------------------------------------------------ after training: magnitude, HYDRA


def pretrain_config(cfg: Config, epochs: int) -> Config:
    """The run's dense adversarial training shortened to ``epochs``: its optim settings, with the
    multistep milestones (and piecewise knots given in epochs) scaled by ``epochs / cfg.epochs``, so
    a 200-epoch schedule x0.1 at 100 and 150 becomes x0.1 at 50 and 75 for 100 epochs (cosine and
    fractional knots scale by themselves; a warm-up keeps its length)."""
    stage = copy.deepcopy(cfg)
    stage.epochs = epochs
    scale = epochs / cfg.epochs
    stage.optim.milestones = [m * scale for m in cfg.optim.milestones]
    if cfg.optim.knots_in == "epochs":
        stage.optim.knots = [[x * scale, y] for x, y in cfg.optim.knots]
    return stage


def cosine_config(cfg: Config, *, epochs: int, lr: float) -> Config:
    """The run's config for a stage of ``epochs`` epochs whose lr goes from ``lr`` to 0 along a cosine
    without warm-up (fresh optimizer: the run's optimizer, momentum and weight decay)."""
    stage = copy.deepcopy(cfg)
    stage.epochs = epochs
    stage.optim.lr, stage.optim.schedule, stage.optim.warmup_epochs = lr, "cosine", 0.0
    return stage


def _pretrained_weights(m: AfterTrainingConfig) -> Callable[[RunContext], None]:
    def load(run: RunContext) -> None:
        assert m.pretrained is not None  # _dense_then loads only with method.pretrained
        load_pretrained(run, m.pretrained)
    return load


def _dense_then(m: AfterTrainingConfig, cfg: Config, transition: Callable[[RunContext], None]
                ) -> tuple[list[Stage], Callable[[RunContext], None] | None]:
    """The dense start of an after-training recipe: a ``pretrain`` stage whose transition is
    ``transition`` (no ``before`` for the next stage), or, with ``method.pretrained``, no stage and a
    ``before`` for the next one that loads the checkpoint, then runs ``transition``."""
    if m.pretrained is None:
        pretrain = Stage("pretrain", pretrain_config(cfg, m.pretrain_epochs), _dense, select_best=False,
                         after=lambda run, controller: transition(run))
        return [pretrain], None
    load = _pretrained_weights(m)

    def before(run: RunContext) -> None:
        load(run)
        transition(run)

    return [], before


@METHODS.register("magnitude")
def magnitude(cfg: Config) -> list[Stage]:
    """One-shot magnitude pruning + adversarial fine-tuning: dense PGD-AT (stage ``pretrain``, or the
    ``pretrained`` checkpoint), prune once to ``density`` (``scope: layer``: each layer keeps its
    largest |w| at ``distribution``'s layer densities; ``global``: one |w| threshold over all prunable
    weights), then stage ``finetune``: the fixed mask trained adversarially for ``finetune_epochs`` at
    ``finetune_lr``, cosine, with a fresh optimizer."""
    m = method_as(cfg, MagnitudeConfig)

    def prune(run: RunContext) -> None:
        params = {n: p.detach() for n, p in prunable_parameters(run.model, m.exclude).items()}
        if m.scope == "global":
            masks = global_magnitude_masks(params, m.density)
        else:
            counts = layer_counts({n: p.shape for n, p in params.items()}, m.density, m.distribution)
            masks = layer_top_k_masks({n: p.abs() for n, p in params.items()}, counts)
        run.carry.ticket = {n: mk.cpu() for n, mk in masks.items()}  # the finetune stage applies them

    first, before = _dense_then(m, cfg, prune)
    finetune = cosine_config(cfg, epochs=m.finetune_epochs, lr=m.finetune_lr)
    return [*first, Stage("finetune", finetune, _ticket_controller, before=before)]


@METHODS.register("hydra")
def hydra(cfg: Config) -> list[Stage]:
    """HYDRA (Sehwag et al. 2020): dense PGD-AT (stage ``pretrain``, or the ``pretrained``
    checkpoint); stage ``score``: learn a score per prunable weight under the adversarial loss with
    the weights frozen, forward through w * top-k(|s|) per layer (``sparta.sparse.hydra``), for
    ``score_epochs`` at ``score_lr``, cosine; then the mask = the top-k of the learned scores, the
    kept weights keep their pretrained values, and stage ``finetune`` trains them adversarially
    (``finetune_epochs`` at ``finetune_lr``, cosine, fresh optimizer). Layer densities: ``distribution``
    (the paper's: uniform). ``run.info["score_mask_changed"]``: the fraction of prunable positions where
    the learned mask differs from the magnitude mask the scores started from."""
    m = method_as(cfg, HydraConfig)

    def scorer(stage_cfg: Config, run: RunContext, optimizer: torch.optim.Optimizer,
               steps_per_epoch: int) -> SparsityController:
        shapes = {n: p.shape for n, p in prunable_parameters(run.model, m.exclude).items()}
        return HydraScores(run.model, optimizer, layer_counts(shapes, m.density, m.distribution), m.exclude)

    def draw_mask(run: RunContext, controller: SparsityController) -> None:
        assert isinstance(controller, HydraScores)  # the controller `scorer` built
        run.carry.ticket = controller.mask_state()  # the model holds w * mask already
        run.info["score_mask_changed"] = controller.mask_changed()

    first, before = _dense_then(m, cfg, lambda run: None)
    score = cosine_config(cfg, epochs=m.score_epochs, lr=m.score_lr)
    finetune = cosine_config(cfg, epochs=m.finetune_epochs, lr=m.finetune_lr)
    return [*first, Stage("score", score, scorer, select_best=False, before=before, after=draw_mask),
            Stage("finetune", finetune, _ticket_controller)]
