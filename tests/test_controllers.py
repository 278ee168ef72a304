"""Sparsity controllers on a tiny conv net, with the hooks called in the loop's order:
backward -> after_backward -> optimizer.step -> after_step (CPU, a few seconds)."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_net
from torch import nn

from sparta.errors import ConfigError
from sparta.sparse.controllers import AdaptiveDensity, Dense, DynamicSparse, Static, random_static
from sparta.sparse.masks import MaskSet
from sparta.sparse.tickets import select_k_mask

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=5e-4, amsgrad=True),  # L2 decay via the grad
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),  # decoupled decay
}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of a step depends only on the step, so split and resumed runs see the same batches."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def train(model, optimizer, controller, steps: range, *, call_after_step=True, inspect=None, end_epoch=None,
          snapshot=None):
    """The loop's order; ``inspect(step, before)`` runs right after ``after_backward``, with ``before``
    what ``snapshot()`` returned right before it (default: a copy of the masks)."""
    masks = getattr(controller, "masks", None)
    for step in steps:
        x, y = batch(step)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        before = (snapshot() if snapshot else copy.deepcopy(masks.masks)) if inspect else None
        controller.after_backward(step)
        if inspect:
            inspect(step, before)
        optimizer.step()
        if call_after_step:
            controller.after_step(step)
        if end_epoch:
            end_epoch(step)


def per_weight_state(optimizer, p) -> list[torch.Tensor]:
    return [v for v in optimizer.state[p].values() if isinstance(v, torch.Tensor) and v.shape == p.shape]


def assert_pruned_weights_and_state_zero(masks: MaskSet, optimizer):
    for name, p in masks.params.items():
        pruned = ~masks[name]
        assert torch.equal(p.detach()[pruned], torch.zeros(int(pruned.sum())))
        for buf in per_weight_state(optimizer, p):
            assert torch.equal(buf[pruned], torch.zeros(int(pruned.sum())))


# -- Static ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("call_after_step", [True, False], ids=["with_after_step", "grad_masking_only"])
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_static_keeps_pruned_weights_and_optimizer_state_exactly_zero(opt, call_after_step):
    # grad_masking_only proves the claim in Static.after_step: masked grads + zeroed state suffice
    # for SGD (momentum, nesterov, weight decay), Adam (amsgrad, L2) and AdamW.
    model = tiny_net()
    optimizer = OPTIMIZERS[opt](model.parameters())
    param_ids = [id(p) for p in model.parameters()]
    masks = MaskSet.random(model, 0.3, "igq", seed=0)
    mask_ids = {name: id(m) for name, m in masks.items()}
    counts = masks.counts()
    initial = {name: p.detach().clone() for name, p in masks.params.items()}
    controller = Static(model, optimizer, masks)
    train(model, optimizer, controller, range(50), call_after_step=call_after_step)
    assert_pruned_weights_and_state_zero(masks, optimizer)
    for name, p in masks.params.items():  # the kept weights did train
        assert not torch.equal(p.detach()[masks[name]], initial[name][masks[name]])
    assert [id(p) for p in model.parameters()] == param_ids
    assert [id(p) for group in optimizer.param_groups for p in group["params"]] == param_ids
    assert {name: id(m) for name, m in masks.items()} == mask_ids
    assert masks.counts() == counts


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_all_ones_masks_change_nothing_bit_for_bit(opt):
    dense_model = tiny_net()
    masked_model = copy.deepcopy(dense_model)
    dense_opt, masked_opt = OPTIMIZERS[opt](dense_model.parameters()), OPTIMIZERS[opt](masked_model.parameters())
    train(dense_model, dense_opt, Dense(), range(20))
    train(masked_model, masked_opt, Static(masked_model, masked_opt, MaskSet.from_model(masked_model)), range(20))

    def bits(t):
        return t.detach().view(torch.int32)

    for a, b in zip(dense_model.state_dict().values(), masked_model.state_dict().values()):
        assert torch.equal(a.view(torch.int32) if a.is_floating_point() else a, bits(b) if b.is_floating_point() else b)
    for pa, pb in zip(dense_model.parameters(), masked_model.parameters()):
        for sa, sb in zip(dense_opt.state[pa].values(), masked_opt.state[pb].values()):
            assert torch.equal(sa.view(torch.int32), sb.view(torch.int32))


def test_static_construction_prunes_weights_and_existing_momentum():
    model = tiny_net()
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    train(model, optimizer, Dense(), range(3))  # momentum buffers are dense and nonzero now
    controller = random_static(model, optimizer, density=0.2, distribution="erk", seed=1)
    assert_pruned_weights_and_state_zero(controller.masks, optimizer)
    assert sum(controller.masks.counts().values()) == round(0.2 * 1528)
    assert controller.epoch_log() == {"density": round(0.2 * 1528) / 1528}


def test_static_state_dict_round_trip_copies_in_place():
    model = tiny_net()
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    saved = random_static(model, optimizer, 0.3, seed=2)
    state = saved.state_dict()
    assert set(saved.mask_state()) == {"0.weight", "3.weight", "6.weight"}
    fresh_model = tiny_net(seed=1)
    fresh_opt = OPTIMIZERS["sgd"](fresh_model.parameters())
    fresh = Static(fresh_model, fresh_opt, MaskSet.from_model(fresh_model))
    ids = {name: (id(m), m.data_ptr()) for name, m in fresh.masks.items()}
    fresh.load_state_dict(state)
    assert {name: (id(m), m.data_ptr()) for name, m in fresh.masks.items()} == ids
    assert fresh.masks.distance(saved.masks) == 0.0
    assert_pruned_weights_and_state_zero(fresh.masks, fresh_opt)  # loading applies the masks


def test_masks_of_another_model_are_refused():
    with pytest.raises(ValueError, match="not the model's"):
        Static(tiny_net(), OPTIMIZERS["sgd"](tiny_net().parameters()), MaskSet.from_model(tiny_net()))


# -- DynamicSparse (Flying Bird) ------------------------------------------------------------------
def flying_bird(model, optimizer, density=0.3, distribution="igq", **kwargs) -> DynamicSparse:
    return DynamicSparse(model, optimizer, MaskSet.random(model, density, distribution, seed=1), **kwargs)


def test_cosine_drop_fraction_schedule():
    model = tiny_net()
    fb = flying_bird(model, OPTIMIZERS["sgd"](model.parameters()), total_steps=1000)
    assert fb.drop_fraction(0) == 0.5
    assert fb.drop_fraction(500) == pytest.approx((0.5 + 0.005) / 2, abs=1e-15)
    assert fb.drop_fraction(1000) == pytest.approx(0.005, abs=1e-15)
    assert fb.drop_fraction(250) == pytest.approx(0.005 + 0.4950 / 2 * (1 + math.cos(math.pi / 4)))


def test_update_cadence_switches_at_late_from_step():
    model = tiny_net()
    optimizer = OPTIMIZERS["sgd"](model.parameters())

    def updates(fb):
        return [s for s in range(130) if fb.is_update_step(s)]

    fb = flying_bird(model, optimizer, total_steps=100, update_every=10, update_every_late=15, late_from_step=50)
    assert updates(fb) == [10, 20, 30, 40, 60, 75, 90]  # never at step 0 or from total_steps on
    assert flying_bird(model, optimizer, total_steps=100, update_every=10, update_every_late=15).late_from_step == 50
    fixed = flying_bird(model, optimizer, total_steps=100, update_every=10, update_every_late=None)
    assert updates(fixed) == [10, 20, 30, 40, 50, 60, 70, 80, 90]


@pytest.mark.parametrize("growth", ["random", "gradient"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_every_update_keeps_exact_counts_and_starts_grown_weights_at_zero(growth, opt):
    model = tiny_net()
    optimizer = OPTIMIZERS[opt](model.parameters())
    fb = flying_bird(model, optimizer, total_steps=60, update_every=3, update_every_late=None, growth=growth)
    target = fb.masks.counts()
    mask_ids = {name: id(m) for name, m in fb.masks.items()}
    float_ptrs = [f.data_ptr() for f in fb.masks._float_masks()]
    seen = []

    def inspect(step, before):
        assert fb.masks.counts() == target
        if not fb.is_update_step(step):
            return
        seen.append(step)
        r = fb.drop_fraction(step)
        for name, p in fb.masks.params.items():
            old, new = before[name], fb.masks[name]
            dropped, grown = old & ~new, new & ~old
            n_drop = min(math.ceil(r * target[name]), old.numel() - target[name])
            assert int(dropped.sum()) == n_drop == int(grown.sum())  # nothing dropped is regrown
            assert fb.last_update["dropped"][name] == n_drop
            assert torch.equal(p.detach()[dropped | grown], torch.zeros(2 * n_drop))
            for buf in per_weight_state(optimizer, p):
                assert torch.equal(buf[dropped | grown], torch.zeros(2 * n_drop))
            assert torch.equal(p.grad[~new], torch.zeros(int((~new).sum())))  # grads masked with the new mask
            assert fb.last_update["changed"][name] == 2 * n_drop  # "exclusive": everything dropped or grown
        assert fb.update_log[-1]["step"] == step
        assert fb.update_log[-1]["changed"] == sum(fb.last_update["changed"].values())
        assert fb.update_log[-1]["changed_by_layer"] == fb.last_update["changed"]

    train(model, optimizer, fb, range(60), inspect=inspect)
    assert seen == list(range(3, 60, 3)) and fb.topology_updates == len(seen)
    assert_pruned_weights_and_state_zero(fb.masks, optimizer)
    assert {name: id(m) for name, m in fb.masks.items()} == mask_ids
    assert [f.data_ptr() for f in fb.masks._float_masks()] == float_ptrs
    log = fb.epoch_log()
    assert log["topology_updates"] == 19 and log["density"] == fb.masks.density()
    assert log["drop_fraction"] == fb.drop_fraction(59)
    assert fb.regrowth == "exclusive"  # the default
    assert log["topology_changed_total"] == sum(e["dropped"] + e["grown"] for e in fb.update_log) > 0


def half_active_gradient_growth(**kw):
    """A 4x4 linear layer, flat positions 0..7 active with |w| 0.8 .. 0.1 (8..15 inactive), under
    gradient growth at r = 0.5 with an update at step 5: (model, SGD with momentum, controller)."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masks = MaskSet.from_model(model)
    masks["0.weight"].view(-1)[8:] = False
    fb = DynamicSparse(model, optimizer, masks, total_steps=10, update_every=5, update_every_late=None,
                       drop_fraction=0.5, drop_fraction_final=0.5, growth="gradient", **kw)
    with torch.no_grad():
        model[0].weight.view(-1)[:8] = torch.tensor([0.8, -0.1, 0.7, 0.2, -0.6, 0.3, 0.5, 0.4])
    return model, optimizer, fb


