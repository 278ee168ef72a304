"""After-training pruning: one-shot magnitude pruning and HYDRA, each followed by adversarial fine-tuning."""
import math
from pathlib import Path

import pytest
import torch
from conftest import Crash, checkpoint_of, crash_after, one_line_error, tiny_cfg, tiny_net, untimed
from torch import nn

from sparta.config import load_config
from sparta.errors import ConfigError
from sparta.experiment import prepare_resume, train
from sparta.methods import build_recipe, pretrain_config
from sparta.rundir import RunDir
from sparta.sparse.controllers import Dense
from sparta.sparse.hydra import HydraScores, scaled_score_init
from sparta.sparse.tickets import layer_counts
from sparta.stages import RunContext

ROOT = Path(__file__).resolve().parents[1] / "sparta"
# 128 training images in batches of 32: 4 steps an epoch
SMALL = ["data.train_subset=128", "method.density=0.2", "method.pretrain_epochs=1", "method.finetune_epochs=1"]
HYDRA = ["method.name=hydra", *SMALL, "method.score_epochs=2"]
MAGNITUDE = ["method.name=magnitude", *SMALL]


def prunable_names(state):
    return [k for k, v in state.items() if k.endswith("weight") and v.dim() >= 2]


def parameter_names(cfg):
    """Names of the trained network's parameters (not its buffers)."""
    from sparta.data import load_dataset
    from sparta.netspec import build_model, model_spec

    data = load_dataset(cfg.data.name, cfg.data.root, val_size=cfg.data.val_size, train_subset=cfg.data.train_subset)
    return [n for n, _ in build_model(model_spec(cfg, data)).named_parameters()]


# ------------------------------------------------------------------ pruning once by magnitude


def _pruned(tmp_path, *overrides):
    """The ticket that magnitude's pretrain transition draws from tiny_net's weights."""
    cfg = tiny_cfg(tmp_path, *MAGNITUDE, *overrides)
    model = tiny_net()
    run = RunContext(model, {}, torch.device("cpu"))
    build_recipe(cfg)[0].after(run, Dense())
    return {n: p.detach() for n, p in model.named_parameters() if p.dim() >= 2}, run.carry.ticket


@pytest.mark.parametrize("distribution", ["uniform", "igq"])
def test_layer_scope_keeps_exact_counts_of_the_largest_weights(tmp_path, distribution):
    weights, masks = _pruned(tmp_path, "method.scope=layer", f"method.distribution={distribution}")
    counts = layer_counts({n: w.shape for n, w in weights.items()}, 0.2, distribution)
    total = sum(w.numel() for w in weights.values())
    assert sum(counts.values()) == round(0.2 * total)
    for name, w in weights.items():
        mask = masks[name]
        assert int(mask.sum()) == counts[name]
        if distribution == "uniform":  # 0.weight: 216 -> 43.2, 3.weight: 1152 -> 230.4, 6.weight: 160 -> 32
            assert abs(counts[name] - 0.2 * w.numel()) <= 1
        assert w.abs()[mask].min() >= w.abs()[~mask].max()  # the largest of the layer survive


def test_global_scope_keeps_the_largest_weights_over_all_layers(tmp_path):
    weights, masks = _pruned(tmp_path, "method.scope=global")
    kept = torch.cat([w.abs()[masks[n]] for n, w in weights.items()])
    dropped = torch.cat([w.abs()[~masks[n]] for n, w in weights.items()])
    assert kept.numel() == round(0.2 * (kept.numel() + dropped.numel())) and kept.min() >= dropped.max()
    # one threshold: the layers' densities differ (tiny_net's default init scales by fan-in)
    assert len({round(float(masks[n].float().mean()), 3) for n in masks}) > 1


def test_global_scope_refuses_a_layer_distribution(tmp_path):
    with pytest.raises(ConfigError, match="scope=global"):
        tiny_cfg(tmp_path, *MAGNITUDE, "method.scope=global", "method.distribution=erk")
    with pytest.raises(ConfigError, match="method.score_epochs is a setting of hydra, not of magnitude"):
        tiny_cfg(tmp_path, *MAGNITUDE, "method.score_epochs=3")


