"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

A config is built from (in order) the dataclass defaults, a YAML file and ``key=value`` overrides
such as ``optim.lr=0.05`` or ``attack.eps=8/255``. Every key is checked: an unknown key, a value of
the wrong type or out of range is a ``ConfigError`` with one line saying what is wrong and how to
fix it (closest valid key suggested). Choices are ``Literal`` types, never sentinel numbers.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError


@dataclass
class DataConfig:
    name: str = "digits"
    root: Optional[str] = None  # folder holding the official files; None only for embedded data
    val_size: Optional[int] = None  # last N training images; None = the dataset's default
    train_subset: Optional[int] = None  # keep only the first N remaining training images
    augment: bool = True  # random crop (padding 4) + horizontal flip on training batches


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    base_width: Optional[int] = None  # channels of the first stage; None = the model's default
    depth: Optional[int] = None  # wide_resnet only
    widen_factor: Optional[int] = None  # wide_resnet only

    def kwargs(self) -> dict[str, Any]:
        """Constructor arguments that were set (None means: the model's default)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9  # SGD momentum; beta1 for adam/adamw
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: Literal["multistep", "cosine", "piecewise", "constant"] = "multistep"
    milestones: list[float] = field(default_factory=lambda: [100.0, 150.0])  # epochs (multistep)
    gamma: float = 0.1  # multistep factor
    # piecewise-linear: [[epoch, lr_multiplier], ...] knots, linearly interpolated
    knots: list[list[float]] = field(default_factory=lambda: [[0.0, 0.0], [0.4, 1.0], [1.0, 0.0]])
    knots_in: Literal["fraction", "epochs"] = "fraction"  # knot positions as fraction of the run or epochs
    warmup_epochs: float = 0.0  # linear warm-up from warmup_from * lr to lr (multistep, cosine)
    warmup_from: float = 0.0
    step_per: Literal["iteration", "epoch"] = "iteration"  # when the lr changes


@dataclass
class AttackConfig:
    name: Literal["pgd", "fgsm", "none"] = "pgd"
    norm: Literal["linf", "l2"] = "linf"
    eps: float = 8 / 255
    alpha: float = 2 / 255  # step size
    steps: int = 10
    random_start: bool = True
    loss: Literal["ce", "cw"] = "ce"
    bn_mode: Literal["train", "eval"] = "train"  # BatchNorm mode while the training attack runs
    eps_warmup_epochs: float = 0.0  # ramp eps (and alpha with it) linearly from 0 over these epochs


@dataclass
class TrainConfig:
    """How the training step runs (not what it computes): arithmetic precision, compilation, layout."""

    # bf16: autocast around the training attack and step, fp32 weights and optimizer state;
    # fp16: CUDA only, with a gradient scaler; auto: bf16 where it is fast (sparta.precision.fast_bf16)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False  # torch.compile the model for the training step (evaluation runs it uncompiled)
    # conv weights in NHWC (channels_last), so convolutions run in that layout; faster in some
    # settings only (see the README's benchmarks), hence off by default
    channels_last: bool = False


@dataclass
class ObjectiveConfig:
    name: Literal["ce", "trades"] = "ce"  # ce: Madry (CE on x_adv); trades: Zhang et al. 2019
    beta: float = 6.0  # TRADES robustness weight


@dataclass
class EvalConfig:
    every: int = 1  # evaluate every N epochs (the last epoch is always evaluated)
    attack: Literal["pgd", "fgsm", "none"] = "pgd"
    norm: Optional[Literal["linf", "l2"]] = None  # None = attack.norm
    eps: Optional[float] = None  # None = attack.eps
    alpha: float = 2 / 255
    steps: int = 20
    restarts: int = 1
    val_subset: Optional[int] = None  # evaluate on the first N validation images (None = all)
    test_subset: Optional[int] = None  # ... and the first N test images
    batch_size: int = 256
    # robust generalization gap at the end: accuracy on the first N training images (eval mode, no
    # augmentation) minus test accuracy; null skips it
    gap_subset: Optional[int] = 1000
    # arithmetic of validation/test/gap evaluation (attack and forwards); fp32 keeps robustness
    # numbers free of precision effects, bf16 autocast is faster where supported
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class MethodConfig:
    name: Literal["dense", "static", "flying_bird", "flying_bird_plus", "robust_bird", "boosting_ticket"] = "dense"
    density: float = 0.2  # fraction of prunable weights kept (sparse methods)
    distribution: Literal["igq", "erk", "er", "uniform"] = "igq"  # per-layer densities of the initial mask
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns of weights that stay dense
    # Flying Bird (dynamic sparsity): topology update cadence, in iterations or in epochs (not both)
    update_every: Optional[int] = 900
    update_every_late: Optional[int] = 1200  # cadence in the second half of training; null = keep update_every
    # in epochs instead (e.g. 2.5 = every 2.5 epochs' worth of iterations); when set, the two
    # iteration settings above are ignored, and a null late cadence keeps update_every_epochs
    update_every_epochs: Optional[float] = None
    update_every_late_epochs: Optional[float] = None
    growth: Literal["random", "gradient"] = "random"  # SET-style random or RigL-style dense-gradient growth
    # where growth may land: exclusive = only positions inactive before the drop (RigL: a just-dropped
    # weight is never regrown in the same update; every dropped and grown weight restarts at 0);
    # authors = every position inactive after the drop, as in the paper's code (a weight dropped and
    # re-drawn keeps its value and optimizer state, so fewer weights change per update)
    regrowth: Literal["exclusive", "authors"] = "exclusive"
    drop_fraction: float = 0.5  # cosine-decayed fraction of active weights replaced per update...
    drop_fraction_final: float = 0.005  # ...down to this at the end of training
    # Flying Bird+ (adaptive density)
    adapt_from_epoch: Optional[int] = None  # null = half of the epochs (paper: 100 of 200)
    window: int = 5  # evaluated epochs looked at (window - 1 differences)
    threshold: float = 0.5  # fraction of the differences that must show the trend
    extra_prune_fraction: float = 0.4  # prune-more: extra ceil(0.4 * r * nnz) per layer
    extra_grow_fraction: float = 0.05  # grow-more: regrow 5% more than dropped
    # Robust Bird and boosting tickets: a cheap first stage finds the ticket, the second trains it
    search_attack: Optional[Literal["none", "fgsm", "pgd"]] = None  # null: none (robust_bird), fgsm (boosting)
    search_lr: Optional[float] = None  # lr of the first stage; null: 0.1 (robust_bird),
    #                                    0.01 for VGG and 0.05 otherwise (boosting_ticket, Li et al.)
    # first-stage lr x optim.gamma at these epochs of that stage; [] = constant search_lr. The authors'
    # Robust Bird: max_search_epochs=200 search_milestones=[50]; the boosting paper's finder:
    # finder_epochs=100 search_milestones=[50, 75]
    search_milestones: list[float] = field(default_factory=list)
    # Robust Bird
    pruning: Literal["unstructured", "channel"] = "unstructured"
    max_search_epochs: int = 50  # the search ends at the early-bird ticket or after this many epochs
    min_search_epochs: int = 0  # the ticket may not be drawn before the end of this search epoch
    # compare the masks every N optimizer steps of the search (e.g. 352 = a CIFAR epoch of 45,000
    # images at batch 128); null = after every epoch. The search still stops at an epoch's end
    eb_every_steps: Optional[int] = None
    # L1 penalty lambda * sum |gamma| on BatchNorm weights during the search (network slimming);
    # null: 1e-4 for pruning=channel, 0 for unstructured
    bn_l1: Optional[float] = None
    eb_window: int = 5  # masks compared (the newest against the window - 1 older ones)
    eb_threshold: Optional[float] = None  # max normalised Hamming distance; null: 0.08 unstructured, 0.1 channel
    channel_density: Optional[float] = None  # fraction of BN channels kept; null: sqrt(density)
    rewind: Literal["none", "init"] = "none"  # train the ticket from the early-bird weights or the initial ones
    # boosting tickets
    finder_epochs: int = 20
    rounds: int = 1  # pruning rounds (iterative pruning when > 1)
    reinit: Literal["none", "random"] = "none"  # random: same mask, fresh random weights (lottery-ticket control)


@dataclass
class CheckpointConfig:
    every_epochs: int = 1  # write checkpoints/last.pt every N epochs (and at the end)
    every_steps: Optional[int] = None  # also every N optimizer steps, mid-epoch (resume continues there)


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # also write every metrics.jsonl record to out_dir/tensorboard/


@dataclass
class DistributedConfig:
    # torchrun runs: convert BatchNorm to SyncBatchNorm for training, so each step normalises with
    # the statistics of the whole global batch rather than of the rank's share (CUDA only)
    sync_batchnorm: bool = False


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs/{name}"  # {name} is replaced by `name`
    epochs: int = 200
    batch_size: int = 128
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir.format(name=self.name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building and checking


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, checked and validated."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    return from_dict(with_overrides(raw, overrides))


def with_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of the raw config mapping with each ``key=value`` override set."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return raw


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping in a YAML config; a top-level ``base: other.yaml`` (relative to this file) is
    read first and this file's keys are merged over it, section by section."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; give the path of a YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / str(base)).resolve()
    if base_path in _seen:
        raise ConfigError(f"config file {path}: base {base} includes itself")
    return _merge(read_yaml(base_path, (*_seen, base_path)), data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=0.05")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # a plain string such as a path with odd characters
    return key.strip(), value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(raw: dict[str, Any]) -> Config:
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint, converting the few safe cases (int->float, "8/255")."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = _as_float(value)
        if number is not None:
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} must be of type {name}, got {value!r} ({type(value).__name__})")


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:  # "8/255": the field's usual way of writing pixel budgets
                num, den = text.split("/")
                return float(num) / float(den)
            return float(text)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def validate(cfg: Config) -> None:
    """Range checks: each failure is one line naming the key, the value and what is allowed."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}")
    for key, value in (("data.val_size", cfg.data.val_size),):
        need(value is None or value >= 0, f"{key} must be >= 0, got {value}")
    for key, value in (("data.train_subset", cfg.data.train_subset), ("eval.val_subset", cfg.eval.val_subset),
                       ("eval.test_subset", cfg.eval.test_subset), ("eval.gap_subset", cfg.eval.gap_subset)):
        need(value is None or value >= 1, f"{key} must be >= 1 (or null for all), got {value}")
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    need(0 <= cfg.optim.momentum < 1, f"optim.momentum must be in [0, 1), got {cfg.optim.momentum}")
    need(cfg.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay}")
    need(cfg.optim.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {cfg.optim.warmup_epochs}")
    need(all(m >= 0 for m in cfg.optim.milestones), "optim.milestones must be epochs >= 0")
    need(all(len(k) == 2 for k in cfg.optim.knots), "optim.knots must be [position, lr_multiplier] pairs")
    for prefix, a in (("attack", cfg.attack), ("eval", cfg.eval)):
        eps = getattr(a, "eps", None)
        need(eps is None or eps >= 0, f"{prefix}.eps must be >= 0, got {eps}")
        need(a.alpha > 0, f"{prefix}.alpha (step size) must be > 0, got {a.alpha}")
        need(a.steps >= 0, f"{prefix}.steps must be >= 0, got {a.steps}")
    _warn_large_steps(cfg)
    need(cfg.attack.eps_warmup_epochs >= 0, f"attack.eps_warmup_epochs must be >= 0, got {cfg.attack.eps_warmup_epochs}")
    need(cfg.eval.restarts >= 1, f"eval.restarts must be >= 1, got {cfg.eval.restarts}")
    need(cfg.eval.every >= 1, f"eval.every must be >= 1, got {cfg.eval.every}")
    need(cfg.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}")
    need(cfg.objective.beta >= 0, f"objective.beta must be >= 0, got {cfg.objective.beta}")
    need(cfg.checkpoint.every_epochs >= 1, f"checkpoint.every_epochs must be >= 1, got {cfg.checkpoint.every_epochs}")
    need(cfg.checkpoint.every_steps is None or cfg.checkpoint.every_steps >= 1,
         f"checkpoint.every_steps must be >= 1 (or null for epoch ends only), got {cfg.checkpoint.every_steps}")
    m = cfg.method
    need(0 < m.density <= 1, f"method.density must be in (0, 1] (fraction of weights kept), got {m.density}")
    need(0 < m.drop_fraction <= 1 and 0 <= m.drop_fraction_final <= 1,
         f"method.drop_fraction must be in (0, 1] and drop_fraction_final in [0, 1], got {m.drop_fraction}, {m.drop_fraction_final}")
    for key in ("update_every", "update_every_late", "update_every_epochs", "update_every_late_epochs"):
        value = getattr(m, key)
        need(value is None or value > 0, f"method.{key} must be > 0 (or null), got {value}")
    need(m.update_every is not None or m.update_every_epochs is not None,
         "set method.update_every (iterations) or method.update_every_epochs")
    need(m.window >= 2, f"method.window must be >= 2 epochs, got {m.window}")
    need(0 < m.threshold <= 1, f"method.threshold must be in (0, 1], got {m.threshold}")
    need(m.adapt_from_epoch is None or m.adapt_from_epoch >= 0, f"method.adapt_from_epoch must be >= 0, got {m.adapt_from_epoch}")
    need(m.max_search_epochs >= 1, f"method.max_search_epochs must be >= 1, got {m.max_search_epochs}")
    need(0 <= m.min_search_epochs <= m.max_search_epochs,
         f"method.min_search_epochs must be in [0, max_search_epochs={m.max_search_epochs}], got {m.min_search_epochs}: "
         "lower it or raise method.max_search_epochs")
    need(all(x >= 0 for x in m.search_milestones), f"method.search_milestones must be epochs >= 0, got {m.search_milestones}")
    need(m.eb_every_steps is None or m.eb_every_steps >= 1,
         f"method.eb_every_steps must be >= 1 (or null: after every epoch), got {m.eb_every_steps}")
    need(m.bn_l1 is None or m.bn_l1 >= 0, f"method.bn_l1 must be >= 0 (or null for the default), got {m.bn_l1}")
    need(m.finder_epochs >= 1, f"method.finder_epochs must be >= 1, got {m.finder_epochs}")
    need(m.rounds >= 1, f"method.rounds must be >= 1, got {m.rounds}")
    need(m.eb_window >= 2, f"method.eb_window must be >= 2, got {m.eb_window}")
    need(m.eb_threshold is None or 0 <= m.eb_threshold <= 1, f"method.eb_threshold must be in [0, 1], got {m.eb_threshold}")
    need(m.channel_density is None or 0 < m.channel_density <= 1,
         f"method.channel_density must be in (0, 1], got {m.channel_density}")
    need(m.search_lr is None or m.search_lr > 0, f"method.search_lr must be > 0, got {m.search_lr}")
    need(m.name != "flying_bird_plus" or (cfg.data.val_size != 0 and cfg.eval.attack != "none"),
         "method.name=flying_bird_plus needs a validation split evaluated under attack (data.val_size > 0, eval.attack != none)")
    need(cfg.objective.name != "trades" or cfg.attack.name == "pgd",
         "objective.name=trades generates its own KL attack: set attack.name=pgd (its eps/alpha/steps are used)")


def _warn_large_steps(cfg: Config) -> None:
    """A PGD step larger than the budget overshoots the eps-ball and is projected back every step:
    legal, but usually a typo (alpha=8/255 for eps=2/255). FGSM with a random start is exempt: fast
    AT (Wong et al. 2020) uses alpha = 1.25 * eps on purpose."""
    settings = [("attack", cfg.attack.name, cfg.attack.eps, cfg.attack.alpha, cfg.attack.random_start),
                ("eval", cfg.eval.attack, cfg.attack.eps if cfg.eval.eps is None else cfg.eval.eps, cfg.eval.alpha, True)]
    for prefix, name, eps, alpha, random_start in settings:
        if name != "none" and alpha > eps > 0 and not (name == "fgsm" and random_start):
            warnings.warn(f"{prefix}.alpha {alpha:.4g} is larger than its eps {eps:.4g}: every step overshoots the "
                          "eps-ball and is projected back (the usual step is eps/4, e.g. 2/255 for 8/255)", stacklevel=3)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
