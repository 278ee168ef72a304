"""FLOPs accounting (sparta.flops): per-layer counts by hand, sparse inference, the per-step
training cost checked against FlopCounterMode on real attack/training steps, the meter, the CLI,
the summary.json FLOPs keys of tiny runs."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sparta.flops as flops
from sparta import cli
from sparta.attacks.pgd import pgd
from sparta.attacks.trades import trades_attack, trades_loss
from sparta.commands import flops as flops_command
from sparta.config import load_config
from sparta.errors import CheckpointError, SpartaError
from sparta.flops import (
    LayerFlops,
    TrainingCostMeter,
    attack_full_backward_flops,
    dense_training_flops,
    forward_flops_by_layer,
    full_backward_multiplier,
    inference_flops,
    paper_table_flops,
    savings,
    step_flops_per_image,
    step_multiplier,
)
from sparta.models import create_model
from sparta.sparse.masks import MaskSet

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


class Toy(nn.Module):
    """Conv2d(3, 8, 3, padding=1) on 3x8x8 -> ReLU -> flatten (512) -> Linear(512, 10)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


CONV = 2 * 3 * 8 * 9 * 8 * 8  # 2 * C_in * C_out * k^2 * H_out * W_out
FC = 2 * 512 * 10
TOY = CONV + FC


# ---------------------------------------------------------------- per-layer dense counts


def test_single_conv_by_hand():
    lf = forward_flops_by_layer(nn.Conv2d(3, 8, 3, padding=1), (3, 32, 32))
    assert lf.per_weight == {"weight": 2 * 3 * 8 * 9 * 32 * 32}
    assert lf.other == 0 and lf.total == 2 * 3 * 8 * 9 * 32 * 32
    assert lf.input_shape == (3, 32, 32)


def test_single_linear_by_hand():
    lf = forward_flops_by_layer(nn.Linear(100, 10), (1, 1, 100))
    assert lf.per_weight == {"weight": 2 * 100 * 10} and lf.total == 2000


def test_strided_and_grouped_conv():
    lf = forward_flops_by_layer(nn.Conv2d(3, 16, 3, stride=2, padding=1), (3, 32, 32))
    assert lf.total == 2 * 3 * 16 * 9 * 16 * 16  # 32 -> 16
    lf = forward_flops_by_layer(nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 10, 10))  # depthwise
    assert lf.total == 2 * 1 * 8 * 9 * 10 * 10


def test_model_names_are_parameter_names():
    model = Toy()
    lf = forward_flops_by_layer(model, (3, 8, 8))
    assert lf.per_weight == {"conv.weight": CONV, "fc.weight": FC}
    assert set(lf.per_weight) == set(MaskSet.from_model(model).masks)
    assert lf.other == 0 and lf.total == TOY


def test_wrapper_prefix_dropped_and_nested_modules_and_reuse():
    class Block(nn.Module):  # owns a weight AND has a hooked child: each gets only its own FLOPs
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))
            self.inner = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.inner(x @ self.weight.t())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            x = self.shared(self.shared(self.block(x)))  # called twice: counted twice
            return x @ torch.ones(4, 2)  # a matmul outside any weight-owning module: "other"

    net = nn.DataParallel(Net())  # CPU: a plain wrapper whose names start with "module."
    lf = forward_flops_by_layer(net, (1, 1, 4))
    assert lf.per_weight == {"block.weight": 32, "block.inner.weight": 32, "shared.weight": 64}
    assert lf.other == 2 * 4 * 2


def test_modes_restored_and_batchnorm_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model.train()
    model[1].eval()  # a mixed state, as bn_mode produces
    running = model[1].running_mean.clone()
    forward_flops_by_layer(model, (3, 8, 8))
    assert model.training and model[0].training and not model[1].training and model[3].training
    assert torch.equal(model[1].running_mean, running)
    assert all(p.grad is None for p in model.parameters())


