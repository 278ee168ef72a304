"""Where ``train.channels_last`` (NHWC convolutions) is safe to use.

oneDNN 3.12, the version inside torch 2.13's CPU build, corrupts the heap in the weight gradient of
an NHWC convolution whose kernel is 1x1 with a stride above 1 when the layer has fewer input channels
than a vector register holds floats (8 with AVX2, 16 with AVX-512): the ``jit_1x1`` backward-weights
kernel, reached when input and weight are both NHWC, writes past its buffer and the process dies
later in ``backward`` ("corrupted size vs. prev_size", or a segmentation fault). Reproduced with
``ONEDNN_MAX_CPU_ISA=AVX2`` on an Intel Xeon for 1-6 input channels; on an AMD EPYC (AVX-512 BF16)
the same layer (preact_resnet18's first projection shortcut at ``model.base_width=4``) crashed in
every run. Such layers exist only in narrowed test-size networks (at the default widths the
narrowest strided 1x1 convolution has 64 input channels), so those are refused on CPU instead of
being trained in a layout that may crash. See docs/reliability.md for the reproduction.
"""
from __future__ import annotations

import torch
from torch import nn

# the widest oneDNN fp32 vector on x86 (AVX-512: 16 floats); narrower strided 1x1 layers are unsafe in NHWC
MIN_STRIDED_1X1_IN_CHANNELS = 16


def nhwc_unsafe_convs(model: nn.Module) -> dict[str, int]:
    """``{name: input channels per group}`` of the 1x1 convolutions with a stride above 1 and fewer
    than ``MIN_STRIDED_1X1_IN_CHANNELS`` input channels per group."""
    return {name: m.in_channels // m.groups for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
            and m.in_channels // m.groups < MIN_STRIDED_1X1_IN_CHANNELS}


def channels_last_problem(model: nn.Module, device: torch.device) -> str | None:
    """Why ``model`` must not train in NHWC on ``device`` (one line), or None where it may."""
    unsafe = nhwc_unsafe_convs(model) if device.type == "cpu" else {}
    if not unsafe:
        return None
    name, channels = next(iter(unsafe.items()))
    more = f" (and {len(unsafe) - 1} more)" if len(unsafe) > 1 else ""
    return (f"train.channels_last=true: {name}{more} is a strided 1x1 convolution with {channels} input channels, "
            f"and oneDNN's NHWC weight gradient for such a layer corrupts memory on CPU below "
            f"{MIN_STRIDED_1X1_IN_CHANNELS}; widen the model (model.base_width) or set train.channels_last=false")
