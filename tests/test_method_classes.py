"""Each method's class holds its knowledge: its stages are the ones its recipe builds, its SMOKE makes
every stage one epoch, its derived defaults are concrete after building, and configs saved with
``null`` for them (older versions) read as the values those versions used."""
from __future__ import annotations

import math

import pytest

from sparta.config import from_saved, load_config, smoke_settings
from sparta.method_config import METHOD_CONFIGS, derived
from sparta.methods import METHODS, build_recipe
from sparta.reproduce import PRESETS, SMOKE

BASE = PRESETS / "cifar10_pgd.yaml"
METHOD_FILES = sorted((PRESETS / "methods").glob("*.yaml"))
# variants whose stage list differs from their preset's
VARIANTS = [("boosting_ticket.yaml", ["method.rounds=3"]), ("magnitude.yaml", ["method.pretrained=dense.pt"]),
            ("hydra.yaml", ["method.pretrained=dense.pt"])]


def _configs(name: str | None) -> list:
    return [BASE] if name is None else [BASE, PRESETS / "methods" / name]


CASES = [(None, []), (None, ["method.name=static"]), *[(p.name, []) for p in METHOD_FILES], *VARIANTS]


@pytest.mark.parametrize("preset,overrides", CASES)
def test_class_stages_are_the_stages_the_recipe_builds(preset, overrides):
    cfg = load_config(_configs(preset), overrides)
    planned = [(s.name, s.epochs) for s in cfg.method.stages(cfg)]
    assert planned == [(s.name, s.cfg.epochs) for s in build_recipe(cfg)]
    assert planned[-1][1] == (cfg.method.finetune_epochs if hasattr(cfg.method, "finetune_epochs") else cfg.epochs)


@pytest.mark.parametrize("preset,overrides", CASES)
def test_smoke_makes_every_stage_one_epoch(preset, overrides):
    paths = _configs(preset)
    cfg = load_config(paths, [*overrides, *SMOKE, *smoke_settings(paths)])
    assert [s.epochs for s in cfg.method.stages(cfg)] == [1] * len(cfg.method.stages(cfg))


def test_every_method_has_a_class_and_a_recipe():
    assert set(METHOD_CONFIGS) == set(METHODS.names())


def _with_nulls(cfg) -> dict:
    raw = cfg.to_dict()
    cls = type(cfg.method)
    raw["method"] = {k: (None if derived(cls, k) else v) for k, v in raw["method"].items()}
    return raw


@pytest.mark.parametrize("preset,overrides,expected", [
    ("robust_bird.yaml", [], dict(bn_l1=0.0, eb_threshold=0.08, channel_density=math.sqrt(0.2))),
    ("robust_bird.yaml", ["method.pruning=channel", "method.density=0.25"],
     dict(bn_l1=1e-4, eb_threshold=0.1, channel_density=0.5)),
    ("boosting_ticket.yaml", [], dict(search_lr=0.05)),
    ("boosting_ticket.yaml", ["model.name=vgg16_bn"], dict(search_lr=0.01)),
    ("flying_bird_plus.yaml", ["epochs=30"], dict(adapt_from_epoch=15)),
])
def test_derived_defaults_and_old_nulls_read_as_the_rule(preset, overrides, expected):
    """The rules are the ones the recipes applied at the point of use before the classes held them
    (``m.bn_l1 or DEFAULT_BN_L1[pruning]``, ``m.search_lr or (0.01 if vgg else 0.05)``, ...)."""
    cfg = load_config(_configs(preset), [*overrides, *(f"method.{k}=null" for k in expected)])
    assert {k: getattr(cfg.method, k) for k in expected} == pytest.approx(expected)
    old = from_saved(_with_nulls(cfg))  # a config.yaml saved with null for every derived setting
    assert old.to_dict() == cfg.to_dict()
    assert all(getattr(cfg.method, k) is not None for k in cfg.to_dict()["method"] if derived(type(cfg.method), k))


def test_a_given_value_wins_over_the_rule():
    cfg = load_config(_configs("robust_bird.yaml"), ["method.pruning=channel", "method.eb_threshold=0.05",
                                                     "method.channel_density=0.3", "method.bn_l1=0"])
    assert (cfg.method.eb_threshold, cfg.method.channel_density, cfg.method.bn_l1) == (0.05, 0.3, 0.0)


def test_method_as_refuses_another_methods_settings():
    """A recipe reading its settings from a config of another method fails at once, naming both classes."""
    from sparta.method_config import FlyingBirdConfig, RandomMaskConfig, RobustBirdConfig, method_as

    fbp = load_config(None, ["method.name=flying_bird_plus"])
    assert method_as(fbp, FlyingBirdConfig) is fbp.method and method_as(fbp, RandomMaskConfig) is fbp.method
    with pytest.raises(TypeError, match="'dense' has a MethodConfig, not the RobustBirdConfig expected"):
        method_as(load_config(None), RobustBirdConfig)