def test_preact_resnet18_about_056_giga_multiply_adds():
    model = create_model("preact_resnet18", num_classes=10, in_channels=3, image_size=32, mean=(0.5,) * 3,
                         std=(0.5,) * 3)
    lf = forward_flops_by_layer(model, (3, 32, 32))
    assert lf.total == pytest.approx(1.11e9, rel=0.03)  # 0.56 G multiply-adds
    assert lf.per_weight["body.conv1.weight"] == 2 * 3 * 64 * 9 * 32 * 32
    assert lf.per_weight["body.linear.weight"] == 2 * 512 * 10
    assert set(lf.per_weight) == set(MaskSet.from_model(model).masks) and lf.other == 0


def test_igq_at_density_02_keeps_about_half_the_flops_of_preact_resnet18():
    """The FLOPs fraction depends on how the density is spread over layers: IGQ (and ERK) keep the
    early layers (few weights, many FLOPs per weight) dense-ish, so density 0.2 keeps ~52% of the
    inference FLOPs, while uniform layer densities keep 20%."""
    model = create_model("preact_resnet18", num_classes=10, in_channels=3, image_size=32, mean=(0.5,) * 3,
                         std=(0.5,) * 3)
    lf = forward_flops_by_layer(model, (3, 32, 32))

    def fraction(distribution: str) -> float:
        masks = MaskSet.random(model, 0.2, distribution, seed=0)
        assert (sum(int(m.sum()) for m in masks.masks.values())
                == round(0.2 * sum(m.numel() for m in masks.masks.values())))
        return inference_flops(lf, flops.mask_densities(masks)) / lf.total

    assert fraction("igq") == pytest.approx(0.52, abs=0.01)
    assert fraction("erk") == pytest.approx(0.51, abs=0.01)
    assert fraction("uniform") == pytest.approx(0.2, abs=1e-3)


# ---------------------------------------------------------------- sparse inference