def test_gradient_growth_picks_largest_inactive_gradients():
    model, optimizer, fb = half_active_gradient_growth()
    masks = fb.masks
    weight = model[0].weight
    # dropped positions (1, 3, 5, 7) get huge grads: they must not come back in the same update
    grad = torch.tensor([1, 100, 1, 100, 1, 100, 1, 100, 0.1, -5, 0.3, 4, 0.2, -3, 2, 0.05])
    weight.grad = grad.view(4, 4).clone()
    fb.after_backward(5)
    assert masks["0.weight"].view(-1).nonzero().view(-1).tolist() == [0, 2, 4, 6, 9, 11, 13, 14]
    assert weight.view(-1)[[1, 3, 5, 7, 9, 11, 13, 14]].tolist() == [0.0] * 8
    assert weight.grad.view(-1).tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 0, -5, 0, 4, 0, -3, 2, 0]


def state_snapshot(fb: DynamicSparse, optimizer):
    """Copies of masks, weights and per-weight optimizer state, taken before ``after_backward``."""
    return {name: (fb.masks[name].clone(), p.detach().clone(), [b.clone() for b in per_weight_state(optimizer, p)])
            for name, p in fb.masks.params.items()}


@pytest.mark.parametrize("growth", ["random", "gradient"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_authors_regrowth_keeps_redrawn_weights_and_restarts_only_flipped_ones(growth, opt):
    model = tiny_net()
    optimizer = OPTIMIZERS[opt](model.parameters())
    fb = flying_bird(model, optimizer, total_steps=60, update_every=3, update_every_late=None, growth=growth,
                     regrowth="authors")
    target = fb.masks.counts()
    redrawn_total = 0

    def inspect(step, before):
        nonlocal redrawn_total
        assert fb.masks.counts() == target
        if not fb.is_update_step(step):
            return
        r = fb.drop_fraction(step)
        for name, p in fb.masks.params.items():
            old, w_old, state_old = before[name]
            new = fb.masks[name]
            n_drop = math.ceil(r * target[name])  # no cap at the inactive count under "authors"
            # the drop: the n_drop smallest |w| active before (same tie rule as the controller)
            drop = select_k_mask(w_old.abs().reshape(-1).masked_fill(~old.reshape(-1), math.inf), n_drop,
                                 largest=False).view_as(old)
            grow = new & ~(old & ~drop)  # active now and not a survivor of the drop
            assert fb.last_update["dropped"][name] == n_drop == int(grow.sum()) == fb.last_update["grown"][name]
            redrawn, flipped = drop & new, old ^ new
            redrawn_total += int(redrawn.sum())
            assert torch.equal(flipped, (drop & ~new) | (new & ~old))
            assert fb.last_update["changed"][name] == int(flipped.sum()) == 2 * (n_drop - int(redrawn.sum()))
            # flipped positions (dropped only, newly grown) restart at 0 with zeroed state
            assert torch.equal(p.detach()[flipped], torch.zeros(int(flipped.sum())))
            # every position active before and after, re-drawn ones included, is untouched bit for bit
            keep = old & new
            assert torch.equal(p.detach()[keep].view(torch.int32), w_old[keep].view(torch.int32))
            for buf, buf_old in zip(per_weight_state(optimizer, p), state_old, strict=True):
                assert torch.equal(buf[flipped], torch.zeros(int(flipped.sum())))
                assert torch.equal(buf[keep].view(torch.int32), buf_old[keep].view(torch.int32))
            assert torch.equal(p.grad[~new], torch.zeros(int((~new).sum())))
        assert fb.update_log[-1]["changed"] == sum(fb.last_update["changed"].values())

    train(model, optimizer, fb, range(60), inspect=inspect, snapshot=lambda: state_snapshot(fb, optimizer))
    assert fb.topology_updates == 19
    assert redrawn_total > 0  # the rule was exercised: some dropped weights were drawn again
    assert_pruned_weights_and_state_zero(fb.masks, optimizer)
    assert fb.epoch_log()["topology_changed_total"] == sum(e["changed"] for e in fb.update_log)


def test_authors_regrowth_by_hand_with_gradient_growth():
    model, optimizer, fb = half_active_gradient_growth(regrowth="authors")
    masks = fb.masks
    weight = model[0].weight
    momentum = torch.cat([torch.arange(1.0, 9.0), torch.zeros(8)]).view(4, 4)
    optimizer.state[weight]["momentum_buffer"] = momentum.clone()
    # drop ceil(0.5 * 8) = 4 smallest |w|: 1, 3, 5, 7. Candidates: 1, 3, 5, 7 and 8..15; the 4 largest
    # |grad| among them are 1 (100), 5 (50), 9 (5), 11 (4): 1 and 5 are re-drawn, 3 and 7 only dropped.
    grad = torch.tensor([1, 100, 1, 0.01, 1, 50, 1, 0.02, 0.1, -5, 0.3, 4, 0.2, -3, 2, 0.05])
    weight.grad = grad.view(4, 4).clone()
    fb.after_backward(5)
    assert masks["0.weight"].view(-1).nonzero().view(-1).tolist() == [0, 1, 2, 4, 5, 6, 9, 11]
    assert weight.view(-1).tolist() == pytest.approx([0.8, -0.1, 0.7, 0, -0.6, 0.3, 0.5, 0] + [0] * 8)
    assert optimizer.state[weight]["momentum_buffer"].view(-1).tolist() == [1, 2, 3, 0, 5, 6, 7, 0] + [0] * 8
    assert fb.last_update == {"dropped": {"0.weight": 4}, "grown": {"0.weight": 4}, "changed": {"0.weight": 4}}
    assert fb.update_log[-1]["changed"] == 4 and fb.update_log[-1]["changed_by_layer"] == {"0.weight": 4}


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_authors_regrowth_redraws_everything_when_only_dropped_positions_are_free(growth):
    # a dense layer: the positions inactive after the drop are exactly the dropped ones, so all of
    # them are drawn again and nothing changes (under "exclusive" the drop is capped at 0 instead)
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    weight = model[0].weight
    optimizer.state[weight]["momentum_buffer"] = torch.randn(4, 4)
    fb = DynamicSparse(model, optimizer, MaskSet.from_model(model), total_steps=10, update_every=5,
                       update_every_late=None, drop_fraction=0.5, drop_fraction_final=0.5, growth=growth,
                       regrowth="authors")
    w, m = weight.detach().clone(), optimizer.state[weight]["momentum_buffer"].clone()
    weight.grad = torch.randn(4, 4)
    fb.after_backward(5)
    assert fb.masks["0.weight"].all()
    assert torch.equal(weight.detach(), w) and torch.equal(optimizer.state[weight]["momentum_buffer"], m)
    assert fb.last_update == {"dropped": {"0.weight": 8}, "grown": {"0.weight": 8}, "changed": {"0.weight": 0}}


def test_authors_random_growth_draws_just_dropped_positions_uniformly():
    # 8 of 16 active, r = 0.5: drop 4, grow 4 uniformly among the 4 dropped + 8 inactive positions, so a
    # dropped weight is re-drawn with probability 4/12 and on average 4 * 4/12 = 4/3 are re-drawn per update
    redrawn, draws = [], 300
    for seed in range(draws):
        model = nn.Sequential(nn.Linear(4, 4, bias=False))
        masks = MaskSet.from_model(model)
        masks["0.weight"].view(-1)[8:] = False
        with torch.no_grad():
            model[0].weight.view(-1)[:8] = torch.tensor([0.8, -0.1, 0.7, 0.2, -0.6, 0.3, 0.5, 0.4])
        fb = DynamicSparse(model, torch.optim.SGD(model.parameters(), lr=0.1), masks, total_steps=10,
                           update_every=5, update_every_late=None, drop_fraction=0.5, drop_fraction_final=0.5,
                           regrowth="authors", seed=seed)
        fb.after_backward(5)
        active = masks["0.weight"].view(-1)
        assert int(active.sum()) == 8 and active[[0, 2, 4, 6]].all()  # the 4 largest |w| survive
        redrawn.append(int(active[[1, 3, 5, 7]].sum()))
        assert fb.last_update["changed"]["0.weight"] == 2 * (4 - redrawn[-1])
    assert sum(redrawn) / draws == pytest.approx(4 / 3, abs=0.2)  # 4+ standard errors of the mean
    assert 0 in redrawn and max(redrawn) >= 3


def test_old_update_logs_without_churn_still_load():
    model = tiny_net()
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    fb = flying_bird(model, optimizer, total_steps=30, update_every=5, update_every_late=None)
    train(model, optimizer, fb, range(12))
    state = fb.state_dict()
    for entry in state["update_log"]:  # as written before churn was logged
        del entry["changed"], entry["changed_by_layer"]
    fresh_model = tiny_net()
    fresh = flying_bird(fresh_model, OPTIMIZERS["sgd"](fresh_model.parameters()), total_steps=30, update_every=5,
                        update_every_late=None)
    fresh.load_state_dict(state)
    assert [e["changed"] for e in fresh.update_log] == [e["changed"] for e in fb.update_log]
    assert fresh.epoch_log()["topology_changed_total"] == fb.epoch_log()["topology_changed_total"] > 0


def test_ties_go_to_the_lowest_index():
    assert (select_k_mask(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0]), 2, largest=False).tolist()
            == [False, True, True, False, False])
    assert select_k_mask(torch.tensor([0.5, 0.0, 0.5, 0.5]), 3, largest=False).tolist() == [True, True, True, False]
    assert not select_k_mask(torch.tensor([3.0, 1.0]), 0, largest=False).any()


