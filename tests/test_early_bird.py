"""Early-bird detection on hand-made mask sequences, on real models, and as a controller (CPU, seconds)."""
import io

import pytest
import torch
from torch import nn

from sparta.errors import ConfigError
from sparta.models import create_model
from sparta.sparse.early_bird import EarlyBirdDetector, EarlyBirdSearch, hamming_distance

N = 100  # positions of the hand-made masks: k differing positions = distance k / 100 exactly


def base_mask() -> torch.Tensor:
    mask = torch.zeros(N, dtype=torch.bool)
    mask[:50] = True
    return mask


def flipped(mask: torch.Tensor, positions) -> torch.Tensor:
    out = mask.clone()
    out[list(positions)] = ~out[list(positions)]
    return out


def detector(**kwargs) -> EarlyBirdDetector:
    return EarlyBirdDetector(None, density=0.5, **kwargs)


def test_never_before_window_masks():
    det = detector()
    m = base_mask()
    for _ in range(4):  # identical masks, but fewer than 5
        assert det.observe(mask=m) is None
        assert not det.found and det.found_at is None and det.last_distance is None
    assert det.observe(mask=m) == 0.0  # the 5th
    assert det.found and det.found_at == 4


def test_fires_exactly_at_threshold():
    # newest differs from the 4 older ones in 5, 8, 2 and 8 positions -> largest distance 0.08 = threshold
    m = base_mask()
    newest = flipped(m, range(90, 98))
    older = [flipped(newest, range(5)), m, flipped(newest, [0, 1]), flipped(newest, range(60, 68))]
    det = detector()  # unstructured: threshold 0.08
    for mask in older:
        assert det.observe(mask=mask) is None
    assert det.observe(mask=newest) == 0.08  # max(5, 8, 2, 8) / 100
    assert det.found and det.found_at == 4

    # 9 differences with one of them: 0.09 > 0.08, no ticket
    det = detector()
    for mask in older[:3] + [flipped(newest, range(60, 69))]:
        det.observe(mask=mask)
    assert det.observe(mask=newest) == 0.09 and not det.found


def test_three_of_four_close_does_not_fire_then_fires_later():
    m = base_mask()
    far = flipped(m, range(30))  # 30% away from m
    det = detector()
    for mask in [far, m, m, m]:
        det.observe(mask=mask)
    assert det.observe(mask=m) == 0.30  # close to 3 of the 4 older masks only
    assert not det.found
    # the far mask drops out of the window: now all 4 older ones are within 1%
    assert det.observe(mask=flipped(m, [0])) == 0.01
    assert det.found and det.found_at == 5
    # later observations are recorded but never move found_at
    det.observe(mask=far)
    assert det.found_at == 5 and det.last_distance == pytest.approx(0.30, abs=0.011)
    assert len(det.history) == 5


def test_channel_threshold_and_custom_window():
    m = base_mask()
    det = detector(kind="channel")  # threshold 0.1
    assert det.threshold == 0.1 and det.channel_density == pytest.approx(0.5 ** 0.5)
    for mask in [flipped(m, range(10))] + [m] * 3:
        det.observe(mask=mask)
    assert det.observe(mask=m) == 0.1 and det.found

    det = detector(window=3, threshold=0.0)
    det.observe(mask=m)
    det.observe(mask=m)
    assert det.observe(mask=flipped(m, [3])) == 0.01 and not det.found
    det.observe(mask=flipped(m, [3]))
    assert det.observe(mask=flipped(m, [3])) == 0.0 and det.found and det.found_at == 4


def test_mapping_masks_and_size_mismatch():
    det = detector(window=2)
    a = {"x": torch.ones(2, 3, dtype=torch.bool), "y": torch.zeros(4, dtype=torch.bool)}
    b = {"y": torch.tensor([True, False, False, False]), "x": torch.ones(2, 3, dtype=torch.bool)}  # order-free
    det.observe(mask=a)
    assert det.observe(mask=b) == 0.1
    with pytest.raises(ValueError):
        det.observe(mask=torch.ones(11, dtype=torch.bool))
    assert hamming_distance(torch.tensor([True, False]), torch.tensor([False, False])) == 0.5


