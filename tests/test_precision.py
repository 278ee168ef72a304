"""Mixed precision of the training step and of evaluation (sparta.precision), on CPU.

bf16 autocast runs on every CPU (fast only with bf16 units); the fp16 gradient-scaler logic is
device-independent, so it is driven here with a CPU GradScaler although runs refuse fp16 on CPU.
"""
import platform

import pytest
import torch
from torch import nn

from sparta.config import from_dict
from sparta.data.base import ImageSet
from sparta.errors import ConfigError
from sparta.evaluate import evaluate
from sparta.objectives import build_objective
from sparta.precision import StepPrecision, cpu_flags, cpu_name, fast_bf16, resolve_precision
from sparta.sparse.controllers import DynamicSparse
from sparta.sparse.masks import MaskSet
from sparta.train import train_step

CPU = torch.device("cpu")


class AutocastProbe(nn.Module):
    """A tiny conv net that records, per forward, whether CPU autocast was on and at which dtype."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        self.seen: list[torch.dtype | None] = []

    def forward(self, x):
        self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return self.net(x)


def objective(steps=3):
    cfg = from_dict({"attack": {"name": "pgd", "eps": 0.1, "alpha": 0.03, "steps": steps}})
    return build_objective(cfg, steps_per_epoch=10)


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.rand(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def sparse_setup(update_every=2):
    model = AutocastProbe()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    controller = DynamicSparse(model, opt, MaskSet.random(model, 0.3, "uniform", seed=0), total_steps=100,
                               update_every=update_every, growth="gradient")
    return model, opt, controller


def test_cpu_name_reads_the_model_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu\n")
    assert cpu_name(info) == "AMD EPYC 9R14 96-Core Processor"
    assert cpu_name(tmp_path / "missing") == (platform.processor() or platform.machine())


def test_auto_rule_reads_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()
    fast, why = fast_bf16(CPU, {"avx512f", "amx_bf16"})
    assert fast == torch.backends.mkldnn.is_available() and "amx_bf16" in why
    assert fast_bf16(CPU, {"avx512f", "avx2"})[0] is False


def test_resolution_and_fp16_needs_cuda(monkeypatch):
    monkeypatch.setattr("sparta.precision.cpu_flags", lambda: {"avx512_bf16"})
    assert resolve_precision("auto", CPU)[0] == ("bf16" if torch.backends.mkldnn.is_available() else "fp32")
    monkeypatch.setattr("sparta.precision.cpu_flags", lambda: {"avx2"})
    assert resolve_precision("auto", CPU) == ("fp32", "auto: cpu without amx_bf16/avx512_bf16")
    assert resolve_precision("bf16", CPU) == ("bf16", "set")
    with pytest.raises(ConfigError, match="train.precision=fp16 needs CUDA.*bf16") as e:
        resolve_precision("fp16", CPU)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="train.precision must be one of"):
        from_dict({"train": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match="eval.precision must be one of fp32, bf16"):
        from_dict({"eval": {"precision": "fp16"}})


def test_bf16_step_autocasts_attack_and_loss_and_keeps_fp32_state_and_exact_zeros():
    model, opt, controller = sparse_setup()
    bf16 = StepPrecision("bf16", CPU)
    obj = objective(steps=3)
    for step in range(1, 7):  # topology updates at steps 2, 4, 6
        model.seen.clear()
        x, y = batch(step)
        loss, logits = train_step(model, opt, controller, obj, x, y, step=step, attack_bn_mode="train", precision=bf16)
        assert model.seen == [torch.bfloat16] * 4  # 3 attack steps + the training forward
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        for name, mask in controller.masks.items():
            p = controller.masks.params[name]
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
            assert torch.all(p[~mask] == 0)  # exactly zero, not merely small
            assert torch.all(opt.state[p]["momentum_buffer"][~mask] == 0)
    assert controller.topology_updates == 3
    assert abs(controller.masks.density() - 0.3) < 0.01


def test_fp32_step_runs_without_autocast():
    model, opt, controller = sparse_setup()
    x, y = batch(0)
    train_step(model, opt, controller, objective(), x, y, step=1, attack_bn_mode="train")
    assert model.seen == [None] * 4


def test_fp16_overflow_skips_the_whole_step_and_keeps_masks():
    model, opt, controller = sparse_setup(update_every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # gradients overflow float32
    fp16 = StepPrecision("fp16", CPU, scaler=scaler)
    obj = objective(steps=1)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = controller.masks.state_dict()
    x, y = batch(0)
    train_step(model, opt, controller, obj, x, y, step=1, attack_bn_mode="train", precision=fp16)
    assert fp16.skipped_steps == 1 and scaler.get_scale() == 2.0 ** 126
    assert controller.topology_updates == 0  # no drop/grow from non-finite gradients
    assert all(torch.equal(masks[n], m) for n, m in controller.masks.items())
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())
    assert not opt.state  # the optimizer never stepped
    # with a sane scale the next step runs, the controller sees unscaled (true) gradients
    scaler.update(new_scale=1024.0)
    seen = {}
    original = controller.after_backward
    controller.after_backward = lambda step: (
        seen.update({n: p.grad.clone() for n, p in controller.masks.params.items()}), original(step))
    train_step(model, opt, controller, obj, x, y, step=2, attack_bn_mode="train", precision=fp16)
    assert fp16.skipped_steps == 1 and controller.topology_updates == 1
    grad_scale = max(g.abs().max().item() for g in seen.values())
    assert 0 < grad_scale < 100  # true gradients, not multiplied by 1024
    for name, mask in controller.masks.items():
        assert torch.all(controller.masks.params[name][~mask] == 0)
    restored = StepPrecision("fp16", CPU, scaler=torch.amp.GradScaler("cpu"))
    restored.load_state_dict(fp16.state_dict())
    assert restored.scaler.get_scale() == scaler.get_scale() and restored.skipped_steps == 1


def test_evaluation_precision():
    model = AutocastProbe().eval()
    data = ImageSet(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (16,)))

    def attack(m, x, y):
        return (x + 0.01).clamp(0, 1)

    fp32 = evaluate(model, data, attack, batch_size=16, device=CPU)
    assert model.seen == [None, None]
    model.seen.clear()
    bf16 = evaluate(model, data, attack, batch_size=16, device=CPU, precision="bf16")
    assert model.seen == [torch.bfloat16] * 2
    assert bf16["n"] == fp32["n"] == 16 and abs(bf16["clean_loss"] - fp32["clean_loss"]) < 0.05
