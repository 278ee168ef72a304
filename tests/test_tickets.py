"""Ticket drawing (global magnitude, layer-normalised), iterative densities, rewinding and random
reinit (CPU, a few seconds)."""
import copy

import pytest
import torch
from torch import nn

from sparta.models import create_model
from sparta.sparse.masks import MaskSet
from sparta.sparse.select import prunable_parameters
from sparta.sparse.tickets import (
    global_magnitude_masks,
    iterative_densities,
    layer_normalized_masks,
    reinit_,
    rewind_,
    rewind_model_,
    select_k_mask,
    top_k_mask,
    zero_pruned_,
)


def small_preact(seed=0):
    torch.manual_seed(seed)
    return create_model("preact_resnet18", num_classes=10, in_channels=3, image_size=32,
                        mean=[0.5] * 3, std=[0.25] * 3, base_width=8)


# -- global magnitude ----------------------------------------------------------------------------

def test_global_magnitude_hand_made():
    params = {"a": torch.tensor([[0.5, -4.0], [1.0, 0.1]]), "b": torch.tensor([-3.0, 0.2, 2.0])}
    # |w| over both: a = 0.5 4 1 0.1, b = 3 0.2 2; density 3/7 -> keep round(3) = the 3 largest: 4, 3, 2
    masks = global_magnitude_masks(params, 3 / 7)
    assert masks["a"].tolist() == [[False, True], [False, False]]
    assert masks["b"].tolist() == [True, False, True]
    assert masks["a"].dtype == torch.bool


def test_global_magnitude_layer_may_lose_everything():
    # one threshold for all: every weight of "small" is below it, so that layer keeps nothing
    params = {"small": torch.full((4,), 0.01), "big": torch.arange(1.0, 9.0)}
    masks = global_magnitude_masks(params, 0.5)  # keep 6 of 12
    assert masks["small"].sum() == 0 and masks["big"].sum() == 6
    assert masks["big"].tolist() == [False, False, True, True, True, True, True, True]


def test_ties_broken_by_lowest_global_index():
    params = {"a": torch.ones(3), "b": -torch.ones(2, 2)}  # 7 equal magnitudes
    masks = global_magnitude_masks(params, 4 / 7)
    assert masks["a"].tolist() == [True, True, True] and masks["b"].tolist() == [[True, False], [False, False]]
    keep = top_k_mask(torch.tensor([2.0, 1.0, 1.0, 3.0, 1.0]), 3)  # 3, 2, then the first 1
    assert keep.tolist() == [True, True, False, True, False]


