import math
from pathlib import Path

import pytest

from sparta.config import from_dict, load_config, with_overrides
from sparta.errors import ConfigError
from sparta.schedules import LrSchedule

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["optim.lr=0.05", "attack.eps=8/255", "epochs=3", "data.root=/tmp/x y"])
    assert cfg.optim.lr == 0.05
    assert cfg.attack.eps == pytest.approx(8 / 255)
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.data.root == "/tmp/x y"


def test_yaml_fraction_and_int_to_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("attack: {eps: 8/255, alpha: 2/255}\noptim: {lr: 1}\n")
    cfg = load_config(p)
    assert cfg.attack.alpha == pytest.approx(2 / 255)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("override,message", [
    (["optim.lrr=0.1"], "did you mean optim.lr"),
    (["optim.lr=abc"], "optim.lr must be of type float"),
    (["epochs=2.5"], "epochs must be of type int"),
    (["epochs=0"], "epochs must be >= 1"),
    (["attack.name=bim"], "attack.name must be one of pgd, fgsm, none"),
    (["attack.eps=-0.1"], "attack.eps must be >= 0"),
    (["attack.steps=-1"], "attack.steps must be >= 0"),
    (["data=3"], "data must be a section"),
    (["lr"], "must look like key=value"),
    (["data.augment=maybe"], "data.augment must be of type bool"),
    (["objective.name=trades", "attack.name=fgsm"], "objective.name=trades"),
    (["method.name=static", "method.density=0"], "method.density must be in (0, 1]"),
    (["method.name=static", "method.density=1.5"], "method.density must be in (0, 1]"),
    (["method.name=flying_bird_plus", "data.val_size=0"], "needs a validation split"),
    (["method.name=flying_bird", "method.update_every=0"], "method.update_every must be > 0"),
    (["method.name=flying_bird", "method.regrowth=rigl"], "method.regrowth must be one of exclusive, authors"),
    (["method.name=robust_bird", "method.min_search_epochs=51"],
     "method.min_search_epochs must be in [0, max_search_epochs=50], got 51"),
    (["method.name=robust_bird", "method.max_search_epochs=10", "method.min_search_epochs=11"],
     "raise method.max_search_epochs"),
    (["method.name=robust_bird", "method.min_search_epochs=-1"], "method.min_search_epochs must be >= 0"),
    (["method.name=robust_bird", "method.eb_every_steps=0"], "method.eb_every_steps must be >= 1"),
    (["method.name=robust_bird", "method.eb_every_steps=1.5"], "method.eb_every_steps must be of type int"),
    (["method.name=robust_bird", "method.bn_l1=-1e-4"], "method.bn_l1 must be >= 0"),
    (["method.name=robust_bird", "method.search_milestones=[-1]"],
     "each item of method.search_milestones must be >= 0"),
    (["method.name=boosting_ticket", "method.search_milestones=50"], "method.search_milestones must be a list"),
])
def test_bad_values_are_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_with_overrides_does_not_mutate():
    raw = {"optim": {"lr": 0.1}}
    out = with_overrides(raw, ["optim.lr=0.2"])
    assert raw["optim"]["lr"] == 0.1 and out["optim"]["lr"] == 0.2


def test_every_preset_loads():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(presets) >= 6
    for p in presets:
        load_config(p)


def test_demo_yamls_match_demo_module():
    from sparta.demo import DEMO, DEMO_METHODS

    assert load_config(ROOT / "configs" / "demo.yaml") == from_dict(DEMO)
    fb = load_config(ROOT / "configs" / "demo_flying_bird.yaml", ["name=demo"])
    assert fb == from_dict(with_overrides(DEMO, DEMO_METHODS["flying_bird"]))


def test_base_files_merge_section_by_section(tmp_path):
    (tmp_path / "a.yaml").write_text("epochs: 7\noptim: {lr: 0.3, momentum: 0.5}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noptim: {lr: 0.2}\n")
    cfg = load_config(tmp_path / "b.yaml", ["optim.momentum=0.8"])
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.momentum) == (7, 0.2, 0.8)
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "c.yaml")


