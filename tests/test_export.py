"""``sparta export``: the benchmark-named state_dict, the standalone architecture and the result card.

Checkpoints are written directly (no training): a narrow network on the 8x8 digits with random BN
statistics, a random unstructured mask, or a channel ticket slimmed by ``sparta.sparse.channels``.
"""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg

import sparta
from sparta import checkpoint
from sparta.cli import main
from sparta.data import load_dataset
from sparta.errors import ConfigError
from sparta.experiment import load_model
from sparta.export import CARD_EPS, benchmark_name, export_checkpoint
from sparta.netspec import build_model, example_input, model_spec
from sparta.sparse.select import prunable_parameters

ROOT = Path(sparta.__file__).resolve().parents[1]


def write_checkpoint(tmp_path, model="preact_resnet18", *, width=4, density=None, channels=None, summary=True):
    """RUN/checkpoints/best.pt of an untrained ``model`` (seeded; BN running statistics and affine
    parameters randomised so eval mode is not the identity), with a random mask of ``density`` or a
    channel ticket keeping ``channels`` of the BN channels; RUN/summary.json with made-up costs."""
    cfg = tiny_cfg(tmp_path / "run", f"model.name={model}", f"model.base_width={width}")
    data = load_dataset("digits", None, val_size=100)
    spec = model_spec(cfg, data)
    torch.manual_seed(0)
    net = build_model(spec)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.5)
                m.bias.normal_(0, 0.1)
    masks = {}
    if density is not None:
        for name, p in prunable_parameters(net).items():
            masks[name] = torch.rand(p.shape) < density
            p.data.mul_(masks[name])
    if channels is not None:
        from sparta.sparse.channels import bn_channel_masks, slim

        net, plan = slim(net, bn_channel_masks(net, channels), example_input(spec))
        spec = {**spec, "channel_plan": plan}
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    checkpoint.save(checkpoint.RunCheckpoint(model=net.state_dict(), model_spec=spec, masks=masks,
                                             config=cfg.to_dict(), epoch=3, step=48), path)
    if summary:
        (tmp_path / "run" / "summary.json").write_text(json.dumps({"train_flops": 1.5e12, "train_flops_dense": 3e12,
                                                                   "wall_time_s": 42.0}))
    return path


