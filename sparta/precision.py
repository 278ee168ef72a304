"""Arithmetic precision of the training step (``train.precision``) and of evaluation (``eval.precision``).

- ``fp32``: plain float32, bit-for-bit what sparta did before mixed precision existed.
- ``bf16``: ``torch.autocast(device, dtype=torch.bfloat16)`` around the training attack and the
  training step's forward and loss. Weights, gradients and optimizer state stay float32 (autocast
  casts copies of the weights inside each op), so masks, weight decay and the update itself are
  exactly as in fp32; only the convolutions and matrix products run in bfloat16. bfloat16 has
  float32's exponent range, so no loss scaling is needed.
- ``fp16``: CUDA only; float16 autocast with a ``torch.amp.GradScaler``. The gradients are unscaled
  right after ``backward`` so the sparsity controller's ``after_backward`` (which may grow weights by
  their dense gradient) sees true gradients; a step whose gradients overflowed is skipped whole
  (no controller hook, no optimizer step: masks and weights are untouched) and the scale lowered.
- ``auto``: ``bf16`` where the hardware runs it fast, else ``fp32`` (see :func:`fast_bf16`). It is
  resolved once, when a run starts, and the resolved value is kept on resume.

Attacks compute their losses in float32 from possibly-bfloat16 logits (``attacks.pgd.attack_loss``),
and inputs / adversarial examples stay float32 in every precision.
"""
from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# CPU flags of bfloat16 dot-product units (x86): AVX-512 BF16 (Cooper Lake, Zen 4 and later) or
# AMX tiles (Sapphire Rapids and later); oneDNN uses them for bf16 convolutions and matmuls.
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The ``flags`` of the first CPU in ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The ``model name`` of the first CPU in ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fast_bf16(device: torch.device, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether bfloat16 autocast is fast on ``device``, and why (the rule of ``precision: auto``).

    CUDA: compute capability >= 8.0 (Ampere and later have bfloat16 tensor cores; older GPUs only
    emulate it). CPU: oneDNN is available and the CPU has AMX-BF16 or AVX512-BF16 units (Linux
    ``/proc/cpuinfo`` flags; ``torch.backends.cpu.get_cpu_capability()`` reports only the vector
    width, "AVX512", not the bf16 extension). Anything else: no.
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f"cuda compute capability {major}.{minor} ({'>=' if major >= 8 else '<'} 8.0)"
    if device.type == "cpu":
        found = sorted(set(FAST_BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
        if found and torch.backends.mkldnn.is_available():
            return True, f"cpu flags {', '.join(found)}"
        return False, "cpu without amx_bf16/avx512_bf16" if not found else "cpu without oneDNN (mkldnn)"
    return False, f"no fast-bf16 rule for device type {device.type}"


def resolve_precision(setting: str, device: torch.device, *, key: str = "train.precision") -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why): ``setting`` with ``auto`` decided by :func:`fast_bf16`.

    Raises ConfigError (one line, naming ``key``) for fp16 without CUDA."""
    if setting == "auto":
        fast, why = fast_bf16(device)
        return ("bf16" if fast else "fp32"), f"auto: {why}"
    if setting == "fp16" and device.type != "cuda":
        raise ConfigError(f"{key}=fp16 needs CUDA (float16 with a gradient scaler); on {device.type} use "
                          f"{key}=bf16 (same speed-up where supported, no scaler needed) or fp32")
    return setting, "set"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` at ``precision`` (bf16 or fp16) on ``device``; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


class StepPrecision:
    """How the training step runs at its precision: the autocast region, backward and optimizer step.

    ``train_step`` uses it as::

        with precision.autocast(): x_adv = attack(...); loss = ...
        if precision.backward(loss, optimizer):   # False: fp16 overflow, skip the rest of the step
            controller.after_backward(step); precision.step(optimizer); controller.after_step(step)
    """

    def __init__(self, name: str = "fp32", device: torch.device | str = "cpu", *,
                 scaler: torch.amp.GradScaler | None = None):
        if name not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision {name!r}; valid: fp32, bf16, fp16")
        self.name, self.device = name, torch.device(device)
        # fp16 needs loss scaling; a scaler may be passed in (tests drive one on CPU)
        self.scaler = scaler if scaler is not None or name != "fp16" else torch.amp.GradScaler(self.device.type)
        self.skipped_steps = 0  # fp16 steps skipped because their gradients overflowed

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.name, self.device)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """``loss.backward()``; with a scaler, scaled and then unscaled in place, so ``.grad`` holds the
        true gradients. Returns False when they are not finite: the caller skips the step."""
        if self.scaler is None:
            loss.backward()
            return True
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        # one host sync, the same one GradScaler.step makes to decide whether to step
        overflow = sum(v.item() for v in self.scaler._found_inf_per_device(optimizer).values())
        if overflow:
            self.scaler.update()  # lowers the scale; optimizer.step and the controller hooks are skipped
            self.skipped_steps += 1
            return False
        return True

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # the gradients were unscaled and found finite in backward()
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """Primitive values only (checkpoints load with ``weights_only=True``)."""
        return {"name": self.name, "skipped_steps": self.skipped_steps,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


FP32 = StepPrecision()