def test_base_list_merges_in_order_then_the_file(tmp_path):
    (tmp_path / "proto.yaml").write_text("epochs: 7\noptim: {lr: 0.3, momentum: 0.5}\n")
    (tmp_path / "method.yaml").write_text("optim: {lr: 0.2}\nmethod: {name: static, density: 0.5}\n")
    (tmp_path / "run.yaml").write_text("base: [proto.yaml, method.yaml]\nmethod: {density: 0.25}\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.momentum) == (7, 0.2, 0.5)
    assert (cfg.method.name, cfg.method.density) == ("static", 0.25)


def test_dataset_presets_take_their_method_from_one_file():
    """Each method's paper settings are written once (configs/methods/), whatever the dataset."""
    methods = ROOT / "configs" / "methods"
    for fragment in ("flying_bird", "flying_bird_plus", "robust_bird", "robust_bird_channel", "boosting_ticket"):
        want = load_config(methods / f"{fragment}.yaml").method
        for dataset in ("cifar10", "cifar100", "tinyimagenet"):
            assert load_config(ROOT / "configs" / f"{dataset}_{fragment}.yaml").method == want, (dataset, fragment)
    vgg = load_config(ROOT / "configs" / "cifar10_vgg16_boosting_ticket.yaml")
    assert (vgg.model.name, vgg.method.search_lr, vgg.method.finder_epochs) == ("vgg16_bn", 0.01, 100)


def test_each_method_has_its_own_settings():
    from sparta.method_config import METHOD_CONFIGS
    from sparta.methods import METHODS

    assert sorted(METHOD_CONFIGS) == METHODS.names()
    assert list(load_config(None).to_dict()["method"]) == ["name"]  # dense has no settings
    rb = load_config(None, ["method.name=robust_bird"]).method
    assert not hasattr(rb, "window") and not hasattr(rb, "distribution") and rb.max_search_epochs == 50
    fbp = load_config(None, ["method.name=flying_bird_plus", "method.window=3"]).method
    assert (fbp.window, fbp.update_every, fbp.regrowth) == (3, 900, "exclusive")  # its own and Flying Bird's
    with pytest.raises(ConfigError,
                       match="method.density is a setting of static, .*not of dense; dense's settings: name$"):
        load_config(None, ["method.density=0.5"])
    with pytest.raises(ConfigError, match="method.colour is not a setting of static"):
        load_config(None, ["method.name=static", "method.colour=red"])


def test_every_declared_range_refuses_a_value_outside_it():
    """Each setting with a declared range (``setting(default, "in (0, 1]")``) is checked: a value just
    outside the range is one ConfigError naming the key; the bound itself passes where it is closed."""
    import dataclasses
    import re

    from sparta.method_config import METHOD_CONFIGS

    checked = 0
    for name, cls in METHOD_CONFIGS.items():
        for f in dataclasses.fields(cls):
            rule = f.metadata.get("must")
            if rule is None:
                continue
            bounds = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", rule)]
            outside = bounds[0] - 1 if rule.startswith(">=") or "[" in rule else bounds[0]  # just out at the low end
            value = ([outside] if isinstance(f.default, list) or f.default_factory is not dataclasses.MISSING
                     else outside)
            if isinstance(value, float) and "int" in str(f.type):
                value = int(value)
            with pytest.raises(ConfigError, match=f"method.{f.name} must be {re.escape(rule)}"):
                load_config(None, [f"method.name={name}", f"method.{f.name}={value}"])
            checked += 1
    assert checked >= 20
    assert load_config(None, ["method.name=static", "method.density=1"]).method.density == 1.0  # ] is closed


def test_every_range_outside_method_refuses_a_value_outside_it():
    """Each number of ``config.RANGES`` is checked: a value just below its range is one ConfigError
    naming the key and the range; null passes exactly where the table allows it."""
    import re
    import typing

    from sparta.config import RANGES

    cfg = load_config(None)
    for key, must, null in RANGES:
        section, _, name = key.rpartition(".")
        hint = typing.get_type_hints(type(getattr(cfg, section) if section else cfg))[name]
        low = float(re.findall(r"-?\d+(?:\.\d+)?", must)[0])
        outside = low - 1 if must.startswith(">=") or "[" in must else low  # ">= 1" -> 0; "> 0" -> 0
        value = outside if "float" in str(hint) else int(outside)
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}( \(step size\))? must be {re.escape(must)}"):
            load_config(None, [f"{key}={value}"])
        if null is None:
            with pytest.raises(ConfigError, match=re.escape(key)):
                load_config(None, [f"{key}=null"])
        else:
            load_config(None, [f"{key}=null"])
    assert len(RANGES) >= 25


def test_a_saved_config_with_other_methods_settings_still_loads(tmp_path):
    """Run directories written before one class per method hold every method's settings; they load
    (the unused ones dropped) where a config written by a user would be refused."""
    old = ROOT / "tests" / "data" / "boosting_run_v1" / "config.yaml"
    with pytest.raises(ConfigError, match="method.distribution is a setting of static, flying_bird"):
        load_config(old)
    cfg = load_config(old, saved=True)
    assert cfg.method.name == "boosting_ticket" and not hasattr(cfg.method, "update_every")
    assert cfg.method.finder_epochs == 1
    # keys no method has are still refused
    p = tmp_path / "config.yaml"
    p.write_text("method: {name: dense, window: 5, colour: red}\n")
    with pytest.raises(ConfigError, match="method.colour"):
        load_config(p, saved=True)