def test_bad_dynamic_settings_are_config_errors():
    model = tiny_net()
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    with pytest.raises(ConfigError, match="random, gradient"):
        flying_bird(model, optimizer, total_steps=10, growth="momentum")
    with pytest.raises(ConfigError, match="drop_fraction"):
        flying_bird(model, optimizer, total_steps=10, drop_fraction=1.5)
    with pytest.raises(ConfigError, match="exclusive, authors"):
        flying_bird(model, optimizer, total_steps=10, regrowth="rigl")
    with pytest.raises(ConfigError, match="window"):
        AdaptiveDensity(model, optimizer, MaskSet.from_model(model), total_steps=10, steps_per_epoch=2,
                        adapt_from_epoch=1, window=1)


def fb_plus(model, optimizer, **kwargs) -> AdaptiveDensity:
    args = dict(total_steps=1000, update_every=10, update_every_late=None, steps_per_epoch=10, adapt_from_epoch=3,
                drop_fraction=0.5, drop_fraction_final=0.5)  # r = 0.5 throughout: counts by hand below
    return AdaptiveDensity(model, optimizer, MaskSet.random(model, 0.3, "uniform", seed=1), **{**args, **kwargs})


def metrics(gap: float, loss: float) -> dict[str, float]:
    return {"train_robust_acc": 0.25 + gap, "window_val_robust_acc": 0.25, "window_val_robust_loss": loss}


