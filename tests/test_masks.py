"""MaskSet and prunable-parameter selection on a tiny conv net (CPU, a fraction of a second)."""
import io

import pytest
import torch
from conftest import tiny_net
from torch import nn

from sparta.errors import CheckpointError
from sparta.sparse.masks import MaskSet, hamming_distance
from sparta.sparse.select import prunable_parameters, strip_wrapper_prefixes, unwrap

PRUNABLE = ["0.weight", "3.weight", "6.weight"]


def hand_masks(model: nn.Module) -> MaskSet:
    """Layer 0 keeps its first 54 of 216 weights, layer 3 none but 1 of 1152, layer 6 all 160."""
    masks = MaskSet.from_model(model)
    masks["0.weight"].view(-1)[54:] = False
    masks["3.weight"].view(-1)[1:] = False
    return masks


# -- selection ------------------------------------------------------------------------------------
def test_prunable_parameters_are_conv_and_linear_weights_only():
    model = tiny_net()
    params = prunable_parameters(model)
    assert list(params) == PRUNABLE  # biases, BN weight/bias excluded; BN stats are buffers
    assert all(params[name] is dict(model.named_parameters())[name] for name in PRUNABLE)


def test_exclude_patterns():
    assert list(prunable_parameters(tiny_net(), exclude=["0.*", "6.weight"])) == ["3.weight"]
    assert list(prunable_parameters(tiny_net(), exclude="0.*")) == ["3.weight", "6.weight"]