def test_paper_flying_bird_plus_preset():
    cfg = load_config(ROOT / "configs" / "cifar10_flying_bird_plus.yaml")
    assert cfg.method.name == "flying_bird_plus" and cfg.method.density == 0.2
    assert (cfg.method.update_every, cfg.method.update_every_late, cfg.method.adapt_from_epoch) == (900, 1200, 100)
    assert cfg.data.name == "cifar10" and cfg.epochs == 200 and cfg.optim.milestones == [100.0, 150.0]


def test_flying_bird_presets_use_the_authors_regrowth_and_the_default_keeps_the_old_rule():
    from sparta.methods import _dynamic_args

    presets = sorted((ROOT / "configs").glob("*_flying_bird*.yaml"))
    assert len(presets) == 9  # cifar10, cifar100, tinyimagenet, mnist (x FB, FB+) and the demo
    for p in presets:
        expected = "exclusive" if p.name.startswith("demo") else "authors"
        assert load_config(p).method.regrowth == expected, p.name
    assert load_config(None, ["method.name=flying_bird"]).method.regrowth == "exclusive"
    cfg = load_config(ROOT / "configs" / "cifar10_flying_bird.yaml")
    assert _dynamic_args(cfg, steps_per_epoch=352)["regrowth"] == "authors"


def test_robust_bird_presets_and_the_authors_search_schedule():
    from sparta.methods import build_recipe

    for dataset in ("cifar10", "cifar100", "cifar10_vgg16", "cifar100_vgg16", "tinyimagenet"):
        unstructured = load_config(ROOT / "configs" / f"{dataset}_robust_bird.yaml")
        channel = load_config(ROOT / "configs" / f"{dataset}_robust_bird_channel.yaml")
        m = unstructured.method
        assert (m.max_search_epochs, m.min_search_epochs, m.search_milestones, m.eb_every_steps, m.bn_l1) == \
            (50, 0, [], None, 0.0)  # no L1 on the gammas for an unstructured ticket (the method's default)
        assert (channel.method.pruning, channel.method.bn_l1) == ("channel", 1e-4)
    # the authors' code: up to 200 search epochs, lr 0.1 then x0.1 from search epoch 50 (352 steps an epoch)
    cfg = load_config(ROOT / "configs" / "cifar10_robust_bird.yaml",
                      ["method.max_search_epochs=200", "method.search_milestones=[50]"])
    search = build_recipe(cfg)[0].cfg
    s = LrSchedule(search.optim, steps_per_epoch=352, epochs=search.epochs)
    assert search.epochs == 200 and s.lr_at(0) == 0.1 and s.lr_at(50 * 352 - 1) == 0.1
    assert s.lr_at(50 * 352) == pytest.approx(0.01) and s.lr_at(200 * 352 - 1) == pytest.approx(0.01)


def test_bad_search_setting_exits_with_one_line(tmp_path, capsys):
    from sparta.cli import main

    code = main(["train", str(ROOT / "configs" / "cifar10_robust_bird.yaml"), f"out_dir={tmp_path / 'r'}",
                 "method.min_search_epochs=60"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "method.min_search_epochs" in err[0], err
    assert not (tmp_path / "r").exists()


def _schedule(**optim) -> LrSchedule:
    cfg = from_dict({"optim": optim})
    return LrSchedule(cfg.optim, steps_per_epoch=10, epochs=20)


def test_multistep_by_hand():
    s = _schedule(lr=0.1, milestones=[10, 15], gamma=0.1)
    assert s.lr_at(0) == 0.1 and s.lr_at(99) == 0.1
    assert s.lr_at(100) == pytest.approx(0.01) and s.lr_at(150) == pytest.approx(0.001)


def test_warmup_then_multistep():
    s = _schedule(lr=0.1, milestones=[10], warmup_epochs=2, warmup_from=0.5)
    assert s.lr_at(0) == pytest.approx(0.05)
    assert s.lr_at(10) == pytest.approx(0.075)  # half way through the warm-up
    assert s.lr_at(20) == pytest.approx(0.1)


def test_cosine_and_per_epoch_stepping():
    s = _schedule(lr=0.2, schedule="cosine")
    assert s.lr_at(0) == pytest.approx(0.2)
    assert s.lr_at(100) == pytest.approx(0.1)
    assert s.lr_at(200) == pytest.approx(0.0, abs=1e-12)
    e = _schedule(lr=0.2, schedule="cosine", step_per="epoch")
    assert e.lr_at(15) == e.lr_at(10) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi / 20)))


def test_piecewise_linear():
    s = _schedule(lr=0.2, schedule="piecewise", knots=[[0, 0], [0.5, 1], [1, 0]])
    assert s.lr_at(0) == 0.0
    assert s.lr_at(50) == pytest.approx(0.1)
    assert s.lr_at(100) == pytest.approx(0.2)
    assert s.lr_at(150) == pytest.approx(0.1)
