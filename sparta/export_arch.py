"""Standalone definitions of the exported networks, plain PyTorch (no sparta needed).

Written by ``sparta export`` into the export folder as ``architecture.py``. The parameter names follow
the standard CIFAR definitions, which are also the adversarial pruning benchmark's base models:

- ``preact_resnet18``: PreActResNet-18 of Rice et al. 2020 ("Overfitting in adversarially robust deep
  learning": ``conv1``, ``layer1.0.bn1``, ``layer1.0.conv1``, ``layer2.0.shortcut.0``, ..., ``bn``,
  ``linear``), the Flying Bird entry's network;
- ``resnet18``: the post-activation ResNet-18 of kuangliu/pytorch-cifar, the benchmark's
  ``base_resnet18`` (``conv1``, ``bn1``, ``layerS.B.{conv1,bn1,conv2,bn2}``, ``shortcut.0`` 1x1 conv,
  ``shortcut.1`` BN, ``linear``);
- ``vgg16_bn_hydra``: HYDRA's VGG-16-BN, the benchmark's ``base_vgg16`` (bias-free ``features.N``, no
  pool after the 13th convolution, ``avgpool`` 2x2, ``classifier.{0,2,4}``);
- ``vgg16_bn``: VGG-16 of kuangliu/pytorch-cifar (``features.N``, ``classifier``; convolutions with a
  bias, which the export fills with zeros).

All take normalised inputs; ``load(folder)`` wraps the network with the export's per-channel mean/std
(``architecture.json``), so the returned model takes pixels in [0, 1].

Usage::

    import architecture
    model = architecture.load("export_dir")            # mean/std included, eval mode
    net = architecture.build(json.load(open("export_dir/architecture.json")))
    net.load_state_dict(torch.load("export_dir/model.pt", weights_only=True), strict=True)
"""
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

PREACT_STREAMS = (64, 128, 256, 512)  # residual-stream width of each stage (the standard network)
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_HYDRA_CFG = VGG16_CFG[:-1]  # HYDRA's VGG-16 has no pool after the 13th convolution


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut (1x1 conv on the pre-activated input when the shape
    changes). ``mid``: conv1's output channels (== ``planes`` in the standard network)."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, mid=None):
        super().__init__()
        mid = planes if mid is None else mid
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """``streams``: the 4 stages' residual widths; ``mids``: conv1 widths of the 8 blocks (a channel
    ticket narrows both). Global average pooling: at 32 px identical to the reference's
    ``avg_pool2d(out, 4)``, and other input sizes work too."""

    def __init__(self, num_classes=10, in_channels=3, streams=PREACT_STREAMS, mids=None):
        super().__init__()
        mids = list(mids) if mids is not None else [s for s in streams for _ in range(2)]
        self.conv1 = nn.Conv2d(in_channels, streams[0], kernel_size=3, stride=1, padding=1, bias=False)
        in_planes = streams[0]
        for i, (planes, stride) in enumerate(zip(streams, (1, 2, 2, 2))):
            blocks = [PreActBlock(in_planes, planes, stride, mids[2 * i]),
                      PreActBlock(planes, planes, 1, mids[2 * i + 1])]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_planes = planes
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_planes, planes, stride=1, mid=None):
        super().__init__()
        mid = planes if mid is None else mid
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """kuangliu's ResNet18 (post-activation); ``streams`` and ``mids`` as in ``PreActResNet18``.
    Global average pooling: at 32 px identical to the reference's ``avg_pool2d(out, 4)``."""

    def __init__(self, num_classes=10, in_channels=3, streams=PREACT_STREAMS, mids=None):
        super().__init__()
        mids = list(mids) if mids is not None else [s for s in streams for _ in range(2)]
        self.conv1 = nn.Conv2d(in_channels, streams[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(streams[0])
        in_planes = streams[0]
        for i, (planes, stride) in enumerate(zip(streams, (1, 2, 2, 2))):
            blocks = [BasicBlock(in_planes, planes, stride, mids[2 * i]),
                      BasicBlock(planes, planes, 1, mids[2 * i + 1])]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_planes = planes
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def vgg_features(cfg, in_channels, widths, bias):
    """conv3x3(-bias)-BN-ReLU per width, 2x2 max-pool (``ceil_mode``) per "M"; returns (layers, last width)."""
    widths = iter([v for v in cfg if v != "M"] if widths is None else widths)
    layers, c_in = [], in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            continue
        c_out = next(widths)
        layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=bias), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
        c_in = c_out
    return layers, c_in


class VGG16Hydra(nn.Module):
    """HYDRA's VGG-16-BN; ``widths``: the 13 convolutions' output channels, ``hidden``: the two hidden
    linear layers' width (256 in the standard network)."""

    def __init__(self, num_classes=10, in_channels=3, widths=None, hidden=256):
        super().__init__()
        layers, c_in = vgg_features(VGG16_HYDRA_CFG, in_channels, widths, bias=False)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(4 * c_in, hidden), nn.ReLU(True), nn.Linear(hidden, hidden),
                                        nn.ReLU(True), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


class VGG16(nn.Module):
    """kuangliu's VGG('VGG16') with batch norm; ``widths``: the 13 convolutions' output channels.
    Max-pools use ``ceil_mode=True`` (identical to floor mode at 32 and 64 px; 28 px does not vanish)."""

    def __init__(self, num_classes=10, in_channels=3, widths=None):
        super().__init__()
        layers, c_in = vgg_features(VGG16_CFG, in_channels, widths, bias=True)
        layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(out)


class Normalized(nn.Module):
    """``net((x - mean) / std)`` for pixels ``x`` in [0, 1]; mean/std (1, C, 1, 1) buffers."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def build(arch):
    """The network described by an ``architecture.json`` dict (without normalisation)."""
    if arch["name"] == "preact_resnet18":
        return PreActResNet18(arch["num_classes"], arch["in_channels"], arch["streams"], arch["mids"])
    if arch["name"] == "resnet18":
        return ResNet18(arch["num_classes"], arch["in_channels"], arch["streams"], arch["mids"])
    if arch["name"] == "vgg16_bn":
        return VGG16(arch["num_classes"], arch["in_channels"], arch["widths"])
    if arch["name"] == "vgg16_bn_hydra":
        return VGG16Hydra(arch["num_classes"], arch["in_channels"], arch["widths"], arch["hidden"])
    raise ValueError(f"unknown architecture {arch['name']!r}")


def load(folder, device="cpu"):
    """The exported model from ``folder`` (architecture.json + model.pt), taking pixels in [0, 1], in eval mode."""
    with open(os.path.join(folder, "architecture.json")) as f:
        arch = json.load(f)
    net = build(arch)
    state = torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return Normalized(net, arch["mean"], arch["std"]).to(device).eval()
