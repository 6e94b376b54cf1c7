"""A network's anatomy per layer group: output shape, stride, receptive field, parameters, multiply-adds.

One forward pass of a zero image at the configured input size, watched two ways:

- :mod:`finetune.viz.receptive`'s tracer carries each tensor's receptive field from op to op and
  checks every convolution's and pooling's output size against the arithmetic (a disagreement
  raises :class:`~finetune.viz.receptive.FieldTraceError`);
- :class:`torch.utils.flop_counter.FlopCounterMode` counts multiply-adds (its FLOPs / 2: it counts
  a multiply-add as 2 FLOPs; convolutions, matrix products and attention, not pooling or
  elementwise ops), read at each group's output.

A group's output is that of its last-finishing module among those wholly inside the group (the
``layer1`` Sequential of a ResNet; the last convolution of a VGG block).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from finetune.model.groups import LayerGroup, group_modules
from finetune.tables import format_table
from finetune.viz.receptive import GLOBAL, Field, first_tensor, output_field, traced_forward


@dataclass(frozen=True)
class GroupAnatomy:
    name: str
    module: str  # the module whose output is the group's output
    shape: tuple[int, ...]  # output shape without the batch dimension
    field: Field | None  # None: the output does not depend on the input image
    params: int
    macs: int  # multiply-adds of this group (since the previous group's output)

    @property
    def stride(self) -> str:
        return _per_axis(self.field, lambda a: a.jump)

    @property
    def receptive_field(self) -> str:
        return _per_axis(self.field, lambda a: a.size)


@dataclass(frozen=True)
class Anatomy:
    input_size: tuple[int, int, int]
    groups: list[GroupAnatomy]
    params: int
    macs: int
    checked_ops: int  # convolutions and poolings whose output size the arithmetic predicted


def anatomy(model: nn.Module, groups: Sequence[LayerGroup], input_size: Sequence[int]) -> Anatomy:
    """Trace `model` (eval mode, no gradients) on a zero image of `input_size` (C, H, W).

    `groups` hold parameter names of `model` (a Backbone's, or a Classifier's with its head).
    """
    input_size = tuple(int(s) for s in input_size)
    outputs = {g.name: group_modules(model, g) for g in groups}
    finished: dict[str, tuple[int, object, float]] = {}  # module -> (finish order, output, flops so far)
    calls = itertools.count()
    counter = FlopCounterMode(display=False)

    def record(name, output):
        finished[name] = (next(calls), output, counter.get_total_flops())

    tracer = traced_forward(model, input_size, [m for ms in outputs.values() for m in ms], record, counter)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    rows, previous = [], 0.0
    for group in groups:
        ran = [m for m in outputs[group.name] if m in finished]
        params = sum(tensors[n].numel() for n in group.param_names if n in tensors)
        if not ran:  # a group whose modules did not run (cannot happen for a plain forward)
            rows.append(GroupAnatomy(group.name, "-", (), None, params, 0))
            continue
        last = max(ran, key=lambda m: finished[m][0])
        _, output, flops = finished[last]
        tensor = first_tensor(output)
        rows.append(
            GroupAnatomy(
                group.name,
                last,
                tuple(tensor.shape[1:]) if tensor is not None else (),
                output_field(output),
                params,
                round((flops - previous) / 2),
            )
        )
        previous = max(previous, flops)
    total_params = sum(p.numel() for p in model.parameters())
    return Anatomy(input_size, rows, total_params, round(counter.get_total_flops() / 2), tracer.checked)


def anatomy_table(result: Anatomy) -> str:
    """Group, output shape, stride, receptive field, parameters, multiply-adds."""
    rows = [
        [g.name, "x".join(map(str, g.shape)) or "-", g.stride, g.receptive_field, f"{g.params:,}", format_count(g.macs)]
        for g in result.groups
    ]
    c, h, w = result.input_size
    table = format_table(["group", "output", "stride", "receptive field", "params", "mult-adds"], rows, "lrrrrr")
    return (
        f"{table}\ntotal {result.params:,} parameters, {format_count(result.macs)} multiply-adds per "
        f"{c}x{h}x{w} image\n"
        f"(receptive fields and strides in input pixels, by convolution arithmetic, a field larger than the "
        f"image reaching into the padding;\n output sizes checked against the forward pass at "
        f"{result.checked_ops} convolutions/poolings)"
    )


def _per_axis(field: Field | None, value) -> str:
    if field is None:
        return "-"
    if field == GLOBAL:
        return GLOBAL
    rows, cols = value(field[0]), value(field[1])
    return str(rows) if rows == cols else f"{rows}x{cols}"


def format_count(macs: int) -> str:
    """1.81G, 118K, 12: three significant digits with a unit."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.3g}{unit}"
    return str(macs)