def test_magnitude_end_to_end_pruned_weights_stay_zero(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", *MAGNITUDE, "method.finetune_epochs=2")
    summary = train(cfg)
    assert [s["name"] for s in summary["stages"]] == ["pretrain", "finetune"]
    records = RunDir(cfg.run_dir).read_metrics()
    assert [(r["stage"], r["epoch"]) for r in records] == [("pretrain", 1), ("finetune", 1), ("finetune", 2)]

    # fine-tuning: 8 steps, lr 0.01 cosine to 0; a record's lr is that of its epoch's last step (3, 7)
    def cosine(step):
        return 0.01 * 0.5 * (1 + math.cos(math.pi * step / 8))

    assert [r["lr"] for r in records][1:] == pytest.approx([cosine(3), cosine(7)], abs=1e-15)
    ckpt = checkpoint_of(cfg)
    for name, mask in ckpt["masks"].items():
        assert torch.all(ckpt["model"][name][~mask] == 0) and bool((ckpt["model"][name][mask] != 0).any())
    assert summary["density_final"] == pytest.approx(0.2, abs=1e-5)


# ------------------------------------------------------------------ HYDRA's scores


def test_score_init_is_the_scaled_weight_magnitude():
    w = torch.tensor([[0.5, -2.0, 1.0], [0.0, 1.5, -0.25]])  # linear (2 out, 3 in): fan_in 3
    assert torch.allclose(scaled_score_init(w), math.sqrt(6 / 3) * w / 2.0)
    conv = torch.randn(4, 2, 3, 3)
    assert torch.allclose(scaled_score_init(conv), math.sqrt(6 / 18) * conv / conv.abs().max())


def test_straight_through_gradient_by_hand():
    """One linear layer y = (w * m) x, m = the 3 largest |s| of 6: dL/ds = dL/d(w*m) * w * sign(s)."""
    layer = nn.Linear(3, 2, bias=False)
    w = torch.tensor([[0.5, -1.0, 0.25], [2.0, -0.5, 1.0]])
    with torch.no_grad():
        layer.weight.copy_(w)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    hydra = HydraScores(layer, optimizer, {"weight": 3})
    s = torch.tensor([[0.3, -0.9, 0.1], [0.8, 0.2, -0.05]])  # |s| top 3: (0,1), (1,0), (0,0)
    with torch.no_grad():
        hydra.scores["weight"].copy_(s)
    hydra.after_step(0)
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.equal(layer.weight.detach(), w * m)
    x, y = torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([1])
    nn.functional.cross_entropy(layer(x), y).backward()
    hydra.after_backward(0)
    # by hand: logits z = (w*m) x = [0.5 - 2, 2] = [-1.5, 2]; dL/dz = softmax(z) - onehot(1); dL/d(w*m) = dL/dz x^T
    e = math.exp(-1.5) / (math.exp(-1.5) + math.exp(2.0))
    dz = torch.tensor([e, (1 - e) - 1.0])
    g = dz[:, None] * x[0][None, :]
    expected = g * w * torch.sign(s)
    assert torch.allclose(hydra.scores["weight"].grad, expected, atol=1e-7)
    # where s > 0 it is the weight-masked gradient dL/d(w*m) * w itself, pruned positions included
    assert torch.allclose(hydra.scores["weight"].grad[s > 0], (g * w)[s > 0])
    assert layer.weight.grad is None  # frozen: the optimizer does not move the weight
    optimizer.step()
    hydra.after_step(1)
    assert torch.allclose(hydra.scores["weight"].detach(), s - 0.1 * expected)
    assert torch.equal(hydra.weights["weight"], w)
    new_mask = torch.zeros(6, dtype=torch.bool)
    new_mask[(s - 0.1 * expected).abs().reshape(-1).topk(3).indices] = True
    assert torch.equal(layer.weight.detach(), w * new_mask.view(2, 3).float())


def test_score_stage_freezes_weights_learns_scores_and_keeps_exact_layer_counts(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", *HYDRA)
    with pytest.raises(Crash):
        train(cfg, on_epoch=crash_after(1, stage="pretrain"))
    pretrained = checkpoint_of(cfg)["model"]  # the end of pretraining (its only epoch)
    resumed = prepare_resume(cfg.run_dir, [], force=False)
    with pytest.raises(Crash):
        train(resumed, resume=True, on_epoch=crash_after(2, stage="score"))
    ckpt = checkpoint_of(cfg)
    assert ckpt["stage"] == "score"
    masks, state = ckpt["masks"], ckpt["controller"]
    names = prunable_names(pretrained)
    counts = layer_counts({n: pretrained[n].shape for n in names}, 0.2, "uniform")
    for name in names:
        assert torch.equal(state["weights"][name], pretrained[name])  # the pretrained w, bit for bit
        assert torch.equal(ckpt["model"][name], pretrained[name] * masks[name])  # forward through w * m
        assert int(masks[name].sum()) == counts[name]  # top-k per layer, exact
        top = torch.zeros(masks[name].numel(), dtype=torch.bool)
        top[state["scores"][name].abs().reshape(-1).topk(counts[name]).indices] = True
        assert torch.equal(masks[name], top.view_as(masks[name]))
        assert not torch.equal(state["scores"][name], scaled_score_init(pretrained[name]))  # learned
    for name in set(parameter_names(cfg)) - set(names):  # biases, BN affine: untouched
        assert torch.equal(ckpt["model"][name], pretrained[name]), name
    summary = train(prepare_resume(cfg.run_dir, [], force=False), resume=True)
    final = checkpoint_of(cfg)
    for name in names:  # the learned mask is kept; survivors start from (and stay off) their pretrained values
        assert torch.equal(final["masks"][name], masks[name])
        assert torch.all(final["model"][name][~masks[name]] == 0)
    records = RunDir(cfg.run_dir).read_metrics()
    score = [r for r in records if r["stage"] == "score"]
    assert score[-1]["score_mask_changed"] == summary["score_mask_changed"] > 0


def test_summary_counts_every_stage(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", *HYDRA, "method.score_epochs=1")
    summary = train(cfg)
    stages = summary["stages"]
    assert [s["name"] for s in stages] == ["pretrain", "score", "finetune"]
    assert [s["steps"] for s in stages] == [4, 4, 4] and summary["steps"] == 4
    assert summary["train_flops"] == pytest.approx(sum(s["train_flops"] for s in stages))
    # the score stage is charged as dense (it needs every weight's gradient); fine-tuning at density 0.2 is cheaper
    assert stages[1]["train_flops"] == pytest.approx(stages[0]["train_flops"])
    assert 0 < stages[2]["train_flops"] < stages[0]["train_flops"]
    assert summary["density_final"] == pytest.approx(0.2, abs=1e-5)


@pytest.mark.parametrize("method,crash", [
    (HYDRA, ("score", 1)), ([*HYDRA, "method.finetune_epochs=2"], ("finetune", 1)),
    ([*MAGNITUDE, "method.finetune_epochs=2"], ("finetune", 1)),
], ids=["hydra-mid-score", "hydra-mid-finetune", "magnitude-mid-finetune"])
def test_resume_equals_uninterrupted(tmp_path, method, crash):
    a = tiny_cfg(tmp_path / "a", *method)
    sa = train(a)
    b = tiny_cfg(tmp_path / "b", *method)
    with pytest.raises(Crash):
        train(b, on_epoch=crash_after(crash[1], stage=crash[0]))
    sb = train(prepare_resume(b.run_dir, [], force=False), resume=True)
    ca, cb = checkpoint_of(a), checkpoint_of(b)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert all(torch.equal(ca["masks"][k], cb["masks"][k]) for k in ca["masks"])
    assert untimed(RunDir(a.run_dir).read_metrics()) == untimed(RunDir(b.run_dir).read_metrics())
    for key in ("ra_final", "sa_final", "train_flops", "score_mask_changed"):
        assert sa.get(key) == sb.get(key), key


# ------------------------------------------------------------------ method.pretrained


def test_pretrained_checkpoint_replaces_the_pretrain_stage(tmp_path):
    dense = tiny_cfg(tmp_path / "dense", "data.train_subset=128", epochs=1)
    dense_summary = train(dense)
    path = str(RunDir(dense.run_dir).last)
    weights = checkpoint_of(dense)["model"]
    cfg = tiny_cfg(tmp_path / "run", *HYDRA, f"method.pretrained={path}")
    with pytest.raises(Crash):
        train(cfg, on_epoch=crash_after(1, stage="score"))
    state = checkpoint_of(cfg)["controller"]
    assert all(torch.equal(state["weights"][n], weights[n]) for n in prunable_names(weights))
    summary = train(prepare_resume(cfg.run_dir, [], force=False), resume=True)
    assert [s["name"] for s in summary["stages"]] == ["score", "finetune"]
    info = summary["pretrained"]
    assert info["path"] == path and info["cost_included"] is False and info["epochs"] == 1
    assert info["train_flops"] == pytest.approx(dense_summary["train_flops"])
    assert summary["train_flops"] == pytest.approx(sum(s["train_flops"] for s in summary["stages"]))
    magnitude = tiny_cfg(tmp_path / "mag", *MAGNITUDE, f"method.pretrained={path}")
    assert [s["name"] for s in train(magnitude)["stages"]] == ["finetune"]


def test_wrong_pretrained_checkpoint_is_one_line(tmp_path, capsys):
    dense = tiny_cfg(tmp_path / "dense", "data.train_subset=64", "model.base_width=8", epochs=1)
    train(dense)
    path = RunDir(dense.run_dir).last
    args = ["train", str(ROOT / "configs" / "demo.yaml"), "epochs=1", "batch_size=32", "data.train_subset=64",
            "model.name=small_cnn", "attack.steps=1", "eval.steps=1", "eval.test_subset=32", "progress=none",
            "method.name=hydra", "method.score_epochs=1", "method.finetune_epochs=1"]
    wrong = tmp_path / "wrong"
    one_line_error(capsys, [*args, f"out_dir={wrong}", "model.base_width=16", f"method.pretrained={path}"],
                   "is another network: kwargs")
    assert not wrong.exists()  # refused before the run directory is written
    one_line_error(capsys, [*args, f"out_dir={wrong}", "model.base_width=8", f"method.pretrained={tmp_path / 'no.pt'}"],
                   "does not exist")
    sparse = tiny_cfg(tmp_path / "sparse", "data.train_subset=64", "model.base_width=8", "method.name=static", epochs=1)
    train(sparse)
    one_line_error(capsys, [*args, f"out_dir={wrong}", "model.base_width=8",
                            f"method.pretrained={RunDir(sparse.run_dir).last}"], "holds a sparse network")


# ------------------------------------------------------------------ schedules and presets


def test_pretrain_scales_the_run_schedule(tmp_path):
    cfg = tiny_cfg(tmp_path, "optim.schedule=multistep", "optim.milestones=[100,150]", epochs=200)
    stage = pretrain_config(cfg, 100)
    assert stage.epochs == 100 and stage.optim.milestones == [50.0, 75.0] and cfg.optim.milestones == [100.0, 150.0]


@pytest.mark.parametrize("preset", ["cifar10_hydra", "cifar100_hydra", "cifar10_magnitude", "cifar100_magnitude"])
def test_presets(preset):
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml")
    m = cfg.method
    assert cfg.name == preset and m.density == 0.1 and m.distribution == "uniform" and m.pretrained is None
    assert (m.pretrain_epochs, m.finetune_epochs, m.finetune_lr) == (100, 100, 0.01)
    stages = build_recipe(cfg)
    if m.name == "hydra":
        assert (m.score_epochs, m.score_lr) == (20, 0.1)
        assert [(s.name, s.cfg.epochs, s.cfg.optim.lr) for s in stages] == [
            ("pretrain", 100, 0.1), ("score", 20, 0.1), ("finetune", 100, 0.01)]
    assert stages[0].cfg.optim.milestones == [50.0, 75.0]
