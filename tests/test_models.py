"""Models: shapes, the in-model normalisation, config errors, determinism and known sizes."""
from __future__ import annotations

import pytest
import torch
from conftest import SMALL_BN_MODELS
from torch.utils.flop_counter import FlopCounterMode

from sparta.errors import ConfigError
from sparta.models import MODELS, Normalize, NormalizedModel, create_model

# Small variants keep the smoke tests fast; the full sizes are checked once below.
SMALL_KWARGS = {**SMALL_BN_MODELS, "small_cnn": {}}


def make(name, channels=3, size=32, num_classes=10, **kwargs):
    return create_model(name, num_classes=num_classes, in_channels=channels, image_size=size,
                        mean=[0.5] * channels, std=[0.25] * channels, **kwargs)


def test_registry_lists_every_model():
    assert MODELS.names() == sorted(SMALL_KWARGS)


def _cases():
    for name in SMALL_KWARGS:
        yield name, 3, 32
        yield name, 3, 64
    for name in ("small_cnn", "preact_resnet18", "vgg16_bn"):
        yield name, 1, 28
    yield "small_cnn", 1, 8  # the digits demo


@pytest.mark.parametrize("name,channels,size", list(_cases()))
@pytest.mark.parametrize("train", [True, False])
def test_forward_shape_and_finite(name, channels, size, train):
    torch.manual_seed(0)
    model = make(name, channels, size, num_classes=7, **SMALL_KWARGS[name]).train(train)
    logits = model(torch.rand(4, channels, size, size))
    assert logits.shape == (4, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(SMALL_KWARGS))
def test_first_module_is_normalize(name):
    model = make(name, **SMALL_KWARGS[name])
    assert isinstance(model, NormalizedModel)
    first = next(iter(model.children()))
    assert first is model.normalize and isinstance(first, Normalize)
    assert model.normalize.mean.shape == (1, 3, 1, 1)
    # Normalisation constants are buffers: saved, but never trained or pruned.
    assert "normalize.mean" in model.state_dict()
    assert not any(n.startswith("normalize") for n, _ in model.named_parameters())
    assert all(n.startswith("body.") for n, _ in model.named_parameters())


def test_normalize_math():
    norm = Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])
    x = torch.rand(2, 3, 4, 4)
    out = norm(x)
    for c, (m, s) in enumerate(zip([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])):
        torch.testing.assert_close(out[:, c], (x[:, c] - m) / s)
    # The model's body sees the normalised input.
    model = make("small_cnn")
    torch.testing.assert_close(model(x), model.body((x - 0.5) / 0.25))


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match="preact_resnet18"):
        make("resnet1000")


@pytest.mark.parametrize("name,bad", [("preact_resnet18", {"depth": 18}), ("small_cnn", {"widen_factor": 2}),
                                      ("wide_resnet", {"base_width": 16})])
def test_unknown_kwarg_names_valid_ones(name, bad):
    with pytest.raises(ConfigError) as err:
        make(name, **bad)
    message = str(err.value)
    assert "\n" not in message and next(iter(bad)) in message
    valid = "depth" if name == "wide_resnet" else "base_width"
    assert valid in message


@pytest.mark.parametrize("kwargs", [{"depth": 20}, {"depth": 4}, {"widen_factor": 0}, {"dropout": 1.5}])
def test_wide_resnet_bad_values(kwargs):
    with pytest.raises(ConfigError):
        make("wide_resnet", **kwargs)


def test_bad_sizes_and_statistics():
    with pytest.raises(ConfigError, match="per input channel"):
        create_model("small_cnn", num_classes=10, in_channels=3, image_size=32, mean=[0.5], std=[0.2])
    with pytest.raises(ConfigError, match="std"):
        create_model("small_cnn", num_classes=10, in_channels=1, image_size=28, mean=[0.5], std=[0.0])
    with pytest.raises(ConfigError, match="num_classes"):
        make("small_cnn", num_classes=0)
    with pytest.raises(ConfigError, match="base_width"):
        make("small_cnn", base_width=0)


@pytest.mark.parametrize("name", sorted(SMALL_KWARGS))
def test_deterministic_from_global_seed(name):
    torch.manual_seed(0)
    a = make(name, **SMALL_KWARGS[name]).state_dict()
    torch.manual_seed(0)
    b = make(name, **SMALL_KWARGS[name]).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(1)
    c = make(name, **SMALL_KWARGS[name]).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_conv_before_bn_has_no_bias():
    model = make("preact_resnet18", base_width=8)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.bias is None for m in convs)


def test_preact_resnet18_size_and_flops():
    # PreAct ResNet-18 of Rice et al. 2020: ~11.17M parameters, ~0.56 G multiply-adds at 32x32.
    model = make("preact_resnet18").eval()
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 11.17e6) / 11.17e6 < 0.01
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    flops = counter.get_total_flops()  # 2 per multiply-add
    assert abs(flops - 1.11e9) / 1.11e9 < 0.03


def test_full_size_parameter_counts():
    # Published sizes: WRN-34-10 46.16M (TRADES), CIFAR ResNet-18 11.17M, CIFAR VGG-16-BN 14.7M.
    def count(name):
        return sum(p.numel() for p in make(name).parameters())

    assert abs(count("wide_resnet") - 46.16e6) / 46.16e6 < 0.01
    assert abs(count("resnet18") - 11.17e6) / 11.17e6 < 0.01
    assert abs(count("vgg16_bn") - 14.73e6) / 14.73e6 < 0.01
    assert count("small_cnn") < 0.5e6