def standalone_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``architecture.load(folder)`` computed in a fresh interpreter that never imports sparta."""
    torch.save(x, folder / "x.pt")
    code = ("import sys, torch, architecture\n"
            "m = architecture.load('.')\n"
            "torch.save(m(torch.load('x.pt', weights_only=True)), 'y.pt')\n"
            "assert not any(k == 'sparta' or k.startswith('sparta.') for k in sys.modules), 'sparta was imported'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, env={**env, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(folder / "y.pt", weights_only=True)


@pytest.mark.parametrize("model,density", [("preact_resnet18", 0.3), ("vgg16_bn", 0.5), ("preact_resnet18", None)])
def test_export_is_plain_strict_loadable_and_gives_the_same_logits(tmp_path, model, density):
    path = write_checkpoint(tmp_path, model, density=density)
    out = tmp_path / "export"
    card = export_checkpoint(path, out, attack=False)
    state = torch.load(out / "model.pt", weights_only=True)
    arch = json.loads((out / "architecture.json").read_text())
    # strict load into the standalone definition (imported from the export folder, not from sparta)
    sys.path.insert(0, str(out))
    try:
        import architecture
        net = architecture.build(arch)
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("architecture", None)
    net.load_state_dict(state, strict=True)
    ckpt = checkpoint.load(path)
    # masks folded in: pruned positions exactly 0, kept ones the checkpoint's values
    for name, mask in ckpt.masks.items():
        w = state[benchmark_name(model, name.removeprefix("body."))]
        assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
        assert torch.equal(w[mask], ckpt.model[name][mask])
    x = torch.rand(16, 1, 8, 8)
    sparta_model = load_model(path)
    with torch.no_grad():
        expected = sparta_model(x)
    got = standalone_logits(out, x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
    # the card's sparsity is counted from the exported weights
    sp = card["sparsity"]
    zeros = sum(int((state[n] == 0).sum()) for n in sp["per_layer"])
    assert sp["weights"] == sum(p.numel() for p in prunable_parameters(sparta_model).values())
    assert sp["overall"] == pytest.approx(zeros / sp["weights"])
    if density is None:
        assert card["structure"] == "dense" and sp["overall"] < 1e-3
    else:
        assert card["structure"] == "unstructured"
        kept = sum(int(m.sum()) for m in ckpt.masks.values())
        assert sp["nonzero"] == kept and abs(sp["overall"] - (1 - density)) < 0.05


def test_preact_names_are_the_reference_ones(tmp_path):
    out = tmp_path / "export"
    export_checkpoint(write_checkpoint(tmp_path, "preact_resnet18", width=2), out, attack=False)
    keys = set(torch.load(out / "model.pt", weights_only=True))
    expected = {"conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.running_var", "layer1.0.conv1.weight",
                "layer1.1.conv2.weight", "layer2.0.shortcut.0.weight", "layer4.0.shortcut.0.weight", "bn.weight",
                "bn.num_batches_tracked", "linear.weight", "linear.bias"}
    assert expected <= keys
    assert not any(k.startswith(("body.", "normalize.")) or k.endswith("shortcut.weight") for k in keys)
    assert "layer1.0.shortcut.0.weight" not in keys  # identity shortcut in the first block, as in the reference
    # convs+BNs, shortcuts, final bn, linear
    assert len([k for k in keys if k.endswith(".weight")]) == 1 + 8 * 4 + 3 + 2


def test_vgg_names_are_kuangliu_ones_with_zero_conv_biases(tmp_path):
    out = tmp_path / "export"
    export_checkpoint(write_checkpoint(tmp_path, "vgg16_bn", width=4), out, attack=False)
    state = torch.load(out / "model.pt", weights_only=True)
    # conv, bn, relu per layer; a max-pool after 2, 4, 7, 10, 13
    convs = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
    assert [int(k.split(".")[1]) for k in state if k.startswith("features.") and k.endswith(".bias")
            and state[k].dim() == 1 and f"features.{k.split('.')[1]}.weight" in state
            and state[f"features.{k.split('.')[1]}.weight"].dim() == 4] == convs
    assert all(torch.equal(state[f"features.{i}.bias"], torch.zeros(state[f"features.{i}.weight"].shape[0]))
               for i in convs)
    assert {"classifier.weight", "classifier.bias", "features.1.running_mean"} <= set(state)


def test_channel_ticket_exports_the_smaller_network_and_its_widths(tmp_path):
    path = write_checkpoint(tmp_path, "preact_resnet18", width=8, channels=0.5)
    out = tmp_path / "export"
    card = export_checkpoint(path, out, attack=False)
    arch = json.loads((out / "architecture.json").read_text())
    state = torch.load(out / "model.pt", weights_only=True)
    assert arch["channel_ticket"] is True and card["structure"] == "channel"
    assert arch["streams"] != [8, 16, 32, 64] or arch["mids"] != [8, 8, 16, 16, 32, 32, 64, 64]  # it did shrink
    assert state["conv1.weight"].shape[0] == arch["streams"][0]
    assert state["layer3.1.conv1.weight"].shape[0] == arch["mids"][5]
    assert state["linear.weight"].shape == (10, arch["streams"][3])
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        expected = load_model(path)(x)
    assert torch.allclose(standalone_logits(out, x), expected, atol=1e-5, rtol=1e-5)
    # sparsity is counted against the full (unslimmed) network of the same width
    full = {n: p.numel() for n, p in build_model({k: v for k, v in checkpoint.load(path).model_spec.items()
                                                   if k != "channel_plan"}).named_parameters() if p.dim() >= 2}
    assert card["sparsity"]["weights"] == sum(full.values())
    kept = sum(t.numel() for n, t in state.items() if n in card["sparsity"]["per_layer"])
    assert (card["sparsity"]["nonzero"] == kept
            and card["sparsity"]["overall"] == pytest.approx(1 - kept / sum(full.values())))
    layer = card["sparsity"]["per_layer"]["layer2.0.conv1.weight"]
    assert layer["kept_shape"] == list(state["layer2.0.conv1.weight"].shape)


def test_card_without_attack_says_why_and_carries_the_run_cost(tmp_path):
    out = tmp_path / "export"
    card = export_checkpoint(write_checkpoint(tmp_path, density=0.3), out, attack=False)
    saved = json.loads((out / "card.json").read_text())
    assert saved["clean_acc"] is None and saved["autoattack"] == {"8/255": None, "0.031": None}
    assert "--no-attack" in saved["skipped"]
    assert saved["training"]["train_flops"] == 1.5e12 and saved["training"]["wall_time_s"] == 42.0
    assert (saved["model"], saved["dataset"], saved["method"]) == ("preact_resnet18", "digits", "dense")
    md = (out / "card.md").read_text()
    assert "n/a" in md and "1.500e+12" in md and "layer2.0.shortcut.0.weight" in md
    assert card["written"][0].endswith("model.pt")
    # without summary.json the cost is null with the place it was looked for
    out2 = tmp_path / "export2"
    (tmp_path / "run" / "summary.json").unlink()
    t = export_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", out2, attack=False)["training"]
    assert t["train_flops"] is None and t["wall_time_s"] is None and "summary.json" in t["note"]


# ~2 min: the untrained net keeps one image robust, which every AutoAttack attack then runs on in full
@pytest.mark.slow
def test_card_with_autoattack_on_a_few_images(tmp_path):
    path = write_checkpoint(tmp_path, "preact_resnet18", width=2, density=0.5)
    card = export_checkpoint(path, tmp_path / "export", n_examples=12)
    assert card["n_examples"] == 12 and card["test_set_size"] == 500 and card["full_test_set"] is False
    data = load_dataset("digits", None, val_size=100)
    x, y = data.test.images[:12].float() / 255, data.test.labels[:12].long()
    with torch.no_grad():
        clean = 100.0 * float((load_model(path)(x).argmax(1) == y).float().mean())
    assert card["clean_acc"] == pytest.approx(clean)
    assert (set(card["autoattack"]) == {"8/255", "0.031"}
            and [r["eps"] for r in card["autoattack"].values()] == list(CARD_EPS))
    for r in card["autoattack"].values():
        assert 0.0 <= r["robust_acc"] <= card["clean_acc"]


def test_cli_export_and_bad_input(tmp_path, capsys):
    path = write_checkpoint(tmp_path, "vgg16_bn", width=2)
    assert main(["export", str(path), "--out", str(tmp_path / "e"), "--no-attack"]) == 0
    assert "card.json" in capsys.readouterr().out
    assert main(["export", str(path), "--out", str(tmp_path / "e"), "--no-attack", "--n-examples", "5"]) == 2
    assert main(["export", str(path), "--out", str(tmp_path / "e"), "--n-examples", "0"]) == 2
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    cfg = tiny_cfg(tmp_path / "other")
    data = load_dataset("digits", None, val_size=100)
    small = tmp_path / "small.pt"
    checkpoint.save(checkpoint.RunCheckpoint(model=build_model(model_spec(cfg, data)).state_dict(),
                                             model_spec=model_spec(cfg, data), config=cfg.to_dict()), small)
    with pytest.raises(ConfigError, match="exports resnet18, vgg16_bn_hydra, preact_resnet18, vgg16_bn; this "
                                          "checkpoint holds a small_cnn"):
        export_checkpoint(small, tmp_path / "e2", attack=False)


def test_submission_with_fmn_distances(tmp_path):
    """The submission's HO-FMN part on a tiny digits network: the distances file under the model key's
    name (or ``distances.pickle`` without a key), the tuned setting, robust accuracy read off them."""
    path = write_checkpoint(tmp_path, "resnet18", width=2, density=0.5)
    out = tmp_path / "export"
    card = export_checkpoint(path, out, attack=False, min_norm=True, n_examples=12,
                             overrides=["eval.fmn.trials=2", "eval.fmn.tune_steps=3", "eval.fmn.tune_batch=4",
                                        "eval.fmn.steps=5"])
    sub = json.loads((out / "submission.json").read_text())
    assert sub["model_key"] is None and sub["hofmn"]["distances"] == "distances.pickle"  # digits: no benchmark key
    with open(out / "distances.pickle", "rb") as f:
        distances = pickle.load(f)
    assert len(distances) == 12 == sub["hofmn"]["n"] and bool((torch.as_tensor(distances) >= 0).all())
    assert sub["hofmn"]["best_setting"]["loss"] in ("dlr", "ce", "ll") and sub["hofmn"]["check"] is None
    assert str(out / "distances.pickle") in card["written"]
