"""The adversarial pruning benchmark's architecture compliance: every method's tiny run on both base
architectures exports a state_dict that loads with ``strict=True, weights_only=True`` into base
definitions written HERE, from the benchmark's description (pralab/AdversarialPruningBenchmark,
``models/base_resnet18.py`` and ``models/base_vgg16.py``), not imported from sparta, and gives
sparta's logits.

- base_resnet18: kuangliu's post-activation ResNet-18: ``conv1`` (3x3, no bias) + ``bn1``; ``layer1..4``
  of two BasicBlocks (``conv1``, ``bn1``, ``conv2``, ``bn2``; projection ``shortcut.0`` 1x1 conv without
  bias, ``shortcut.1`` BN); ``avg_pool2d(., 4)``; ``linear``.
- base_vgg16: HYDRA's VGG-16-BN: 13 bias-free 3x3 convolutions, each + BN + ReLU, max-pools after the
  2nd, 4th, 7th and 10th convolution (none after the 13th), ``AdaptiveAvgPool2d((2, 2))``, classifier
  ``0`` Linear(4C, 256), ReLU, ``2`` Linear(256, 256), ReLU, ``4`` Linear(256, k).

The definitions take widths, so that the narrow test networks (and channel tickets, which are
smaller networks by design) load too; with no arguments they are the benchmark's networks.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from test_grid import write_svhn
from torch import nn

from sparta.config import load_config
from sparta.experiment import load_model, train
from sparta.export import export_checkpoint, model_key
from sparta.grid import METHODS, plan_grid
from sparta.models import create_model


class Block(nn.Module):
    def __init__(self, c_in, mid, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class BaseResNet18(nn.Module):
    def __init__(self, streams=(64, 128, 256, 512), mids=None, num_classes=10):
        super().__init__()
        mids = mids or [s for s in streams for _ in (0, 1)]
        self.conv1 = nn.Conv2d(3, streams[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(streams[0])
        c = streams[0]
        for i in range(4):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(Block(c, mids[2 * i], streams[i], stride),
                                                         Block(streams[i], mids[2 * i + 1], streams[i], 1)))
            c = streams[i]
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


class BaseVGG16(nn.Module):
    POOL_AFTER = (2, 4, 7, 10)

    def __init__(self, widths=(64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512), hidden=256,
                 num_classes=10):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate(widths, 1):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True)]
            if i in self.POOL_AFTER:
                layers.append(nn.MaxPool2d(2, 2))
            c = w
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(4 * c, hidden), nn.ReLU(True), nn.Linear(hidden, hidden),
                                        nn.ReLU(True), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def base_network(arch: dict) -> nn.Module:
    if arch["name"] == "resnet18":
        return BaseResNet18(arch["streams"], arch["mids"], arch["num_classes"])
    return BaseVGG16(arch["widths"], arch["hidden"], arch["num_classes"])


def strict_load_and_compare(run_dir, out):
    """Export ``run_dir``'s final checkpoint without attacks, load it strictly into the base definition
    and compare logits with sparta's model on normalised random inputs; returns the export's card."""
    ckpt = run_dir / "checkpoints" / "last.pt"
    card = export_checkpoint(ckpt, out, attack=False)
    arch = json.loads((out / "architecture.json").read_text())
    net = base_network(arch).eval()
    net.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor(arch["mean"]).view(1, 3, 1, 1), torch.tensor(arch["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(net((x - mean) / std), load_model(ckpt)(x), atol=1e-4, rtol=1e-4)
    return card, arch


@pytest.mark.parametrize("model", ["resnet18", "vgg16"])
def test_every_method_on_both_base_architectures_strict_loads(tmp_path, model):
    write_svhn(tmp_path, n_train=100, n_test=40)
    runs = plan_grid("svhn", model, tmp_path, tmp_path / "out", sparsities=None, smoke=True,
                     overrides=["model.base_width=2", "eval.gap_subset=null", "data.val_size=16",
                                "data.train_subset=32", "eval.test_subset=16", "eval.val_subset=16"])
    runs = {r.role: r for r in runs if r.name.endswith("-s90")}
    assert set(runs) == set(METHODS)
    for role, run in runs.items():
        cfg = load_config(run.configs, list(run.overrides))
        train(cfg)
        card, arch = strict_load_and_compare(run.run_dir, tmp_path / "export" / role)
        assert card["structure"] == ("channel" if role == "robust_bird_channel" else "unstructured")
        if role == "robust_bird_channel":  # the smaller network, which the submission says to bring along
            assert arch["channel_ticket"] and card["submission"]["loads_into"]["strict_load"] is False
            assert "architecture.py" in card["submission"]["loads_into"]["why_not"]
            # the benchmark's structured sparsity: a share of the weights, met by the channel count
            summary = json.loads((run.run_dir / "summary.json").read_text())
            assert 1 - card["sparsity"]["overall"] == pytest.approx(summary["weight_share_kept"])
            assert abs(card["sparsity"]["overall"] - 0.9) < 0.03, summary["weight_share_kept"]
        elif role != "flying_bird_plus":  # FB+ prunes further as it adapts
            assert abs(card["sparsity"]["overall"] - 0.9) < 0.02, (role, card["sparsity"]["overall"])
        assert card["submission"]["normalization"]["required"] is True


@pytest.mark.parametrize("name,base", [("resnet18", BaseResNet18), ("vgg16_bn_hydra", BaseVGG16)])
def test_the_full_size_networks_are_the_benchmarks_base_models(tmp_path, name, base):
    """At the benchmark's size (base width 64, 10 classes) sparta's network has exactly the base
    model's state_dict: names, shapes and the forward pass."""
    torch.manual_seed(0)
    ours = create_model(name, num_classes=10, in_channels=3, image_size=32, mean=[0.0] * 3, std=[1.0] * 3).eval()
    ref = base().eval()
    theirs = ref.state_dict()
    assert ({k: tuple(v.shape) for k, v in ours.body.state_dict().items()}
            == {k: tuple(v.shape) for k, v in theirs.items()})
    ref.load_state_dict(ours.body.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ref(x), ours(x), atol=1e-5)
    params = sum(p.numel() for p in ref.parameters())
    assert params == {"resnet18": 11_173_962, "vgg16_bn_hydra": 15_311_818}[name]


def card_of(model="resnet18", dataset="cifar10", structure="unstructured", overall=0.9012):
    return {"model": model, "dataset": dataset, "structure": structure, "method": "flying_bird",
            "sparsity": {"overall": overall}}


@pytest.mark.parametrize("card,kw,expect", [
    (card_of(), {}, "FlyingBird_sparta_R18_CIFAR10_US_90"),
    (card_of("vgg16_bn_hydra", "svhn", overall=0.9895), {"ap_key": "HYDRA_Sehwag2020Hydra"},
     "HYDRA_Sehwag2020Hydra_V16_SVHN_US_99"),
    (card_of(structure="channel", overall=0.7231), {"level": 75}, "FlyingBird_sparta_R18_CIFAR10_S_75"),
    (card_of(overall=0.93), {}, None),          # between 90 and 95: no level of the benchmark
    (card_of(dataset="cifar100"), {}, None),    # not a benchmark dataset
    (card_of(structure="dense", overall=0.0), {}, None),
])
def test_model_key(card, kw, expect):
    key, note = model_key(card, ap_key=kw.get("ap_key"), level=kw.get("level"))
    assert key == expect, note
    if expect is None:
        assert note.startswith("no benchmark key")
