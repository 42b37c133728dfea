"""TensorFlow-style "same" padding made static for a fixed input size, before a graph is exported.

timm's ``tf_`` backbones (``tf_efficientnet_lite0``, the default) pad each strided convolution by an
amount computed from the input's height and width at run time (``Conv2dSame``, ``MaxPool2dSame``,
``AvgPool2dSame``). Traced to ONNX, that is a chain of Shape, Gather, Ceil, ... nodes feeding a ``Pad``
whose amounts are not constants, so ONNX Runtime can neither fold the padding into the convolution nor
keep its blocked (NCHWc) layout across it. The export graph's input size is fixed, so the amounts are
known: computing them once here gives constant pads, numerically the same (a zero or -inf border).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import get_same_padding
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from torch import nn

#: dynamic "same" module -> (its plain torch base class, the padding value its dynamic version uses)
_DYNAMIC: dict[type[nn.Module], tuple[type[nn.Module], float]] = {
    Conv2dSame: (nn.Conv2d, 0.0),
    AvgPool2dSame: (nn.AvgPool2d, 0.0),
    MaxPool2dSame: (nn.MaxPool2d, -float("inf")),
}


class StaticSamePad(nn.Module):
    """A dynamic "same" module with its padding fixed: constant pad, then the plain op (its own padding
    is 0, its parameters are the dynamic module's)."""

    def __init__(self, op: nn.Module, pads: tuple[int, int, int, int], value: float):
        super().__init__()
        self.op, self.pads, self.value = op, pads, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads, value=self.value)
        return self.op(x)

    def extra_repr(self) -> str:
        return f"pads={self.pads}"


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _same_pads(module: nn.Module, height: int, width: int) -> tuple[int, int, int, int]:
    """timm's pad_same amounts for an input of ``height`` x ``width`` (left, right, top, bottom)."""
    kh, kw = _pair(module.kernel_size)
    sh, sw = _pair(module.stride)
    dh, dw = _pair(getattr(module, "dilation", 1))
    pad_h = get_same_padding(height, kh, sh, dh)
    pad_w = get_same_padding(width, kw, sw, dw)
    return (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)


def count_dynamic_padding(module: nn.Module) -> int:
    """How many modules of ``module`` pad by an amount computed at run time."""
    return sum(type(m) in _DYNAMIC for m in module.modules())


def with_static_padding(module: nn.Module, image_size: int) -> nn.Module:
    """A copy of ``module`` whose dynamic "same" padding is fixed for ``(B, 3, image_size, image_size)``
    inputs (``module`` itself is left untouched; one without dynamic padding is returned as is)."""
    if not count_dynamic_padding(module):
        return module
    module = copy.deepcopy(module)
    shapes: dict[str, tuple[int, int]] = {}
    hooks = [
        child.register_forward_pre_hook(
            lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[-2:]))
        )
        for name, child in module.named_modules()
        if type(child) in _DYNAMIC
    ]
    try:
        with torch.inference_mode():
            module(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    for name, (height, width) in shapes.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        child = getattr(parent, attribute)
        base, value = _DYNAMIC[type(child)]
        pads = _same_pads(child, height, width)
        child.__class__ = base  # the same parameters and settings (padding 0), without the dynamic pad
        setattr(parent, attribute, StaticSamePad(child, pads, value))
    return module
