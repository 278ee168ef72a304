"""The ``method:`` section of a config: one dataclass per ``method.name``, each with only its settings.

A setting declares its default and, where it has one, its range (``setting(50, ">= 1")``); the
checks and their one-line errors are generated from the declaration. A default that depends on other
settings (Robust Bird's ``eb_threshold`` on ``pruning``) is declared as a rule (``derive=``) and set
when the config is built, so a built config, and the config.yaml a run saves, hold the value used;
a ``null`` for such a setting (configs saved by older versions) is read as "not given". Methods that share settings
share a base class: every sparse method has ``density`` and ``exclude``, the random-mask methods add
``distribution``, the ticket methods (a cheap first stage finds the mask) add the search settings, the
after-training methods (prune a dense adversarially trained net, then fine-tune) the pretrain and
fine-tune settings.
Each class is all a method's config-level knowledge: its settings and their defaults, its stages and
their epochs (``stages``), the overrides that shrink it to one short epoch per stage (``SMOKE``), and
what its masks are before training (``planned_masks``, for ``sparta flops``). ``METHOD_CONFIGS`` maps
``method.name`` to its class; a new method adds its class there and its recipe to
``sparta.methods.METHODS``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config

_RANGE = re.compile(r"^(?:(>=|>) *(\S+)|in ([(\[]) *(\S+), *(\S+) *([)\]]))$")


def range_test(rule: str) -> Callable[[float], bool]:
    """``">= 1"``, ``"> 0"`` or an interval such as ``"in (0, 1]"`` as a test of a number."""
    found = _RANGE.match(rule)
    if found is None:
        raise ValueError(f"not a range: {rule!r}")
    op, bound, left, low, high, right = found.groups()
    if op:
        b = float(bound)
        return (lambda v: v >= b) if op == ">=" else (lambda v: v > b)
    lo, hi = float(low), float(high)
    return lambda v: (v >= lo if left == "[" else v > lo) and (v <= hi if right == "]" else v < hi)


# (the method's settings, the whole config) -> a setting's default that depends on other settings
Derive = Callable[[Any, "Config"], Any]


def out_of_range(what: str, must: str, value: Any, null: str | None = None) -> ConfigError:
    """The one-line error of a setting outside its range: ``what must be <must> (or null...), got <value>``;
    ``null``: what null means where the setting allows it ("" to say only that it does), else None."""
    allows = "" if null is None else f" (or null{f' for {null}' if null else ''})"
    return ConfigError(f"{what} must be {must}{allows}, got {value}")


def setting(default: Any = None, must: str | None = None, *, derive: Derive | None = None) -> Any:
    """A method setting with its ``default`` and the range its value (each item of a list) ``must``
    lie in, e.g. ``">= 1"``, ``"in (0, 1]"``; None (for settings that allow it) is always valid.
    ``derive``: the default is a rule over the other settings, applied by ``MethodConfig.resolve``."""
    metadata: dict[str, Any] = {"must": must, "ok": range_test(must)} if must else {}
    if derive is not None:
        metadata["derive"] = derive
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class StagePlan:
    """One stage of a method as its config plans it: ``epochs`` of it (at most, when ``capped``: a
    search that ends at the early-bird ticket). The last stage trains the network the run produces."""

    name: str  # the `stage` field of metrics.jsonl
    epochs: int
    capped: bool = False


# what a method's masks are before it trains, for ``sparta flops CONFIG``: none (dense), its initial
# random masks (exactly those it starts from), an estimate (a ticket, only known once drawn: random
# masks at its density stand in), or a physically smaller network only known once drawn (channels)
PlannedMasks = Literal["none", "initial", "estimate", "channels"]


@dataclass
class MethodConfig:
    """Dense adversarial training (``dense``): no settings besides the name."""

    name: str = "dense"
    # overrides that make each stage of the method one short epoch (``--smoke`` of reproduce and grid)
    SMOKE: ClassVar[tuple[str, ...]] = ()

    def stages(self, cfg: Config) -> list[StagePlan]:
        """The method's stages in order, with their epochs (``sparta.methods`` builds them)."""
        return [StagePlan("train", cfg.epochs)]

    def planned_masks(self) -> PlannedMasks:
        return "none"

    def resolve(self, cfg: Config) -> None:
        """Set each setting declared with ``derive`` and not given (None) to its rule's value."""
        for f in dataclasses.fields(self):
            if "derive" in f.metadata and getattr(self, f.name) is None:
                setattr(self, f.name, f.metadata["derive"](self, cfg))

    def check(self, cfg: Config) -> None:
        """Declared ranges, then the rules that tie settings together (overridden where a method has them)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if "ok" not in f.metadata:
                continue
            value = getattr(self, f.name)
            values = value if isinstance(value, list) else [value]
            if any(v is not None and not f.metadata["ok"](v) for v in values):
                what = f"each item of method.{f.name}" if isinstance(value, list) else f"method.{f.name}"
                null = "" if type(None) in typing.get_args(hints[f.name]) else None
                raise out_of_range(what, f.metadata["must"], value, null)


@dataclass
class SparseConfig(MethodConfig):
    density: float = setting(0.2, "in (0, 1]")  # fraction of prunable (conv + linear) weights kept
    exclude: list[str] = setting([])  # fnmatch patterns of weights that stay dense

    def planned_masks(self) -> PlannedMasks:
        return "estimate"


@dataclass
class RandomMaskConfig(SparseConfig):
    """Random static sparsity (``static``): a random mask at ``density`` with ``distribution``'s layer densities."""

    name: str = "static"
    distribution: Literal["igq", "erk", "er", "uniform"] = "igq"  # per-layer densities of the initial mask

    def planned_masks(self) -> PlannedMasks:
        return "initial"


