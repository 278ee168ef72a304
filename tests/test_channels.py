"""Channel tickets made physically smaller (torch-pruning): masks, the residual coupling rule, exact
equivalence with the masked dense network, plan round trips (CPU, small widths, 3x32x32 inputs)."""
import copy
import json

import pytest
import torch
from conftest import SMALL_BN_MODELS
from torch import nn

from sparta.errors import CheckpointError
from sparta.models import create_model
from sparta.sparse.channels import apply_plan, bn_channel_masks, coupled_bn_groups, slim

pytest.importorskip("torch_pruning")

ARCHS = SMALL_BN_MODELS  # every network with BatchNorm, at a small width
EXAMPLE = torch.zeros(1, 3, 32, 32)




def make(name, seed=0):
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.25] * 3,
                        **ARCHS[name])


def randomize_batchnorms_(model, seed=1):
    """A "trained" look: random |gamma| (the channel scores), beta and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0)
                m.weight.copy_(sign * (0.2 + torch.rand(c, generator=g)))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


def zero_masked_channels_(model, masks):
    """The masked dense ticket: gamma = beta = 0 on every channel its own BN masks out."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, keep in masks.items():
            modules[name].weight[~keep] = 0.0
            modules[name].bias[~keep] = 0.0
    return model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_bn_channel_masks_global_threshold_and_one_per_bn():
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.1, -0.9, 0.5]))
        net[3].weight.copy_(torch.tensor([0.2, -0.3]))
    # keep round(0.4 * 5) = 2 channels over both BNs: |gamma| 0.9 and 0.5, both in BN "1";
    # BN "3" would lose everything, so it keeps its largest, |-0.3|
    masks = bn_channel_masks(net, 0.4)
    assert masks["1"].tolist() == [False, True, True] and masks["3"].tolist() == [False, True]
    assert bn_channel_masks(net, 1.0)["3"].all()
    with pytest.raises(ValueError):
        bn_channel_masks(net, 0.0)


def test_preact_groups_and_coupling_rule():
    net = make("preact_resnet18")
    groups = coupled_bn_groups(net, EXAMPLE)
    stream1 = ["body.layer1.0.bn1", "body.layer1.1.bn1", "body.layer2.0.bn1"]
    assert stream1 in groups
    assert ["body.layer1.0.bn2"] in groups  # inside a block: one BN, one group
    assert ["body.layer4.1.bn1", "body.bn"] in groups  # last stream feeds the final BN and the classifier
    assert sorted(n for g in groups for n in g) == sorted(
        n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d))

    masks = {name: torch.ones(8, dtype=torch.bool) for name in stream1}
    masks["body.layer1.0.bn1"][[0, 1, 2]] = False  # channel 0: only one of the three BNs drops it
    masks["body.layer1.1.bn1"][[1, 2]] = False
    masks["body.layer2.0.bn1"][[1, 2, 5]] = False  # channels 1, 2: all three drop them
    masks["body.layer1.0.bn2"] = torch.tensor([False] * 3 + [True] * 5)
    small, plan = slim(net, masks, EXAMPLE)
    assert plan == {"body.layer1.0.bn1": [1, 2], "body.layer1.0.bn2": [0, 1, 2]}
    body = small.body
    assert body.conv1.out_channels == 6 and body.layer1[0].bn1.num_features == 6
    assert body.layer1[1].conv2.out_channels == 6 and body.layer2[0].shortcut.in_channels == 6
    assert body.layer1[0].conv1.out_channels == 5 and body.layer1[0].conv2.in_channels == 5
    assert body.linear.out_features == 10 and body.conv1.in_channels == 3
    # the kept channels carry the original values
    assert torch.equal(body.layer1[0].bn1.weight, net.body.layer1[0].bn1.weight[[0, 3, 4, 5, 6, 7]])
    assert torch.equal(body.conv1.weight, net.body.conv1.weight[[0, 3, 4, 5, 6, 7]])


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_slim_equals_masked_dense_and_plan_round_trip(name):
    net = randomize_batchnorms_(make(name))
    masks = bn_channel_masks(net, 0.5)
    dense = zero_masked_channels_(copy.deepcopy(net), masks).eval()
    before = copy.deepcopy(dense.state_dict())

    small, plan = slim(dense, masks, EXAMPLE)
    assert plan and n_params(small) < n_params(dense)
    assert torch.equal(torch.cat([v.flatten().float() for v in dense.state_dict().values()]),
                       torch.cat([v.flatten().float() for v in before.values()]))  # input untouched
    assert not small.training  # mode kept

    # removed channels were dead in the masked dense network: same outputs
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = dense(x), small(x)
    assert torch.isfinite(got).all() and got.shape == (4, 10)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()

    if not name.startswith("vgg"):  # residual nets: stream channels (groups of several BNs) were removed too,
        streams = sorted({g[0] for g in coupled_bn_groups(net, EXAMPLE) if len(g) > 1} & set(plan))
        assert streams
        # and the check has teeth: removing a channel that some BN of the group still uses changes outputs
        root = streams[0]  # the first stage: its channels feed everything after them
        live = next(i for i in range(len(masks[root])) if i not in plan[root])
        with torch.no_grad():
            wrong = apply_plan(dense, {root: [live]}, EXAMPLE)(x)
        assert (wrong - expected).abs().max() > 1e-4  # vs. ~1e-7 float noise above

    # plan: plain data that survives JSON, and rebuilds the architecture from a fresh full network
    assert json.loads(json.dumps(plan)) == plan
    assert all(isinstance(v, list) and all(type(i) is int for i in v) for v in plan.values())
    rebuilt = apply_plan(make(name, seed=5), json.loads(json.dumps(plan)), EXAMPLE)
    assert shapes(rebuilt) == shapes(small)
    rebuilt.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), got)


@pytest.mark.parametrize("name", ["preact_resnet18", "vgg16_bn"])
def test_random_gamma_ticket_is_smaller_and_finite_in_train_mode(name):
    net = randomize_batchnorms_(make(name), seed=3).train()
    small, plan = slim(net, bn_channel_masks(net, 0.2 ** 0.5), EXAMPLE)
    assert small.training and n_params(small) < 0.6 * n_params(net)
    out = small(torch.rand(4, 3, 32, 32))
    assert torch.isfinite(out).all() and out.shape == (4, 10)
    out.sum().backward()  # trainable
    assert all(p.grad is not None for p in small.parameters())


def test_keep_everything_and_errors():
    net = make("vgg16_bn")
    masks = {n: torch.ones(m.num_features, dtype=torch.bool) for n, m in net.named_modules()
             if isinstance(m, nn.BatchNorm2d)}
    small, plan = slim(net, masks, EXAMPLE)
    assert plan == {} and shapes(small) == shapes(net)
    with pytest.raises(ValueError):
        slim(net, {"body.features.0": torch.ones(8, dtype=torch.bool)}, EXAMPLE)  # a conv, not a BN
    with pytest.raises(ValueError):
        slim(net, {"body.features.1": torch.ones(5, dtype=torch.bool)}, EXAMPLE)  # wrong size
    for bad in [{"body.nothing": [0]}, {"body.features.1": [8]}, {"body.features.1": [0, 0]},
                {"body.features.1": list(range(8))}, {"body.features.1": ["0"]}, ["body.features.1"]]:
        with pytest.raises(CheckpointError):
            apply_plan(net, bad, EXAMPLE)
    preact = make("preact_resnet18")  # two entries for one coupled group
    with pytest.raises(CheckpointError):
        apply_plan(preact, {"body.layer1.0.bn1": [0], "body.layer1.1.bn1": [1]}, EXAMPLE)