def test_half_density_on_one_layer():
    model = Toy()
    lf = forward_flops_by_layer(model, (3, 8, 8))
    masks = MaskSet.from_model(model)
    masks["conv.weight"].view(-1)[: masks["conv.weight"].numel() // 2] = False
    d = masks.layer_densities()
    assert d["conv.weight"] == 0.5
    assert inference_flops(lf, d) == TOY - CONV / 2
    assert inference_flops(lf, {"conv.weight": 0.5}) == TOY - CONV / 2  # absent layers count at 1
    assert inference_flops(lf) == inference_flops(lf, {}) == TOY
    with pytest.raises(ValueError, match="module.conv.weight"):
        inference_flops(lf, {"module.conv.weight": 0.5})
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        inference_flops(lf, {"conv.weight": 1.5})


# ---------------------------------------------------------------- training cost per step


def test_step_multipliers():
    assert step_multiplier(0, "ce") == 3  # clean training
    assert step_multiplier(1, "ce") == 5  # FGSM
    assert step_multiplier(10, "ce") == 23  # PGD-10
    assert step_multiplier(10, "trades") == 27  # 1 clean target forward + 2k + 6
    lf = LayerFlops({"w": 100.0}, other=1.0)
    assert step_flops_per_image(lf, {"w": 0.5}, attack_steps=2, objective="ce") == 7 * 51.0
    with pytest.raises(ValueError, match="objective"):
        step_multiplier(2, "kl")
    with pytest.raises(ValueError, match="attack_steps"):
        step_multiplier(-1, "ce")


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_formulas_match_flop_counter_on_real_steps():
    """PGD iteration = 2F exactly; a CE training step = 3F and a TRADES step = 6F, minus the first
    layer's input gradient that autograd skips (the documented 0.3% overcount)."""
    torch.manual_seed(0)
    model, b, k = Toy(), 4, 2
    x, y = torch.rand(b, 3, 8, 8), torch.randint(0, 10, (b,))
    holder = {}
    attack = _counted(lambda: holder.update(x_adv=pgd(model, x, y, eps=0.1, alpha=0.02, steps=k)))
    assert attack == b * 2 * k * TOY
    train = _counted(lambda: F.cross_entropy(model(holder["x_adv"]), y).backward())
    assert train == b * (3 * TOY - CONV)
    # TRADES. (A lambda, not the module: FlopCounterMode's module tracker cannot hook a module whose
    # input is the leaf the attack differentiates.)
    attack = _counted(lambda: holder.update(x_adv=trades_attack(lambda z: model(z + 0), x, eps=0.1, alpha=0.02,
                                                                steps=k)))
    assert attack == b * (2 * k + 1) * TOY
    train = _counted(lambda: trades_loss(model(x), model(holder["x_adv"]), y, 6.0).backward())
    assert train == b * (6 * TOY - 2 * CONV)


def test_paper_table_formula_full_backward_and_dense_equivalent():
    assert paper_table_flops(200, 45_000, 1e9) == 200 * 45_000 * 33 * 1e9  # PGD-10: 33 x F
    assert paper_table_flops(2, 10, 5.0, attack_steps=3) == 2 * 10 * 12 * 5.0
    assert paper_table_flops(1, 1, 2.0, attack_steps=0) == 6.0  # clean training: forward + full backward
    with pytest.raises(ValueError, match="epochs"):
        paper_table_flops(1.5, 10, 1.0)
    with pytest.raises(ValueError, match="attack_steps"):
        paper_table_flops(1, 10, 1.0, attack_steps=-1)
    assert full_backward_multiplier(10, "ce") == 33 and full_backward_multiplier(0, "ce") == 3
    assert full_backward_multiplier(3, "trades") == 1 + 3 * 3 + 6
    # a CE PGD-10 stage of 4 images at 1 FLOP (23 each) and a TRADES k=3 stage of 2 images at 1 FLOP
    # (13 each): re-charged at 33 and 16 per image
    stages = [{"total": 4 * 23.0, "attack_steps": 10, "objective": "ce"},
              {"total": 2 * 13.0, "attack_steps": 3, "objective": "trades"}]
    assert attack_full_backward_flops(stages) == pytest.approx(4 * 33 + 2 * 16)
    assert attack_full_backward_flops([]) == 0.0
    lf = LayerFlops({"w": 10.0})
    assert dense_training_flops(lf, steps_images=12, attack_steps=10, objective="ce") == 12 * 23 * 10.0
    assert savings(25.0, 100.0) == 0.75
    with pytest.raises(ValueError):
        savings(1.0, 0.0)


def test_attack_steps_of_config():
    cfg = load_config(None)
    assert flops.attack_steps_of(cfg) == 10
    cfg.attack.name = "fgsm"
    assert flops.attack_steps_of(cfg) == 1
    cfg.attack.name = "none"
    assert flops.attack_steps_of(cfg) == 0


# ---------------------------------------------------------------- the meter


def test_meter_integrates_density_over_steps():
    """PGD-2 (7 F per image), batch 4. A topology update during step 2 (in after_backward, i.e. before
    that step's meter.step) counts from step 3 on; another during step 4 from step 5 on."""
    model = Toy()
    lf = forward_flops_by_layer(model, (3, 8, 8))
    masks = MaskSet.from_model(model)
    meter = TrainingCostMeter(lf, attack_steps=2, objective="ce")
    conv = masks["conv.weight"].view(-1)
    meter.step(4, masks)  # step 1: dense
    conv[: conv.numel() // 2] = False  # step 2's after_backward: conv at density 0.5
    meter.step(4, masks)
    meter.step(4, masks)  # step 3: at the new density
    masks["fc.weight"].zero_()  # step 4's after_backward: fc at density 0
    meter.step(4, masks)
    meter.step(4, masks)  # step 5
    half = TOY - CONV / 2
    expected = 4 * 7 * (TOY + TOY + half + half + (half - FC))
    assert meter.total == expected
    assert meter.images == 20 and meter.steps == 5 and meter.stage_totals() == [expected]


def test_meter_first_step_uses_masks_as_given_and_dense_none():
    lf = LayerFlops({"a": 100.0, "b": 50.0})
    meter = TrainingCostMeter(lf, attack_steps=0, objective="ce")
    meter.step(2, None)
    assert meter.total == 2 * 3 * 150.0
    masks = {"a": torch.zeros(10, dtype=torch.bool), "b": torch.ones(4, dtype=torch.bool)}
    meter.reset_stage(lf, attack_steps=1, objective="trades")  # 2k + 7 = 9
    meter.step(3, masks)  # a plain mapping of bool masks works too; first step of the stage: these masks
    assert meter.total == 2 * 3 * 150.0 + 3 * 9 * 50.0
    assert meter.stage_totals() == [900.0, 1350.0] and meter.stage_total == 1350.0
    assert [s["objective"] for s in meter.state_dict()["stages"]] == ["ce", "trades"]
    with pytest.raises(TypeError, match="masks"):
        meter.step(1, [torch.ones(3, dtype=torch.bool)])


def test_meter_recomputes_only_when_masks_change(monkeypatch):
    model = Toy()
    lf = forward_flops_by_layer(model, (3, 8, 8))
    masks = MaskSet.from_model(model)
    calls = []
    real = flops.mask_densities
    monkeypatch.setattr(flops, "mask_densities", lambda m: calls.append(1) or real(m))
    meter = TrainingCostMeter(lf, attack_steps=10, objective="ce")
    for _ in range(100):
        meter.step(8, masks)
        masks.mask_grads_()  # the hot path leaves the bool masks alone
        masks.apply_()
    assert len(calls) == 1
    masks["conv.weight"][0].fill_(False)  # in place: the version counter moves
    meter.step(8, masks)
    assert len(calls) == 2
    for _ in range(10):
        meter.step(8, masks)
    assert len(calls) == 2
    masks.load_state_dict(masks.state_dict())  # copy_ into the masks counts as a change (harmless)
    meter.step(8, masks)
    assert len(calls) == 3
    d = 1 - 9 * 3 / (8 * 3 * 9)  # one output channel of 8 dropped
    per_image_dense, per_image_sparse = 23 * TOY, 23 * (TOY - CONV * (1 - d))
    assert meter.total == pytest.approx(8 * (101 * per_image_dense + 11 * per_image_sparse), rel=1e-12)


def test_meter_state_dict_round_trip(tmp_path):
    model = Toy()
    lf = forward_flops_by_layer(model, (3, 8, 8))

    def run(stop_after: int | None) -> TrainingCostMeter:
        masks = MaskSet.from_model(model)
        meter = TrainingCostMeter(lf, attack_steps=0, objective="ce")
        for _ in range(4):
            meter.step(5, masks)
        meter.reset_stage(lf, attack_steps=2, objective="ce")
        for i in range(6):
            if stop_after is not None and i == stop_after:
                path = tmp_path / "meter.pt"
                torch.save(meter.state_dict(), path)
                meter = TrainingCostMeter(lf, attack_steps=2, objective="ce")  # a resumed run: this stage's settings
                meter.load_state_dict(torch.load(path, weights_only=True))
            meter.step(5, masks)
            if i == 1:
                masks["conv.weight"][:4].fill_(False)  # topology update in step i's after_backward
        return meter

    full, resumed = run(None), run(3)
    assert resumed.total == full.total
    assert resumed.state_dict() == full.state_dict()
    state = full.state_dict()
    assert isinstance(state["total"], float) and [s["images"] for s in state["stages"]] == [20, 30]


# ---------------------------------------------------------------- CLI


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_flops_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_on_config(capsys):
    assert cli.cmd_flops(_args(str(ROOT / "configs" / "demo.yaml"))) == 0
    out = capsys.readouterr().out
    assert "body.layer4.1.conv2.weight" in out and "total" in out and "paper table formula" in out
    r = flops_command.flops_report(ROOT / "configs" / "demo.yaml", ["attack.steps=3"])
    assert r["input_shape"] == [1, 8, 8] and r["attack_steps"] == 3 and r["step_multiplier"] == 9
    assert r["train_images"] == 1297 - 200  # digits, default val_size
    assert r["inference_flops"] == r["inference_flops_dense"]
    assert r["paper_table_run_flops"] == paper_table_flops(15, 1097, r["inference_flops"], 3)
    trades = flops_command.flops_report(ROOT / "configs" / "demo.yaml", ["objective.name=trades"])
    assert trades["paper_table_run_flops"] is None and trades["step_multiplier"] == 2 * 7 + 7
    assert "not given for objective trades" in flops_command.format_report(trades)


def test_cli_on_sparse_config():
    r = flops_command.flops_report(ROOT / "configs" / "cifar10_flying_bird.yaml", ["method.density=0.1"])
    assert r["inference_flops_dense"] == pytest.approx(1.11e9, rel=0.03)
    assert r["inference_flops"] < 0.5 * r["inference_flops_dense"]
    assert r["train_images"] == 45_000 and r["step_multiplier"] == 23


@pytest.mark.parametrize("overrides,densities_from,note,epochs", [
    ([], "dense (method dense)", "", 200),
    (["method.name=static"], "initial mask of static: igq", "", 200),
    (["method.name=flying_bird_plus"], "initial mask of flying_bird_plus", "", 200),
    (["method.name=robust_bird"], "estimate for robust_bird", "search (at most 50 epochs)", 200),
    (["method.name=robust_bird", "method.pruning=channel"], "dense: a channel ticket is a smaller network",
     "search (at most 50 epochs)", 200),
    (["method.name=boosting_ticket"], "estimate for boosting_ticket", "finder (20 epochs)", 200),
    (["method.name=hydra"], "estimate for hydra: the ticket's layer densities are only known once drawn; shown: "
     "uniform", "pretrain (100 epochs), score (20 epochs)", 100),
    (["method.name=magnitude", "method.pretrained=dense.pt"], "estimate for magnitude", "", 100),
])
def test_a_config_counts_what_its_method_class_plans(overrides, densities_from, note, epochs):
    """The masks shown (none, the initial random mask, an estimate, or dense for a channel ticket), the
    final stage's epochs and the earlier stages the run estimates leave out, as each method's class plans them."""
    r = flops_command.flops_report(ROOT / "sparta" / "configs" / "cifar10_pgd.yaml", overrides)
    assert r["densities_from"].startswith(densities_from) and r["epochs"] == epochs
    assert r["note"].endswith(note) and (note == "") == (r["note"] == "")


def test_dataset_table_matches_readers():
    from sparta.data import load_dataset

    cfg = load_config(None, ["data.name=digits"])
    data = load_dataset("digits", None)
    c, size, classes, n, _ = flops_command.dataset_facts(cfg)
    assert (c, size, classes, n) == (data.in_channels, data.image_size, data.num_classes, len(data.train))
    if (SHARED / "mnist").is_dir():
        cfg = load_config(None, ["data.name=mnist", f"data.root={SHARED / 'mnist'}", "data.val_size=1000"])
        data = load_dataset("mnist", cfg.data.root, val_size=1000)
        assert flops_command.dataset_facts(cfg)[:4] == (data.in_channels, data.image_size, data.num_classes,
                                                        len(data.train))


def test_cli_on_checkpoint(tmp_path, capsys):
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    spec = {"name": "small_cnn", "kwargs": {}, "num_classes": 10, "in_channels": 1, "image_size": 8,
            "mean": [0.3], "std": [0.3]}
    model = create_model("small_cnn", num_classes=10, in_channels=1, image_size=8, mean=[0.3], std=[0.3])
    masks = MaskSet.from_model(model)
    masks["body.features.2.weight"][: 32].fill_(False)  # half of the 64 output channels
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_spec": spec, "masks": masks.state_dict(),
                "config": cfg.to_dict(), "epoch": 1, "step": 10}, path)
    lf = forward_flops_by_layer(model, (1, 8, 8))
    r = flops_command.flops_report(path)
    assert r["kind"] == "checkpoint"
    assert r["inference_flops"] == inference_flops(lf, {"body.features.2.weight": 0.5})
    assert r["inference_flops"] == lf.total - lf.per_weight["body.features.2.weight"] / 2
    assert r["step_flops_per_image"] == 17 * r["inference_flops"]  # demo: PGD-7
    assert cli.cmd_flops(_args(str(path), "attack.name=none")) == 0
    assert "body.features.2.weight" in capsys.readouterr().out