@dataclass
class FlyingBirdConfig(RandomMaskConfig):
    """Flying Bird (``flying_bird``): dynamic sparsity, a drop-and-grow topology update at a cadence."""

    name: str = "flying_bird"
    # topology update cadence, in iterations or in epochs (not both)
    update_every: int | None = setting(900, "> 0")
    update_every_late: int | None = setting(1200, "> 0")  # in the second half of training; null = update_every
    # in epochs instead (e.g. 2.5 = every 2.5 epochs' worth of iterations); when set, the two
    # iteration settings above are ignored, and a null late cadence keeps update_every_epochs
    update_every_epochs: float | None = setting(None, "> 0")
    update_every_late_epochs: float | None = setting(None, "> 0")
    growth: Literal["random", "gradient"] = "random"  # SET-style random or RigL-style dense-gradient growth
    # where growth may land: exclusive = only positions inactive before the drop (RigL: a just-dropped
    # weight is never regrown in the same update; every dropped and grown weight restarts at 0);
    # authors = every position inactive after the drop, as in the paper's code (a weight dropped and
    # re-drawn keeps its value and optimizer state, so fewer weights change per update)
    regrowth: Literal["exclusive", "authors"] = "exclusive"
    drop_fraction: float = setting(0.5, "in (0, 1]")  # cosine-decayed fraction of active weights replaced per update...
    drop_fraction_final: float = setting(0.005, "in [0, 1]")  # ...down to this at the end of training

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if self.update_every is None and self.update_every_epochs is None:
            raise ConfigError("set method.update_every (iterations) or method.update_every_epochs")