UP, DOWN, FLAT = [1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [3, 3, 3, 3, 3]
# uniform 0.3 of (216, 1152, 160) weights: exactly 458 kept as 65 / 345 / 48. With r = 0.5:
# n_drop = ceil(r nnz) = 33 / 173 / 24; prune more drops ceil(0.4 r nnz) = 13 / 69 / 10 extra;
# grow more regrows ceil(0.05 n_drop) = 2 / 9 / 2 extra.
FB_PLUS_CASES = {
    "prune_more_only": (UP, DOWN, True, False, [52, 276, 38]),
    "grow_more_only": (DOWN, UP, False, True, [67, 354, 50]),
    "both": (UP, FLAT, True, True, [54, 285, 40]),  # a flat loss "did not decrease" (paper: diff >= 0)
    "neither": (DOWN, DOWN, False, False, [65, 345, 48]),
    "flat_gap_does_not_prune": (FLAT, DOWN, False, False, [65, 345, 48]),
    "half_the_differences_is_enough": ([1, 2, 1, 2, 1], [5, 4, 5, 4, 3], True, False, [52, 276, 38]),
}


@pytest.mark.parametrize("regrowth", ["exclusive", "authors"])  # same counts: inactive pools are large here
@pytest.mark.parametrize("case", FB_PLUS_CASES)
def test_fb_plus_decisions_and_resulting_counts(case, regrowth):
    gaps, losses, prune_more, grow_more, expected = FB_PLUS_CASES[case]
    model = tiny_net()
    fbp = fb_plus(model, OPTIMIZERS["sgd"](model.parameters()), regrowth=regrowth)
    assert list(fbp.masks.counts().values()) == [65, 345, 48]
    for epoch, (gap, loss) in enumerate([(-9, 9), (9, -9)] + list(zip(gaps, losses))):  # only the last 5 count
        fbp.end_epoch(epoch, metrics(gap, loss))
    fbp.after_backward(30)  # epoch 3 = adapt_from_epoch: the rule is active
    assert list(fbp.masks.counts().values()) == expected
    decision = fbp.decisions[-1]
    assert (decision["step"], decision["epoch"]) == (30, 3)
    assert (decision["prune_more"], decision["grow_more"]) == (prune_more, grow_more)
    assert decision["density_before"] == 458 / 1528 and decision["density_after"] == sum(expected) / 1528
    log = fbp.epoch_log()
    assert (log["fbplus_prune_more"], log["fbplus_grow_more"]) == (int(prune_more), int(grow_more))
    assert log["density"] == sum(expected) / 1528


# A dense last layer (160 weights, 0 inactive), r = 0.5, both rules firing. "exclusive": n_drop is capped
# at 0 inactive, extra drop ceil(0.4 * 0.5 * 160) = 32, no growth fits -> 128. "authors": n_drop = 80,
# extra drop 32, grow 80 + min(ceil(0.05 * 80) = 4, 32 extra-dropped free positions) = 84 -> 132.
@pytest.mark.parametrize("regrowth, last_layer", [("exclusive", 128), ("authors", 132)])
def test_fb_plus_counts_on_a_dense_layer_depend_on_the_rule(regrowth, last_layer):
    model = tiny_net()
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    masks = MaskSet.random(model, 0.3, "uniform", seed=1)
    masks["6.weight"].fill_(True)
    fbp = AdaptiveDensity(model, optimizer, masks, total_steps=1000, update_every=10, update_every_late=None,
                          steps_per_epoch=10, adapt_from_epoch=3, drop_fraction=0.5, drop_fraction_final=0.5,
                          regrowth=regrowth)
    for epoch, (gap, loss) in enumerate(zip(UP, FLAT)):
        fbp.end_epoch(epoch, metrics(gap, loss))
    before = {name: m.clone() for name, m in fbp.masks.items()}
    fbp.after_backward(30)
    assert (fbp.decisions[-1]["prune_more"], fbp.decisions[-1]["grow_more"]) == (True, True)
    assert list(fbp.masks.counts().values()) == [54, 285, last_layer]  # first two as in FB_PLUS_CASES["both"]
    last = fbp.last_update
    assert ((last["dropped"]["6.weight"], last["grown"]["6.weight"])
            == ((32, 0) if regrowth == "exclusive" else (112, 84)))
    assert last["changed"] == {name: int((before[name] ^ m).sum()) for name, m in fbp.masks.items()}
    assert_pruned_weights_and_state_zero(fbp.masks, optimizer)


def test_fb_plus_waits_for_adapt_from_epoch_and_a_full_window():
    model = tiny_net()
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    early = fb_plus(model, optimizer)
    for epoch in range(5):
        early.end_epoch(epoch, metrics(UP[epoch], UP[epoch]))
    early.after_backward(20)  # epoch 2 < adapt_from_epoch: a plain Flying Bird update
    assert early.topology_updates == 1 and early.decisions == []
    assert list(early.masks.counts().values()) == [65, 345, 48]

    short = fb_plus(model, optimizer)
    for epoch in range(4):  # one epoch short of the window
        short.end_epoch(epoch, metrics(UP[epoch], UP[epoch]))
    short.after_backward(30)
    assert short.decisions == [] and list(short.masks.counts().values()) == [65, 345, 48]
    short.end_epoch(4, metrics(5, 5))
    short.after_backward(40)
    assert [(d["prune_more"], d["grow_more"]) for d in short.decisions] == [(True, True)]


def test_fb_plus_needs_window_validation_metrics_every_epoch():
    model = tiny_net()
    fbp = fb_plus(model, OPTIMIZERS["sgd"](model.parameters()), window_val_images=7)
    assert fbp.epoch_val_images == 7  # the loop measures the window on the first 7 validation images
    with pytest.raises(ConfigError, match="window_val_robust_loss"):
        fbp.end_epoch(0, {"train_robust_acc": 0.5, "window_val_robust_acc": 0.4})
    with pytest.raises(ConfigError, match="window_val_robust_acc"):  # an evaluated epoch's numbers are not enough
        fbp.end_epoch(0, {"train_robust_acc": 0.5, "val_robust_acc": 0.4, "val_robust_loss": 1.0})
    with pytest.raises(ConfigError, match="window_val_images"):
        fb_plus(model, OPTIMIZERS["sgd"](model.parameters()), window_val_images=0)


# -- resuming -------------------------------------------------------------------------------------
def build_run(kind: str, regrowth: str = "exclusive"):
    torch.manual_seed(123)  # same global RNG state for model init in both runs
    model = tiny_net(seed=123)
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    masks = MaskSet.random(model, 0.3, "igq", seed=5)
    args = dict(total_steps=40, update_every=4, update_every_late=6, late_from_step=20, seed=7, regrowth=regrowth)
    if kind == "fb":
        return model, optimizer, DynamicSparse(model, optimizer, masks, **args)
    controller = AdaptiveDensity(model, optimizer, masks, steps_per_epoch=4, adapt_from_epoch=2, window=3, **args)
    return model, optimizer, controller


def epoch_ender(controller):
    def end_epoch(step):  # a made-up history whose gap keeps rising and loss alternates
        if isinstance(controller, AdaptiveDensity) and (step + 1) % 4 == 0:
            epoch = step // 4
            controller.end_epoch(epoch, metrics(epoch * 0.01, 1.0 + (epoch % 2)))
    return end_epoch


@pytest.mark.parametrize("regrowth", ["exclusive", "authors"])
@pytest.mark.parametrize("kind", ["fb", "fb_plus"])
def test_resume_equals_uninterrupted_run(kind, regrowth):
    model, optimizer, controller = build_run(kind, regrowth)
    train(model, optimizer, controller, range(40), end_epoch=epoch_ender(controller))

    first_model, first_opt, first = build_run(kind, regrowth)
    train(first_model, first_opt, first, range(20), end_epoch=epoch_ender(first))
    buffer = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "optimizer": first_opt.state_dict(),
                "controller": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # what sparta's checkpoints allow
    resumed_model, resumed_opt, resumed = build_run(kind, regrowth)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["controller"])
    train(resumed_model, resumed_opt, resumed, range(20, 40), end_epoch=epoch_ender(resumed))

    assert controller.topology_updates == resumed.topology_updates == 7  # 4, 8, 12, 16 then 24, 30, 36
    assert controller.update_log == resumed.update_log
    churn = sum(e["changed"] for e in controller.update_log)
    moved = sum(e["dropped"] + e["grown"] for e in controller.update_log)
    assert churn < moved if regrowth == "authors" else churn == moved  # re-drawn weights do not churn
    assert all(torch.equal(controller.masks[n], resumed.masks[n]) for n in controller.masks)
    for a, b in zip(model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    if kind == "fb_plus":
        assert controller.decisions == resumed.decisions and len(controller.decisions) > 0
        assert controller.history == resumed.history


def test_every_controller_declares_what_the_loop_reads():
    """The loop reads masks, topology_updates and done on every controller (SparsityController)."""
    from sparta.sparse.early_bird import EarlyBirdSearch

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    static = Static(model, optimizer, MaskSet.from_model(model))
    dynamic = DynamicSparse(model, optimizer, MaskSet.from_model(model), total_steps=10)
    search = EarlyBirdSearch(model, density=0.5)
    for controller, has_masks in ((Dense(), False), (static, True), (dynamic, True), (search, False)):
        assert (controller.masks is not None) == has_masks
        assert controller.topology_updates == 0 and controller.done is False
        assert controller.epoch_val_images == 0  # only Flying Bird+ asks for a validation every epoch