def test_cli_bad_paths(tmp_path):
    with pytest.raises(SpartaError, match="does not exist"):
        cli.cmd_flops(_args(str(tmp_path / "missing.yaml")))
    with pytest.raises(SpartaError, match="directory"):
        cli.cmd_flops(_args(str(tmp_path)))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        cli.cmd_flops(_args(str(junk)))


# ---------------------------------------------------------------- summary.json of tiny runs


def _tiny_run(tmp_path, name, *overrides):
    from conftest import tiny_cfg

    from sparta.experiment import train

    return train(tiny_cfg(tmp_path / name, *overrides))


def test_summary_flops_keys_of_tiny_runs(tmp_path):
    """Dense PGD-3 (one stage), a boosting ticket (a 2-epoch dense finder, then 1 sparse epoch) and
    TRADES: the paper-table key is the final stage's epochs x training images x (3k + 3) x final F, plus
    an earlier stage's images x (3k + 3) x dense F;
    the full-backward key re-charges every stage's steps with attack steps at 3F."""
    images = 512  # TINY: data.train_subset
    dense = _tiny_run(tmp_path, "dense", "epochs=2")
    assert dense["train_flops_paper_table"] == 2 * images * (3 * 3 + 3) * dense["inference_flops"]
    assert dense["inference_flops"] == dense["inference_flops_dense"]
    # one stage at constant density: every step is charged 9 F; with full-backward attack steps 12 F
    assert dense["train_flops"] == pytest.approx(2 * images * 9 * dense["inference_flops"])
    assert dense["train_flops_attack_full_backward"] == pytest.approx(dense["train_flops"] * 12 / 9)
    assert "train_flops_paper_convention" not in dense

    boost = _tiny_run(tmp_path, "boost", "epochs=1", "method.name=boosting_ticket", "method.density=0.2",
                      "method.finder_epochs=2")
    assert [s["name"] for s in boost["stages"]] == ["finder", "train"]
    assert boost["inference_flops"] < boost["inference_flops_dense"]
    # the final stage (1 epoch at the ticket's F) plus the finder's 2 dense FGSM epochs at (3 x 1 + 3) x dense F,
    # as the paper's table counts Robust Bird's search stage
    assert boost["train_flops_paper_table"] == pytest.approx(
        1 * images * 12 * boost["inference_flops"] + 2 * images * 6 * boost["inference_flops_dense"])
    finder, ticket = (s["train_flops"] for s in boost["stages"])
    assert finder == pytest.approx(2 * images * 5 * boost["inference_flops_dense"])  # dense FGSM: 2k + 3 = 5
    assert boost["train_flops_attack_full_backward"] == pytest.approx(finder * 6 / 5 + ticket * 12 / 9)

    trades = _tiny_run(tmp_path, "trades", "epochs=1", "objective.name=trades")
    assert trades["train_flops_paper_table"] is None
    assert (trades["train_flops_attack_full_backward"]
            == pytest.approx(trades["train_flops"] * (3 * 3 + 7) / (2 * 3 + 7)))


@pytest.mark.parametrize("override,message", [
    ("data.val_size=50000", "data.val_size must be an integer in [0, 49999] for cifar10"),
    ("data.train_subset=45001", "data.train_subset must be an integer in [1, 45000] for cifar10 with val_size=5000"),
])
def test_a_config_split_that_does_not_fit_is_refused_as_the_reader_refuses_it(override, message):
    """``sparta flops CONFIG`` counts the training images from the dataset's facts with the reader's
    own split rule (``data.split_sizes``), so it refuses what training would refuse, in the same words."""
    from sparta.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        flops_command.flops_report(ROOT / "configs" / "cifar10_pgd.yaml", [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert flops_command.flops_report(ROOT / "configs" / "cifar10_pgd.yaml", ["data.train_subset=500"])[
        "train_images"] == 500
