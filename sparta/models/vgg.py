"""VGG-16 with batch norm (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for
Large-Scale Image Recognition"), two CIFAR variants:

- ``VGG`` (``vgg16_bn``): 13 conv3x3-BN-ReLU layers, five 2x2 max-pools and a single linear
  classifier on globally pooled features (as in kuangliu/pytorch-cifar); the papers' presets use it.
- ``VGG16Hydra`` (``vgg16_bn_hydra``): HYDRA's VGG-16-BN (Sehwag et al. 2020), the adversarial pruning
  benchmark's ``base_vgg16``: the same 13 bias-free convolutions but max-pools after the 2nd, 4th, 7th
  and 10th only, a 2x2 adaptive average pool and a three-layer classifier (4C -> 256 -> 256 -> k).
"""
from __future__ import annotations

from torch import Tensor, nn

from .layers import check_positive_int

CFG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg_features(cfg: tuple, in_channels: int, base_width: int) -> tuple[nn.Sequential, int]:
    """conv3x3(no bias)-BN-ReLU per width of ``cfg`` (scaled by ``base_width / 64``), a 2x2 max-pool
    (``ceil_mode``) per "M"; returns the layers and the last width."""
    check_positive_int("base_width", base_width)
    layers: list[nn.Module] = []
    c_in = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            continue
        c_out = max(1, v * base_width // 64)
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers), c_in


class VGG(nn.Module):
    """``base_width`` scales every width by ``base_width / 64`` (64 gives the standard VGG-16).

    Max-pools use ``ceil_mode=True``: identical to the usual floor mode on 32 and 64 px inputs, and
    28 px inputs (28-14-7-4-2-1) do not shrink to zero before the fifth pool.
    """

    def __init__(self, num_classes: int, in_channels: int, base_width: int = 64):
        super().__init__()
        self.features, c_in = vgg_features(CFG16, in_channels, base_width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(self.pool(self.features(x)).flatten(1))


CFG16_HYDRA = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # no 5th pool


class VGG16Hydra(nn.Module):
    """HYDRA's VGG-16-BN under the benchmark's parameter names: ``features.N`` (conv, BN, ReLU per
    layer, a max-pool after the 2nd, 4th, 7th and 10th convolution), ``avgpool`` (2x2 adaptive) and
    ``classifier.{0,2,4}`` (Linear 4C -> 256, ReLU, Linear 256 -> 256, ReLU, Linear 256 -> k).

    ``base_width`` scales every convolution and the two hidden linear layers by ``base_width / 64``
    (64 gives the benchmark's network). At 32 px the features end at 2x2, so the adaptive pool is
    the identity there; ``ceil_mode`` pools let 28 px inputs through (28-14-7-4-2).
    """

    def __init__(self, num_classes: int, in_channels: int, base_width: int = 64):
        super().__init__()
        self.features, c_in = vgg_features(CFG16_HYDRA, in_channels, base_width)
        hidden = max(1, 256 * base_width // 64)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(4 * c_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                        nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(self.avgpool(self.features(x)).flatten(1))  # features (B, C', 2, 2) at 32 px