def test_invalid_arguments():
    for kwargs in [dict(kind="bogus"), dict(window=1), dict(threshold=1.5), dict(channel_density=0.0)]:
        with pytest.raises(ConfigError):
            detector(**kwargs)
    with pytest.raises(ValueError):
        detector().observe()  # no model, no mask


def test_state_dict_round_trip():
    m = base_mask()
    det = detector()
    for k in range(3):
        det.observe(mask=flipped(m, range(k)))
    buffer = io.BytesIO()
    torch.save(det.state_dict(), buffer)
    buffer.seek(0)
    restored = detector()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for k in range(3, 7):  # both continue identically
        assert restored.observe(mask=flipped(m, range(k))) == det.observe(mask=flipped(m, range(k)))
    assert restored.state_dict()["found_at"] == det.found_at
    assert restored.observations == det.observations == 7


# -- real models ---------------------------------------------------------------------------------

def model(name="preact_resnet18", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = kwargs or {"base_width": 8}
    return create_model(name, num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.25] * 3, **kwargs)


def test_unstructured_mask_covers_conv_weights_only():
    net = model()
    det = EarlyBirdDetector(net, density=0.2)
    mask = det.current_mask()
    convs = {n: p for n, p in net.named_parameters() if p.dim() == 4}
    assert set(mask) == set(convs) and "body.linear.weight" not in mask
    total = sum(p.numel() for p in convs.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(0.2 * total)
    det = EarlyBirdDetector(net, density=0.2, exclude=("*conv1*",))
    assert not any("conv1" in n for n in det.current_mask())


def test_channel_mask_over_batchnorms():
    net = model()
    det = EarlyBirdDetector(net, density=0.25, kind="channel")  # channel_density sqrt(0.25) = 0.5
    mask = det.current_mask()
    bns = {n: m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(mask) == set(bns)
    total = sum(m.num_features for m in bns.values())
    kept = sum(int(m.sum()) for m in mask.values())
    assert round(0.5 * total) <= kept <= round(0.5 * total) + len(bns)  # + at most one per BN
    assert all(m.any() for m in mask.values())


def test_search_controller_fires_on_still_weights_and_resumes():
    net = model()
    search = EarlyBirdSearch(net, density=0.2, kind="channel")
    assert search.mask_state() == {} and not search.done
    for epoch in range(4):
        search.end_epoch(epoch, {})
        assert not search.done and search.epoch_log() == {"density": 1.0, "eb_distance": None, "eb_found": False}
    state = search.state_dict()
    search.end_epoch(4, {})  # weights never moved: the 5th identical mask draws the ticket
    assert search.done and search.eb_epoch == 4
    assert search.epoch_log() == {"density": 1.0, "eb_distance": 0.0, "eb_found": True}

    resumed = EarlyBirdSearch(net, density=0.2, kind="channel")
    resumed.load_state_dict(state)
    resumed.end_epoch(4, {})
    assert resumed.done and resumed.eb_epoch == 4


def test_search_controller_waits_while_weights_move():
    net = model(name="small_cnn", base_width=4)
    search = EarlyBirdSearch(net, density=0.3)
    params = [p for p in net.parameters() if p.dim() == 4]
    generator = torch.Generator().manual_seed(0)
    for epoch in range(6):  # fresh random weights every epoch: masks differ by ~40%
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=generator))
        search.end_epoch(epoch, {})
    assert not search.done and search.eb_epoch is None
    assert search.epoch_log()["eb_distance"] > 0.3
    for epoch in range(6, 9):  # weights settle after epoch 5; epoch 4's mask is still in the window
        search.end_epoch(epoch, {})
        assert not search.done
    search.end_epoch(9, {})  # the masks of epochs 5..9 are identical
    assert search.done and search.eb_epoch == 9


# -- the search controller: L1 on BN gammas ---------------------------------------------------------

