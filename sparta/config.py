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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError
from .fmt import parse_number
from .method_config import (
    FORMERLY_NULL,
    MethodConfig,
    derived,
    drop_unused_settings,
    method_class,
    out_of_range,
    range_test,
    unknown_setting,
)


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None  # folder holding the official files; None only for embedded data
    val_size: int | None = None  # last N training images; None = the dataset's default
    train_subset: int | None = None  # keep only the first N remaining training images
    augment: bool = True  # random crop (padding 4) + horizontal flip on training batches


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    base_width: int | None = None  # channels of the first stage; None = the model's default
    depth: int | None = None  # wide_resnet only
    widen_factor: int | None = None  # wide_resnet only

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
class FmnConfig:
    """``sparta eval --attack fmn`` (sparta.attacks.fmn): the adversarial pruning benchmark's defaults."""
    trials: int = 32  # settings tried per model (0: the default setting, no tuning)
    tune_steps: int = 100  # FMN steps of each trial
    tune_batch: int = 64  # tuning images per trial (validation split, else test images after the evaluated ones)
    steps: int = 200  # FMN steps of the final attack on the evaluated images
    autoattack: bool = True  # also run AutoAttack at eval.eps on the same images for the sanity check


@dataclass
class EvalConfig:
    every: int = 1  # evaluate every N epochs (the last epoch is always evaluated)
    attack: Literal["pgd", "fgsm", "none"] = "pgd"
    norm: Literal["linf", "l2"] | None = None  # None = attack.norm
    eps: float | None = None  # None = attack.eps
    alpha: float = 2 / 255
    steps: int = 20
    restarts: int = 1
    val_subset: int | None = None  # evaluate on the first N validation images (None = all)
    test_subset: int | None = None  # ... and the first N test images
    batch_size: int = 256
    # robust generalization gap at the end: accuracy on the first N training images (eval mode, no
    # augmentation) minus test accuracy; null skips it
    gap_subset: int | None = 1000
    # arithmetic of validation/test/gap evaluation (attack and forwards); fp32 keeps robustness
    # numbers free of precision effects, bf16 autocast is faster where supported
    precision: Literal["fp32", "bf16"] = "fp32"
    fmn: FmnConfig = field(default_factory=FmnConfig)


@dataclass
class CheckpointConfig:
    every_epochs: int = 1  # write checkpoints/last.pt every N epochs (and at the end)
    every_steps: int | None = None  # also every N optimizer steps, mid-epoch (resume continues there)


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


def load_config(path: str | Path | Sequence[str | Path] | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                saved: bool = False) -> Config:
    """Defaults <- YAML file(s) <- ``key=value`` overrides, checked and validated. Several files are
    merged in order, like a ``base:`` list (``[cifar10_pgd.yaml, methods/hydra.yaml]``). ``saved``: the
    file is a run's own config.yaml, which may hold the unused method settings of older versions (dropped)."""
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    raw: dict[str, Any] = {}
    for one in paths:
        raw = _merge(raw, read_yaml(one))
    return from_saved(raw, overrides) if saved else from_dict(with_overrides(raw, overrides))