@pytest.mark.parametrize("largest", [True, False])
def test_select_k_mask_is_a_stable_sort_prefix(largest):
    """Against the definition: the first k of a stable sort (ties in index order), on heavily tied
    scores with +-inf (Flying Bird's "may not be chosen") and signed zeros, for every k."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        scores = torch.randint(-3, 4, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).float()
        scores[torch.rand(scores.numel(), generator=g) < 0.15] = float("inf") if trial % 2 else float("-inf")
        scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
        order = torch.sort(scores, stable=True, descending=largest).indices
        for k in range(scores.numel() + 1):
            expected = torch.zeros(scores.numel(), dtype=torch.bool)
            expected[order[:k]] = True
            assert torch.equal(select_k_mask(scores, k, largest=largest), expected), (scores, k)
    assert top_k_mask(torch.tensor([2.0, 1.0, 1.0, 3.0, 1.0]), 3).tolist() == \
        select_k_mask(-torch.tensor([2.0, 1.0, 1.0, 3.0, 1.0]), 3, largest=False).tolist()


@pytest.mark.parametrize("density", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_global_magnitude_exact_count_on_model(density):
    model = small_preact()
    params = {n: p.detach() for n, p in prunable_parameters(model).items()}
    total = sum(p.numel() for p in params.values())
    masks = global_magnitude_masks(params, density)
    assert set(masks) == set(params)
    assert sum(int(m.sum()) for m in masks.values()) == round(density * total)
    assert all(m.shape == params[n].shape for n, m in masks.items())
    if 0 < density < 1:  # kept weights are all at least as large as pruned ones (one global threshold)
        kept = torch.cat([params[n].abs()[m] for n, m in masks.items()])
        pruned = torch.cat([params[n].abs()[~m] for n, m in masks.items()])
        assert kept.min() >= pruned.max()


def test_density_validated():
    with pytest.raises(ValueError):
        global_magnitude_masks({"a": torch.ones(3)}, 1.5)
    with pytest.raises(ValueError):
        layer_normalized_masks({"a": torch.ones(3)}, -0.1)


# -- layer-normalised (boosting tickets) ---------------------------------------------------------

def test_layer_normalized_differs_from_magnitude():
    params = {"a": torch.tensor([1.0, -3.0]), "b": torch.tensor([2.0, 10.0, -12.0])}
    # keep round(0.4 * 5) = 2 weights.
    # plain magnitude: |w| = 1 3 | 2 10 12 -> keep 12 and 10, both in "b"; "a" loses everything.
    # layer-normalised: mean|a| = (1 + 3) / 2 = 2      -> scores 0.5, 1.5
    #                   mean|b| = (2 + 10 + 12) / 3 = 8 -> scores 0.25, 1.25, 1.5
    #   the two largest scores are 1.5 (a[1]) and 1.5 (b[2]) -> one weight per layer.
    magnitude = global_magnitude_masks(params, 0.4)
    normalized = layer_normalized_masks(params, 0.4)
    assert magnitude["a"].tolist() == [False, False] and magnitude["b"].tolist() == [False, True, True]
    assert normalized["a"].tolist() == [False, True] and normalized["b"].tolist() == [False, False, True]


def test_layer_normalized_exact_count_on_model_and_zero_layer():
    model = small_preact()
    params = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    params["body.conv1.weight"].zero_()  # mean |w| = 0: scores 0, no NaN
    total = sum(p.numel() for p in params.values())
    masks = layer_normalized_masks(params, 0.2)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)
    assert masks["body.conv1.weight"].sum() == 0


def test_iterative_densities():
    assert iterative_densities(0.2, 1) == [0.2]
    ds = iterative_densities(0.125, 3)
    assert ds == pytest.approx([0.5, 0.25, 0.125]) and ds[-1] == 0.125
    assert all(a > b for a, b in zip(ds, ds[1:]))
    with pytest.raises(ValueError):
        iterative_densities(0.2, 0)


# -- rewinding and reinit ------------------------------------------------------------------------

def test_rewind_restores_initial_bit_for_bit():
    model = small_preact()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # "training": every parameter and BN statistic moves
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for name, b in model.named_buffers():
            if b.is_floating_point() and "normalize" not in name:
                b.mul_(1.7).add_(0.3)
    params = prunable_parameters(model)
    masks = global_magnitude_masks({n: p.detach() for n, p in params.items()}, 0.3)
    ids = {n: id(p) for n, p in model.named_parameters()}

    rewind_model_(model, initial, masks)
    state = model.state_dict()
    for name, value in state.items():
        if name in masks:
            m = masks[name]
            assert torch.equal(value[m].view(torch.int32), initial[name][m].view(torch.int32))  # bit for bit
            assert (value[~m] == 0).all()
        else:  # biases, BN affine and running statistics, Normalize buffers
            assert torch.equal(value, initial[name]), name
    assert ids == {n: id(p) for n, p in model.named_parameters()}  # same parameter objects

    # rewind_ on parameters only; a MaskSet works as the masks too
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    rewind_(params, initial, MaskSet(params, masks))
    for name, p in params.items():
        expected = torch.where(masks[name], initial[name], torch.zeros(()))
        assert torch.equal(p.detach(), expected)


def test_zero_pruned_writes_positive_zeros_where_apply_multiplies():
    """The two mask applications differ only in the sign of pruned zeros: the ticket functions
    write +0.0 (masked_fill), MaskSet.apply_ multiplies (-0.0 for a pruned negative weight)."""
    w = torch.tensor([[-2.0, 3.0], [-0.5, 1.5]])
    mask = torch.tensor([[False, True], [False, False]])
    filled, multiplied = w.clone(), nn.Parameter(w.clone())
    zero_pruned_({"w": filled}, {"w": mask})
    MaskSet({"w": multiplied}, {"w": mask}).apply_()
    assert filled.tolist() == multiplied.tolist() == [[0.0, 3.0], [0.0, 0.0]]
    assert torch.signbit(filled).tolist() == [[False, False], [False, False]]
    assert torch.signbit(multiplied.detach()).tolist() == [[True, False], [True, False]]
    with pytest.raises(ValueError, match="does not have"):
        zero_pruned_({"w": filled}, {"v": mask})


def test_rewind_model_accepts_wrapper_prefixes():
    model = small_preact()
    initial = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    rewind_model_(model, initial, {})
    assert all(torch.equal(v, initial[f"module.{k}"]) for k, v in model.state_dict().items())


def test_reinit_deterministic_by_seed_and_differs_from_init():
    model = small_preact()
    initial = copy.deepcopy(model.state_dict())
    params = prunable_parameters(model)
    masks = global_magnitude_masks({n: p.detach() for n, p in params.items()}, 0.25)
    rng_before = torch.random.get_rng_state()

    reinit_(model, masks, seed=7)
    first = copy.deepcopy(model.state_dict())
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    for name, m in masks.items():
        assert (first[name][~m] == 0).all()
        assert not torch.equal(first[name][m], initial[name][m])  # fresh values on survivors
    assert not torch.equal(first["body.linear.bias"], initial["body.linear.bias"])

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    reinit_(model, masks, seed=7)
    assert all(torch.equal(v, first[k]) for k, v in model.state_dict().items())
    reinit_(model, masks, seed=8)
    assert not torch.equal(model.state_dict()["body.conv1.weight"], first["body.conv1.weight"])


def test_reinit_resets_batchnorm_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.train()(torch.randn(2, 3, 6, 6))
    assert not torch.equal(model[1].running_mean, torch.zeros(4))
    reinit_(model, {}, seed=0)
    assert torch.equal(model[1].running_mean, torch.zeros(4)) and torch.equal(model[1].weight.detach(), torch.ones(4))