@dataclass
class FlyingBirdPlusConfig(FlyingBirdConfig):
    """Flying Bird+ (``flying_bird_plus``): Flying Bird whose density reacts to robust overfitting."""

    name: str = "flying_bird_plus"
    # default: half of the epochs (paper: 100 of 200)
    adapt_from_epoch: int = setting(must=">= 0", derive=lambda m, cfg: cfg.epochs // 2)
    window: int = setting(5, ">= 2")  # the last epochs looked at (window - 1 differences), every epoch
    # whatever eval.every is. Each epoch's window entry needs the validation robust accuracy and loss:
    # the first N validation images are evaluated with the evaluation attack after every epoch for it,
    # the same images every epoch. null = all of eval.val_subset's images (reused on evaluated epochs,
    # but a full validation after every epoch); fewer are cheaper and noisier (binomial standard error
    # sqrt(p(1-p)/N): 3 points at N=250, p=0.3)
    window_val_subset: int | None = setting(None, ">= 1")
    threshold: float = setting(0.5, "in (0, 1]")  # fraction of the differences that must show the trend
    extra_prune_fraction: float = setting(0.4, "in [0, 1]")  # prune-more: extra ceil(0.4 * r * nnz) per layer
    extra_grow_fraction: float = setting(0.05, ">= 0")  # grow-more: regrow 5% more than dropped

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if cfg.data.val_size == 0 or cfg.eval.attack == "none":
            raise ConfigError("method.name=flying_bird_plus needs a validation split evaluated under attack "
                              "(data.val_size > 0, eval.attack != none)")


@dataclass
class TicketConfig(SparseConfig):
    """Settings of the ticket methods: a cheap first stage finds the ticket, the second trains it."""

    search_attack: Literal["none", "fgsm", "pgd"] = "none"  # the first stage's attack
    search_lr: float = setting(0.1, "> 0")  # lr of the first stage
    # first-stage lr x optim.gamma at these epochs of that stage; [] = constant search_lr. The authors'
    # Robust Bird: max_search_epochs=200 search_milestones=[50]; the boosting paper's finder:
    # finder_epochs=100 search_milestones=[50, 75]
    search_milestones: list[float] = setting([], ">= 0")


# lambda of the L1 penalty on BN gammas during Robust Bird's search, by method.pruning: network
# slimming's 1e-4 (Liu et al. 2017, You et al. 2020) where gammas score the channels, none where weight
# magnitudes score the ticket
DEFAULT_BN_L1 = {"unstructured": 0.0, "channel": 1e-4}
DEFAULT_EB_THRESHOLD = {"unstructured": 0.08, "channel": 0.1}  # You et al.'s early-bird thresholds, by kind


@dataclass
class RobustBirdConfig(TicketConfig):
    """Robust Bird (``robust_bird``): search until the early-bird ticket, then train the ticket adversarially."""

    name: str = "robust_bird"
    pruning: Literal["unstructured", "channel"] = "unstructured"
    max_search_epochs: int = setting(50, ">= 1")  # the search ends at the early-bird ticket or after this many epochs
    min_search_epochs: int = setting(0, ">= 0")  # the ticket may not be drawn before the end of this search epoch
    # compare the masks every N optimizer steps of the search (e.g. 352 = a CIFAR epoch of 45,000
    # images at batch 128); null = after every epoch. The search still stops at an epoch's end
    eb_every_steps: int | None = setting(None, ">= 1")
    # L1 penalty lambda * sum |gamma| on BatchNorm weights during the search (network slimming);
    # default: 1e-4 for pruning=channel, 0 for unstructured
    bn_l1: float = setting(must=">= 0", derive=lambda m, cfg: DEFAULT_BN_L1[m.pruning])
    eb_window: int = setting(5, ">= 2")  # masks compared (the newest against the window - 1 older ones)
    # max normalised Hamming distance between masks; default: 0.08 unstructured, 0.1 channel
    eb_threshold: float = setting(must="in [0, 1]", derive=lambda m, cfg: DEFAULT_EB_THRESHOLD[m.pruning])
    # fraction of BN channels kept; default: sqrt(density)
    channel_density: float = setting(must="in (0, 1]", derive=lambda m, cfg: math.sqrt(m.density))
    # what the channel ticket's size is set by: channels (channel_density of the BN channels) or weights
    # (as many channels as keep the share `density` of the conv + linear weights, the adversarial pruning
    # benchmark's structured sparsity); the search compares masks at channel_density either way
    channel_budget: Literal["channels", "weights"] = "channels"
    rewind: Literal["none", "init"] = "none"  # train the ticket from the early-bird weights or the initial ones

    SMOKE = ("method.max_search_epochs=1", "method.min_search_epochs=0", "method.search_milestones=[]")

    def stages(self, cfg: Config) -> list[StagePlan]:
        return [StagePlan("search", self.max_search_epochs, capped=True), StagePlan("train", cfg.epochs)]

    def planned_masks(self) -> PlannedMasks:
        return "channels" if self.pruning == "channel" else "estimate"

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if self.min_search_epochs > self.max_search_epochs:
            raise ConfigError(f"method.min_search_epochs must be in [0, max_search_epochs={self.max_search_epochs}], "
                              f"got {self.min_search_epochs}: lower it or raise method.max_search_epochs")


@dataclass
class BoostingTicketConfig(TicketConfig):
    """Boosting tickets (``boosting_ticket``): a short finder, prune, rewind, retrain adversarially."""

    name: str = "boosting_ticket"
    search_attack: Literal["none", "fgsm", "pgd"] = "fgsm"
    # default: Li et al.'s finder lr, 0.01 for VGG and 0.05 otherwise
    search_lr: float = setting(must="> 0", derive=lambda m, cfg: 0.01 if cfg.model.name.startswith("vgg") else 0.05)
    finder_epochs: int = setting(20, ">= 1")
    rounds: int = setting(1, ">= 1")  # pruning rounds (iterative pruning when > 1)
    reinit: Literal["none", "random"] = "none"  # random: same mask, fresh random weights (lottery-ticket control)
    SMOKE = ("method.finder_epochs=1", "method.search_milestones=[]")

    def stages(self, cfg: Config) -> list[StagePlan]:
        finders = [StagePlan("finder" if self.rounds == 1 else f"finder{k + 1}", self.finder_epochs)
                   for k in range(self.rounds)]
        return [*finders, StagePlan("train", cfg.epochs)]


@dataclass
class AfterTrainingConfig(SparseConfig):
    """Settings of the after-training methods: a dense adversarially trained network (trained in a
    ``pretrain`` stage, or read from ``pretrained``) is pruned once, then fine-tuned adversarially."""

    # the pretrain stage: dense PGD-AT for this many epochs on the run's optim settings, its
    # multistep milestones (and piecewise knots given in epochs) scaled by pretrain_epochs / epochs
    pretrain_epochs: int = setting(100, ">= 1")
    # a sparta checkpoint (.pt) of a dense run of the same model: its weights replace the pretrain
    # stage (not trained; summary.json records the path and the checkpoint's own cost, not added
    # to train_flops)
    pretrained: str | None = None
    # layer densities of the pruned network (layer-wise pruning); uniform = every layer at density
    distribution: Literal["uniform", "igq", "erk", "er"] = "uniform"
    finetune_epochs: int = setting(100, ">= 1")  # the finetune stage: adversarial training of the kept weights
    finetune_lr: float = setting(0.01, "> 0")  # its lr, cosine to 0 over finetune_epochs, fresh optimizer
    SMOKE: ClassVar[tuple[str, ...]] = ("method.pretrain_epochs=1", "method.finetune_epochs=1")  # HYDRA adds one

    def stages(self, cfg: Config) -> list[StagePlan]:
        pretrain = [StagePlan("pretrain", self.pretrain_epochs)] if self.pretrained is None else []
        return [*pretrain, StagePlan("finetune", self.finetune_epochs)]


@dataclass
class MagnitudeConfig(AfterTrainingConfig):
    """One-shot magnitude pruning + adversarial fine-tuning (``magnitude``)."""

    name: str = "magnitude"
    # global: one |w| threshold over all prunable weights (layer densities follow from it);
    # layer: each layer keeps its largest |w| at the layer densities of `distribution`
    scope: Literal["global", "layer"] = "layer"

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if self.scope == "global" and self.distribution != "uniform":
            raise ConfigError(f"method.distribution={self.distribution} sets layer densities, which scope=global "
                              "leaves to its one threshold: set method.scope=layer or drop method.distribution")


@dataclass
class HydraConfig(AfterTrainingConfig):
    """HYDRA (``hydra``; Sehwag et al. 2020): learn a score per weight with the weights frozen, keep
    the top-scored weights of each layer, fine-tune them adversarially."""

    name: str = "hydra"
    score_epochs: int = setting(20, ">= 1")  # the score stage (paper: 20)
    score_lr: float = setting(0.1, "> 0")  # its lr, cosine to 0 over score_epochs (paper: 0.1)
    SMOKE = ("method.pretrain_epochs=1", "method.score_epochs=1", "method.finetune_epochs=1")

    def stages(self, cfg: Config) -> list[StagePlan]:
        *pretrain, finetune = super().stages(cfg)
        return [*pretrain, StagePlan("score", self.score_epochs), finetune]


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {
    "dense": MethodConfig, "static": RandomMaskConfig, "flying_bird": FlyingBirdConfig,
    "flying_bird_plus": FlyingBirdPlusConfig, "robust_bird": RobustBirdConfig, "boosting_ticket": BoostingTicketConfig,
    "magnitude": MagnitudeConfig, "hydra": HydraConfig,
}


M = TypeVar("M", bound=MethodConfig)


def method_as(cfg: Config, cls: type[M]) -> M:
    """``cfg.method`` as the class ``cls`` a recipe reads; a config of another method fails here, loudly
    (a ``cast`` would let it run on with settings it does not have)."""
    method = cfg.method
    if not isinstance(method, cls):
        raise TypeError(f"method {method.name!r} has a {type(method).__name__}, not the {cls.__name__} expected")
    return method


def setting_names(cls: type[MethodConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def method_class(raw: dict[str, Any]) -> type[MethodConfig]:
    """The class of a raw ``method:`` mapping, chosen by its ``name`` (dense when absent)."""
    name = raw.get("name", "dense")
    if name not in METHOD_CONFIGS:
        raise ConfigError(f"method.name must be one of {', '.join(METHOD_CONFIGS)}; got {name!r}")
    return METHOD_CONFIGS[name]


def unknown_setting(cls: type[MethodConfig], key: str) -> ConfigError:
    """The error for a ``method.<key>`` that ``cls``'s method does not have, naming its settings
    (and the methods that do have ``key``)."""
    own = setting_names(cls)
    method = cls().name
    others = [n for n, c in METHOD_CONFIGS.items() if key in setting_names(c)]
    where = f"a setting of {', '.join(others)}, not of {method}" if others else f"not a setting of {method}"
    return ConfigError(f"method.{key} is {where}; {method}'s settings: {', '.join(own)}")


# settings that older versions saved as null for "the method's default", which is now a plain value
FORMERLY_NULL = ("search_attack", "search_lr")


def derived(cls: type[MethodConfig], key: str) -> bool:
    """Whether ``cls``'s setting ``key`` has a default derived from the other settings."""
    return any(f.name == key and "derive" in f.metadata for f in dataclasses.fields(cls))


def drop_unused_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved config's mapping without the ``method:`` keys its method does not have.

    Configs written before one class per method held every method's settings, those of other
    methods unused; they are dropped on reading a saved run, so it loads and resumes as it trained.
    Keys no method has are kept (and refused by the config checks).
    """
    method = raw.get("method")
    if not isinstance(method, dict):
        return raw
    own = setting_names(method_class(method))
    known = {n for c in METHOD_CONFIGS.values() for n in setting_names(c)}
    return {**raw, "method": {k: v for k, v in method.items() if k in own or k not in known}}