def from_saved(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config a checkpoint or run directory saved (``raw``), with ``overrides``; the unused
    method settings older versions saved are dropped first (``drop_unused_settings``)."""
    return from_dict(with_overrides(drop_unused_settings(raw), overrides))


def smoke_settings(paths: Sequence[str | Path]) -> list[str]:
    """The overrides that make each stage of the method set by these config files one short epoch
    (its class's ``SMOKE``), for ``--smoke`` runs planned from presets."""
    raw: dict[str, Any] = {}
    for one in paths:
        raw = _merge(raw, read_yaml(one))
    method = raw.get("method")
    return list(method_class(method if isinstance(method, dict) else {}).SMOKE)


def with_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of the raw config mapping with each ``key=value`` override set."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return raw


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping in a YAML config. A top-level ``base:`` names other configs (one path or a list,
    relative to this file): they are read first, merged in order, and this file's keys are merged over
    them, section by section; so a preset can be a dataset's protocol plus a method's settings."""
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
    bases = data.pop("base", None)
    merged: dict[str, Any] = {}
    for base in [] if bases is None else bases if isinstance(bases, list) else [bases]:
        base_path = (path.parent / str(base)).resolve()
        if base_path in _seen:
            raise ConfigError(f"config file {path}: base {base} includes itself")
        merged = _merge(merged, read_yaml(base_path, (*_seen, base_path)))
    return _merge(merged, data)


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
    cfg.method.resolve(cfg)  # the method's defaults that depend on other settings
    validate(cfg)
    return cfg


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a section (mapping), got {raw!r}")
    if cls is MethodConfig:  # the section's class is the one of its method.name
        cls = method_class(raw)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names and issubclass(cls, MethodConfig):
            raise unknown_setting(cls, str(key))
        if value is None and issubclass(cls, MethodConfig) and (derived(cls, key) or key in FORMERLY_NULL):
            continue  # null (older configs): not given; the method's default (or rule) sets it

        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a section (hints are classes, not instances)
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
        return parse_number(value)  # "8/255": the field's usual way of writing pixel budgets
    return None


# The range of each number outside ``method:`` (method settings declare theirs on their classes):
# (dotted key, the range it must lie in, what null means where it is allowed: None where it is not)
RANGES: tuple[tuple[str, str, str | None], ...] = (
    ("epochs", ">= 1", None), ("batch_size", ">= 1", None), ("seed", ">= 0", None),
    ("data.val_size", ">= 0", "the dataset's default"), ("data.train_subset", ">= 1", "all"),
    ("eval.val_subset", ">= 1", "all"), ("eval.test_subset", ">= 1", "all"), ("eval.gap_subset", ">= 1", "all"),
    ("optim.lr", "> 0", None), ("optim.momentum", "in [0, 1)", None), ("optim.weight_decay", ">= 0", None),
    ("optim.warmup_epochs", ">= 0", None),
    ("attack.eps", ">= 0", None), ("attack.alpha", "> 0", None), ("attack.steps", ">= 0", None),
    ("attack.eps_warmup_epochs", ">= 0", None),
    ("eval.eps", ">= 0", "attack.eps"), ("eval.alpha", "> 0", None), ("eval.steps", ">= 0", None),
    ("eval.restarts", ">= 1", None), ("eval.every", ">= 1", None), ("eval.batch_size", ">= 1", None),
    ("objective.beta", ">= 0", None),
    ("checkpoint.every_epochs", ">= 1", None), ("checkpoint.every_steps", ">= 1", "epoch ends only"),
)


def validate(cfg: Config) -> None:
    """Range checks: each failure is one line naming the key, the value and what is allowed."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for key, must, null in RANGES:
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if not (value is None and null is not None) and not range_test(must)(value):
            raise out_of_range(f"{key} (step size)" if name == "alpha" else key, must, value, null)
    need(all(m >= 0 for m in cfg.optim.milestones), "optim.milestones must be epochs >= 0")
    need(all(len(k) == 2 for k in cfg.optim.knots), "optim.knots must be [position, lr_multiplier] pairs")
    _warn_large_steps(cfg)
    cfg.method.check(cfg)
    need(cfg.objective.name != "trades" or cfg.attack.name == "pgd",
         "objective.name=trades generates its own KL attack: set attack.name=pgd (its eps/alpha/steps are used)")


def _warn_large_steps(cfg: Config) -> None:
    """A PGD step larger than the budget overshoots the eps-ball and is projected back every step:
    legal, but usually a typo (alpha=8/255 for eps=2/255). FGSM with a random start is exempt: fast
    AT (Wong et al. 2020) uses alpha = 1.25 * eps on purpose."""
    settings = [("attack", cfg.attack.name, cfg.attack.eps, cfg.attack.alpha, cfg.attack.random_start),
                ("eval", cfg.eval.attack, cfg.attack.eps if cfg.eval.eps is None else cfg.eval.eps, cfg.eval.alpha,
                 True)]
    for prefix, name, eps, alpha, random_start in settings:
        if name != "none" and alpha > eps > 0 and not (name == "fgsm" and random_start):
            warnings.warn(f"{prefix}.alpha {alpha:.4g} is larger than its eps {eps:.4g}: every step overshoots the "
                          "eps-ball and is projected back (the usual step is eps/4, e.g. 2/255 for 8/255)",
                          stacklevel=3)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