class BNNet(nn.Module):
    """x (B, 8) -> linear -> BN(16) -> relu -> linear -> (B, 2)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_bn_l1_adds_lambda_sign_gamma_to_the_grad_by_hand():
    net = BNNet()
    search = EarlyBirdSearch(net, density=0.5, kind="channel", bn_l1=0.125)
    with torch.no_grad():
        net.bn.weight.copy_(torch.tensor([0.5, -2.0, 0.0] + [1.0] * 13))
    net.bn.weight.grad = torch.tensor([0.5, 0.25, 1.0] + [0.0] * 13)
    net.fc1.weight.grad = torch.ones_like(net.fc1.weight)
    search.after_backward(0)
    # + 0.125 * sign(gamma): +0.125, -0.125, 0 (sign 0 at gamma 0), then +0.125 for the 13 ones
    assert torch.equal(net.bn.weight.grad, torch.tensor([0.625, 0.125, 1.0] + [0.125] * 13))
    assert torch.equal(net.fc1.weight.grad, torch.ones_like(net.fc1.weight))  # only gammas
    assert net.bn.bias.grad is None


def test_bn_l1_zero_default_for_unstructured_leaves_grads_alone():
    from sparta.method_config import DEFAULT_BN_L1

    assert DEFAULT_BN_L1 == {"unstructured": 0.0, "channel": 1e-4}
    net = model()
    search = EarlyBirdSearch(net, density=0.5)  # unstructured, bn_l1 0
    gammas = [m.weight for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for gamma in gammas:
        gamma.grad = torch.full_like(gamma, 0.5)
    search.after_backward(0)
    assert all(torch.equal(gamma.grad, torch.full_like(gamma, 0.5)) for gamma in gammas) and search.gammas == []
    channel = EarlyBirdSearch(net, density=0.5, kind="channel", bn_l1=1e-4)
    assert len(channel.gammas) == len(gammas) > 0  # every affine BN of the network is penalised
    with pytest.raises(ConfigError):
        EarlyBirdSearch(net, density=0.5, bn_l1=-1e-4)


def sgd_step_gamma(scaler_scale, bn_l1):
    """One SGD step (lr 1, no momentum or decay) of BNNet through ``train_step``; the new gamma."""
    from sparta.objectives import Objective
    from sparta.precision import StepPrecision
    from sparta.train import train_step

    torch.manual_seed(0)
    net = BNNet()
    with torch.no_grad():
        net.bn.weight.copy_(torch.linspace(-1, 1, 16))
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    search = EarlyBirdSearch(net, density=0.5, kind="channel", bn_l1=bn_l1)
    scaler = None if scaler_scale is None else torch.amp.GradScaler("cpu", init_scale=scaler_scale)
    precision = StepPrecision("fp32", "cpu", scaler=scaler)  # a scaler in fp32: scaled, then unscaled grads

    def cross_entropy_and_logits(model, x_adv, x, y):
        out = model(x_adv)
        return nn.functional.cross_entropy(out, y), out

    objective = Objective(attack=lambda model, x, y, step: x, loss=cross_entropy_and_logits)
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 2
    before = net.bn.weight.detach().clone()
    train_step(net, opt, search, objective, x, y, step=0, attack_bn_mode="train", precision=precision)
    return before, net.bn.weight.detach().clone()


def test_bn_l1_is_applied_to_true_gradients_under_a_grad_scaler():
    """The loop unscales before after_backward: the penalty moves gamma by lr * lambda * sign(gamma),
    not lambda / scale, whatever the scale (powers of two scale and unscale exactly)."""
    before, plain = sgd_step_gamma(None, 0.0)
    for scale in (None, 1024.0, 2.0 ** 16):
        _, penalised = sgd_step_gamma(scale, 0.01)
        assert torch.allclose(penalised, plain - 0.01 * torch.sign(before), rtol=0, atol=1e-7), scale


def test_bn_l1_drives_unneeded_gammas_to_zero():
    """Only 2 of the 16 hidden units matter (labels from 2 input features): with the penalty most
    gammas end within 1e-2 of zero, without it none does."""
    def train(bn_l1):
        torch.manual_seed(0)
        net = BNNet()
        search = EarlyBirdSearch(net, density=0.25, kind="channel", bn_l1=bn_l1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        for step in range(600):
            x = torch.randn(64, 8, generator=g)
            y = ((x[:, 0] + x[:, 1]) > 0).long()
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            search.after_backward(step)
            opt.step()
            search.after_step(step)
        return net.bn.weight.detach().abs()

    plain, slim = train(0.0), train(0.02)
    assert (plain < 1e-2).sum() == 0
    assert (slim < 1e-2).sum() >= 8
    assert slim.sum() < 0.5 * plain.sum()


# -- the search controller: masks every N steps, minimum search length ------------------------------

def run_search(search, epochs, steps_per_epoch, start=(0, 0)):
    """Drive the hooks as the loop does from (epoch, step) = ``start``; stop as the stage does."""
    epoch, step = start
    while epoch < epochs and not search.done:
        for _ in range(steps_per_epoch - step % steps_per_epoch):
            search.after_backward(step)
            search.after_step(step)
            step += 1
        epoch += 1
        search.end_epoch(epoch, {})
    return epoch, step


def test_every_steps_observes_on_the_step_count_and_stops_at_the_epoch_end():
    net = model()  # weights never move: every mask is the same
    search = EarlyBirdSearch(net, density=0.2, kind="channel", every_steps=3)
    for step in range(14):  # observations after 3, 6, 9, 12 steps: window 5 not full
        search.after_step(step)
    assert search.detector.observations == 4 and not search.detector.found
    search.after_step(14)  # the 15th step: 5th identical mask
    assert search.detector.found and search.eb_step == 15
    assert not search.done and search.eb_epoch is None  # found mid-epoch: the stage goes on to its end
    search.end_epoch(4, {})
    assert search.done and search.eb_epoch == 4 and search.eb_step == 15

    # 4 steps an epoch, from scratch through the loop's hooks: found at step 15, in epoch 4
    search = EarlyBirdSearch(net, density=0.2, kind="channel", every_steps=3)
    assert run_search(search, 50, 4) == (4, 16)
    assert (search.eb_epoch, search.eb_step) == (4, 15)
    # an epoch-end observation is not made in step mode
    assert search.detector.observations == 5


@pytest.mark.parametrize("every_steps,min_epochs,expected", [
    (None, 0, (5, 20)),  # 5th epoch-end mask
    (None, 7, (7, 28)),  # window full at epoch 5, but no ticket before epoch 7
    (3, 6, (6, 21)),  # observations at 3, 6, ...: the first one in epoch 6 (steps 21..24) is step 21
    (8, 0, (10, 40)),  # every 2 epochs: 5th observation at step 40
])
def test_min_epochs_and_every_steps_by_hand(every_steps, min_epochs, expected):
    search = EarlyBirdSearch(model(), density=0.2, kind="channel", every_steps=every_steps, min_epochs=min_epochs)
    run_search(search, 50, 4)
    assert (search.eb_epoch, search.eb_step) == expected


def test_search_state_resumes_mid_epoch_identically():
    net = model()
    a = EarlyBirdSearch(net, density=0.2, kind="channel", every_steps=3, min_epochs=5, bn_l1=1e-4)
    b = EarlyBirdSearch(net, density=0.2, kind="channel", every_steps=3, min_epochs=5, bn_l1=1e-4)
    epoch, step = run_search(a, 2, 4)  # 2 epochs, then 2 steps into the 3rd
    for s in (step, step + 1):
        a.after_step(s)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert (b.steps, b.epochs_done) == (10, 2)
    assert run_search(a, 50, 4, start=(2, 10)) == run_search(b, 50, 4, start=(2, 10)) == (5, 20)
    assert (a.eb_epoch, a.eb_step) == (b.eb_epoch, b.eb_step) == (5, 18)
    assert a.state_dict()["detector"]["observations"] == b.state_dict()["detector"]["observations"] == 6


def test_search_state_saved_before_step_counting_still_loads():
    net = model()
    old = EarlyBirdSearch(net, density=0.2, kind="channel")
    for epoch in range(1, 4):
        old.end_epoch(epoch, {})
    state = {"detector": old.detector.state_dict(), "eb_epoch": None}  # what older versions saved
    new = EarlyBirdSearch(net, density=0.2, kind="channel", bn_l1=1e-4)
    with pytest.warns(UserWarning, match="continues without it"):
        new.load_state_dict(state)
    assert (new.steps, new.epochs_done, new.eb_step, new.gammas) == (0, 3, None, [])  # as it started: no penalty
    new.end_epoch(4, {})
    new.end_epoch(5, {})
    assert new.done and new.eb_epoch == 5


def test_search_controller_rejects_bad_settings():
    for kwargs in [dict(every_steps=0), dict(every_steps=2.5), dict(min_epochs=-1), dict(bn_l1="x")]:
        with pytest.raises(ConfigError):
            EarlyBirdSearch(model(), density=0.2, **kwargs)