class CompiledStandIn(nn.Module):
    """What torch.compile returns (an OptimizedModule holding ``_orig_mod``), without importing dynamo."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._orig_mod = model


def test_names_are_those_of_the_unwrapped_model():
    model = tiny_net()
    compiled = CompiledStandIn(model)
    assert next(iter(dict(compiled.named_parameters()))) == "_orig_mod.0.weight"
    parallel = nn.DataParallel(model)
    assert unwrap(compiled) is model and unwrap(parallel) is model
    assert list(prunable_parameters(compiled)) == PRUNABLE
    assert list(prunable_parameters(parallel)) == PRUNABLE
    assert strip_wrapper_prefixes("module._orig_mod.3.weight") == "3.weight"
    assert MaskSet.from_model(compiled).params["3.weight"] is model[3].weight


# -- statistics on hand-made masks ----------------------------------------------------------------
def test_density_counts_and_layer_densities_exact():
    masks = hand_masks(tiny_net())
    assert masks.counts() == {"0.weight": 54, "3.weight": 1, "6.weight": 160}
    assert masks.layer_densities() == {"0.weight": 0.25, "3.weight": 1 / 1152, "6.weight": 1.0}
    assert masks.density() == (54 + 1 + 160) / (216 + 1152 + 160)
    assert MaskSet.from_model(tiny_net()).density() == 1.0


def test_distance_is_fraction_of_differing_positions():
    model = tiny_net()
    a, b = MaskSet.from_model(model), hand_masks(model)
    assert a.distance(a) == 0.0
    assert a.distance(b) == (162 + 1151) / 1528
    assert b.distance(a.state_dict()) == (162 + 1151) / 1528  # plain dicts work too
    with pytest.raises(ValueError):
        a.distance({"0.weight": a["0.weight"]})


def test_hamming_distance_pools_mappings_like_one_flat_mask():
    a = {"x": torch.tensor([[True, False], [True, True]]), "y": torch.tensor([False, False, True, True, True, True])}
    b = {"y": torch.tensor([True, False, True, True, True, False]), "x": torch.tensor([[True, True], [True, True]])}
    assert hamming_distance(a, b) == 3 / 10  # x: 1 differs, y: 2 differ, 10 positions

    def flat(m):
        return torch.cat([m[n].reshape(-1) for n in ("x", "y")])

    assert hamming_distance(flat(a), flat(b)) == 3 / 10
    assert hamming_distance({}, {}) == 0.0 and hamming_distance(torch.ones(0), torch.ones(0)) == 0.0
    with pytest.raises(ValueError, match="different tensors"):
        hamming_distance(a, {"x": b["x"]})
    with pytest.raises(ValueError, match="shape"):
        hamming_distance(a, {**b, "y": torch.ones(2, 3, dtype=torch.bool)})


# -- in-place operations --------------------------------------------------------------------------
def test_apply_zeroes_pruned_weights_only():
    model = tiny_net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = hand_masks(model)
    masks.apply_()
    for name, p in model.named_parameters():
        if name in masks.masks:
            assert torch.equal(p[~masks[name]], torch.zeros_like(p[~masks[name]]))
            assert torch.equal(p[masks[name]], before[name][masks[name]])
        else:
            assert torch.equal(p, before[name])


def test_float_masks_follow_in_place_edits_without_reallocating():
    model = tiny_net()
    masks = MaskSet.from_model(model)
    mask_ids = {n: id(m) for n, m in masks.items()}
    float_ptrs = [f.data_ptr() for f in masks._float_masks()]
    masks["3.weight"][0, 0, 0, 0] = False  # edit from outside the class
    masks.apply_()
    assert model[3].weight[0, 0, 0, 0].item() == 0.0
    assert {n: id(m) for n, m in masks.items()} == mask_ids
    assert [f.data_ptr() for f in masks._float_masks()] == float_ptrs
    assert masks._float_masks()[1].dtype == model[3].weight.dtype


def test_mask_grads_skips_missing_grads():
    model = tiny_net()
    masks = hand_masks(model)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[3].weight.grad = None
    model[6].weight.grad = torch.ones_like(model[6].weight)
    masks.mask_grads_()
    assert torch.equal(model[0].weight.grad, masks["0.weight"].float())
    assert model[3].weight.grad is None
    assert torch.equal(model[6].weight.grad, torch.ones(10, 16))


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=0.1, amsgrad=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.1),
])
def test_zero_optimizer_state(make_optimizer):
    model = tiny_net()
    optimizer = make_optimizer(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    masks = hand_masks(model)
    weight = model[0].weight
    buffers = [v for v in optimizer.state[weight].values() if v.shape == weight.shape]
    assert buffers and all(b.ne(0).all() for b in buffers)
    # explicit positions: only those change
    where = torch.zeros_like(masks["0.weight"])
    where[0, 0, 0, 0] = True
    masks.zero_optimizer_state_(optimizer, {"0.weight": where})
    for b in buffers:
        assert b[0, 0, 0, 0] == 0 and b.ne(0).sum() == weight.numel() - 1
    # default: every masked-out position of every layer, nothing else
    before = {id(v): v.clone() for s in optimizer.state.values() for v in s.values()}
    masks.zero_optimizer_state_(optimizer)
    for name, p in masks.params.items():
        for b in (v for v in optimizer.state[p].values() if v.shape == p.shape):
            assert torch.equal(b[~masks[name]], torch.zeros_like(b[~masks[name]]))
            assert torch.equal(b[masks[name]], before[id(b)][masks[name]])
    assert not isinstance(optimizer, torch.optim.Adam) or optimizer.state[weight]["step"] == 1


# -- checkpoints ----------------------------------------------------------------------------------
def test_state_dict_is_a_cpu_clone_and_load_copies_in_place():
    model = tiny_net()
    masks = hand_masks(model)
    state = masks.state_dict()
    assert all(v.dtype == torch.bool and v.device.type == "cpu" for v in state.values())
    state["6.weight"][0, 0] = False
    assert masks["6.weight"].all()  # a clone, not a view

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    other = MaskSet.from_model(model)
    ids = {n: (id(m), m.data_ptr()) for n, m in other.items()}
    other.load_state_dict(loaded)
    assert {n: (id(m), m.data_ptr()) for n, m in other.items()} == ids
    assert other.counts() == {"0.weight": 54, "3.weight": 1, "6.weight": 159}
    other.apply_()  # the float companions follow the loaded masks
    assert model[6].weight[0, 0].item() == 0.0


def test_load_state_dict_rejects_mismatches():
    masks = MaskSet.from_model(tiny_net())
    state = masks.state_dict()
    with pytest.raises(CheckpointError, match="missing"):
        masks.load_state_dict({k: v for k, v in state.items() if k != "3.weight"})
    with pytest.raises(CheckpointError, match="unexpected"):
        masks.load_state_dict({**state, "9.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(CheckpointError, match="shape"):
        masks.load_state_dict({**state, "6.weight": torch.ones(16, 10, dtype=torch.bool)})


def test_random_masks_have_exact_total():
    model = tiny_net()
    masks = MaskSet.random(model, 0.2, "igq", seed=3)
    assert sum(masks.counts().values()) == round(0.2 * 1528)
    same = MaskSet.random(model, 0.2, "igq", seed=3)
    assert masks.distance(same) == 0.0
    assert masks.distance(MaskSet.random(model, 0.2, "igq", seed=4)) > 0.0
