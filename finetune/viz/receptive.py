"""Receptive fields: which input pixels can influence one unit of a layer's output.

Two ways that must agree:
- :func:`conv_arithmetic` walks a chain of convolutions/poolings with the textbook recurrences
  (size r, jump j, center c): r += (k - 1)·d·j; c += ((k - 1)/2·d - p)·j; j *= s.
- :func:`measure` asks autograd: the input pixels with a non-zero gradient for one output unit
  are exactly its receptive field. This works for any network (residual branches, odd paddings),
  so it is what the patch pictures use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ReceptiveField:
    size: int      # side of the (square) field, in input pixels
    stride: int    # input pixels between neighbouring output units ("jump")
    offset: float  # input coordinate of output unit 0's field center
    clipped: bool = False  # the field was measured larger than the image: `size` is a lower bound

    def box(self, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of unit (row, col)'s field, clipped to the image."""
        half = self.size / 2
        cy, cx = self.offset + row * self.stride, self.offset + col * self.stride
        top, left = max(0, round(cy - half + 0.5)), max(0, round(cx - half + 0.5))
        bottom, right = min(height, round(cy + half + 0.5)), min(width, round(cx + half + 0.5))
        return top, left, bottom, right


def conv_arithmetic(layers: Sequence[nn.Module]) -> ReceptiveField:
    """The receptive field after a sequential chain of Conv2d / MaxPool2d / AvgPool2d layers
    (other layers, e.g. activations and norms, do not change it)."""
    size, jump, center = 1.0, 1.0, 0.0
    for layer in layers:
        if not isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            continue
        k, s, p, d = (_pair(getattr(layer, a, 1))[0] for a in ("kernel_size", "stride", "padding", "dilation"))
        size += (k - 1) * d * jump
        center += ((k - 1) / 2 * d - p) * jump
        jump *= s
    return ReceptiveField(int(size), int(jump), center)


def output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """floor((in + 2·pad − dil·(k − 1) − 1) / stride + 1): a convolution's output side."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _capture(store: dict, key: str):
    def hook(module, inputs, output):  # returns None: the output passes through unchanged
        store[key] = output
    return hook


@torch.no_grad()
def _output_shape(model: nn.Module, layer: nn.Module, size: int) -> tuple[int, ...]:
    captured = {}
    handle = layer.register_forward_hook(_capture(captured, "out"))
    try:
        model(torch.zeros(1, 3, size, size))
    finally:
        handle.remove()
    return tuple(captured["out"].shape)


def measure(model: nn.Module, layer: nn.Module, input_size: int, probes: int = 3, max_size: int | None = None) -> ReceptiveField:
    """Receptive field of `layer`'s output units in `model`, from input gradients.

    The gradient of one unit near the middle of the output map (summed over channels) w.r.t.
    `probes` random inputs marks its field (a ReLU that happens to be off for one input cannot
    hide a pixel from all of them); the shift between the fields of two neighbouring units is
    the stride. When a field reaches the image border the input is doubled, up to `max_size`
    (default: no growth; the field is then marked ``clipped``: it covers the whole image).
    """
    max_size = max_size or input_size
    size = input_size
    while True:
        shape = _output_shape(model, layer, size)
        if len(shape) != 4:
            raise ValueError(f"{type(layer).__name__} outputs shape {shape}, not a spatial map (N, C, H, W).")
        unit = shape[2] // 2
        first, last = _touched_rows(model, layer, size, unit, probes)
        interior = first > 0 and last < size - 1
        if interior or size * 2 > max_size:
            break
        size *= 2
    next_first, _ = _touched_rows(model, layer, size, unit + 1, probes) if unit + 1 < shape[2] else (first, last)
    stride = max(1, next_first - first) if next_first > first else max(1, round(size / shape[2]))
    return ReceptiveField(last - first + 1, stride, (first + last) / 2 - unit * stride, clipped=not interior)


def _touched_rows(model: nn.Module, layer: nn.Module, size: int, unit: int, probes: int) -> tuple[int, int]:
    """First and last input row with a non-zero gradient for output unit (unit, unit)."""
    captured = {}
    handle = layer.register_forward_hook(_capture(captured, "out"))
    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(probes, 3, size, size, generator=generator, requires_grad=True)
        model(x)
        captured["out"][:, :, unit, unit].sum().backward()
    finally:
        handle.remove()
        model.train(was_training)
    rows = torch.nonzero((x.grad.abs().sum(dim=(0, 1)) > 0).any(dim=1)).flatten()
    return int(rows.min()), int(rows.max())


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
