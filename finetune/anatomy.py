"""A network's anatomy per layer group: output shape, stride, receptive field, parameters, multiply-adds.

One forward pass of a zero image at the configured input size, watched two ways:

- a torch-function mode carries each tensor's receptive field (the input rows/columns that unit
  (0, 0) can see, and the jump between neighbouring units) from op to op: convolutions and
  poolings apply the textbook arithmetic, ops that keep the spatial size (activations, norms,
  residual additions, concatenations) take the union of their inputs' fields (the widest branch
  wins), and anything that mixes all positions (flatten, global pooling, attention, a squeeze-
  excitation gate) makes the field ``global``. At every convolution and pooling the output size
  predicted by out = floor((in + 2·pad − dil·(k − 1) − 1) / stride + 1) (ceil with ceil_mode) is
  checked against the real output: a disagreement raises :class:`AnatomyError`;
- :class:`torch.utils.flop_counter.FlopCounterMode` counts multiply-adds (its FLOPs / 2: it counts
  a multiply-add as 2 FLOPs; convolutions, matrix products and attention, not pooling or
  elementwise ops), read at each group's output.

A group's output is that of its last-finishing module among those wholly inside the group (the
``layer1`` Sequential of a ResNet; the last convolution of a VGG block).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from finetune.groups import LayerGroup, group_modules
from finetune.summary import format_table
from finetune.viz.receptive import output_size

_ATTR = "_finetune_field"


class AnatomyError(RuntimeError):
    """The convolution arithmetic disagrees with the forward pass (a bug, or an op it misreads)."""


@dataclass(frozen=True)
class Axis:
    """Along one spatial axis: unit 0 sees input pixels lo..hi; neighbouring units are `jump` apart."""

    lo: int
    hi: int
    jump: int

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1


GLOBAL = "global"  # every unit sees the whole input
Field = tuple[Axis, Axis] | str  # (rows, columns) or GLOBAL


@dataclass(frozen=True)
class GroupAnatomy:
    name: str
    module: str                  # the module whose output is the group's output
    shape: tuple[int, ...]       # output shape without the batch dimension
    field: Field | None          # None: the output does not depend on the input image
    params: int
    macs: int                    # multiply-adds of this group (since the previous group's output)

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

    tracer = _traced_forward(model, input_size, [m for ms in outputs.values() for m in ms], record, counter)
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
        tensor = _first_tensor(output)
        rows.append(GroupAnatomy(group.name, last, tuple(tensor.shape[1:]) if tensor is not None else (),
                                 getattr(tensor, _ATTR, None), params, round((flops - previous) / 2)))
        previous = max(previous, flops)
    total_params = sum(p.numel() for p in model.parameters())
    return Anatomy(input_size, rows, total_params, round(counter.get_total_flops() / 2), tracer.checked)


def anatomy_table(result: Anatomy) -> str:
    """Group, output shape, stride, receptive field, parameters, multiply-adds."""
    rows = [[g.name, "x".join(map(str, g.shape)) or "-", g.stride, g.receptive_field, f"{g.params:,}", format_count(g.macs)]
            for g in result.groups]
    c, h, w = result.input_size
    table = format_table(["group", "output", "stride", "receptive field", "params", "mult-adds"], rows, "lrrrrr")
    return (f"{table}\ntotal {result.params:,} parameters, {format_count(result.macs)} multiply-adds per {c}x{h}x{w} image\n"
            f"(receptive fields and strides in input pixels, by convolution arithmetic, a field larger than the "
            f"image reaching into the padding;\n output sizes checked against the forward pass at "
            f"{result.checked_ops} convolutions/poolings)")


def trace_fields(model: nn.Module, modules: Sequence[str], input_size: Sequence[int]) -> dict[str, Field | None]:
    """The receptive field of each named module's output (for tests and for single layers)."""
    captured: dict[str, Field | None] = {}

    def record(name, output):
        captured[name] = getattr(_first_tensor(output), _ATTR, None)

    _traced_forward(model, tuple(input_size), modules, record)
    return captured


def _traced_forward(model: nn.Module, input_size: tuple[int, ...], watch: Sequence[str], record,
                    *contexts) -> FieldTracer:
    """One forward pass of a zero image under a :class:`FieldTracer` (and `contexts`), in eval
    mode without gradients; ``record(name, output)`` runs as each module named in `watch` finishes."""
    lookup = dict(model.named_modules())
    handles = [lookup[name].register_forward_hook(lambda module, inputs, output, name=name: record(name, output))
               for name in dict.fromkeys(watch)]
    tracer = FieldTracer()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            stack.enter_context(tracer)
            x = torch.zeros(1, *input_size)
            setattr(x, _ATTR, (Axis(0, 0, 1), Axis(0, 0, 1)))
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return tracer


class FieldTracer(TorchFunctionMode):
    """Propagates receptive fields (attribute ``_finetune_field`` of tensors) through every op."""

    def __init__(self):
        super().__init__()
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _WINDOWED:
            source = args[0] if args else kwargs.get("input")
            field = getattr(source, _ATTR, None)
            if field is not None:
                self._windowed(name, source, _first_tensor(out), field, args, kwargs)
            return out
        fields = [(t, getattr(t, _ATTR)) for t in _tensors(args, kwargs) if hasattr(t, _ATTR)]
        if fields:
            for tensor in _tensors((out,), {}):
                _set(tensor, _merge(fields, tensor))
        return out

    def _windowed(self, name, source, out, field, args, kwargs) -> None:
        if field == GLOBAL:
            _set(out, GLOBAL)
            return
        geometry = _WINDOWED[name](source, args, kwargs)
        if geometry is None:  # adaptive pooling to another size: every unit mixes a whole region
            _set(out, field if tuple(out.shape[-2:]) == tuple(source.shape[-2:]) else GLOBAL)
            return
        axes = []
        for axis, (k, s, p_lo, p_hi, d, ceil) in enumerate(geometry):
            size_in = source.shape[-2 + axis]
            expected = _window_output(size_in, k, s, p_lo, p_hi, d, ceil)
            if expected != out.shape[-2 + axis]:
                raise AnatomyError(f"{name}: arithmetic gives {expected} for input {size_in} (kernel {k}, stride {s}, "
                                   f"padding {p_lo}/{p_hi}, dilation {d}), the forward pass {out.shape[-2 + axis]}.")
            a = field[axis]
            axes.append(Axis(a.lo - p_lo * a.jump, a.hi + (d * (k - 1) - p_lo) * a.jump, a.jump * s))
        self.checked += 1
        _set(out, tuple(axes))


def _window_output(size: int, k: int, s: int, p_lo: int, p_hi: int, d: int, ceil: bool) -> int:
    """Output side of a window op; padding folded into the input size (it may be asymmetric)."""
    if not ceil:
        return output_size(size + p_lo + p_hi, k, s, 0, d)
    out = math.ceil((size + p_lo + p_hi - d * (k - 1) - 1) / s) + 1
    if (out - 1) * s >= size + p_lo:  # torch: the last window must start inside the input or left padding
        out -= 1
    return out


def _arg(args, kwargs, index: int, name: str, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _pairs(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1])) if len(value) else (None, None)
    return (int(value), int(value)) if value is not None else (None, None)


def _conv(source, args, kwargs):
    weight = _arg(args, kwargs, 1, "weight")
    k = tuple(weight.shape[-2:])
    s = _pairs(_arg(args, kwargs, 3, "stride", 1))
    d = _pairs(_arg(args, kwargs, 5, "dilation", 1))
    padding = _arg(args, kwargs, 4, "padding", 0)
    result = []
    for axis in range(2):
        if padding == "valid":
            lo = hi = 0
        elif padding == "same":  # torch puts the odd pixel on the high side
            total = d[axis] * (k[axis] - 1)
            lo, hi = total // 2, total - total // 2
        else:
            lo = hi = _pairs(padding)[axis]
        result.append((k[axis], s[axis], lo, hi, d[axis], False))
    return result


def _max_pool(source, args, kwargs):
    k = _pairs(_arg(args, kwargs, 1, "kernel_size"))
    s = _pairs(_arg(args, kwargs, 2, "stride", None))
    p = _pairs(_arg(args, kwargs, 3, "padding", 0))
    d = _pairs(_arg(args, kwargs, 4, "dilation", 1))
    ceil = bool(_arg(args, kwargs, 5, "ceil_mode", False))
    return [(k[a], s[a] if s[a] is not None else k[a], p[a], p[a], d[a], ceil) for a in range(2)]


def _avg_pool(source, args, kwargs):
    k = _pairs(_arg(args, kwargs, 1, "kernel_size"))
    s = _pairs(_arg(args, kwargs, 2, "stride", None))
    p = _pairs(_arg(args, kwargs, 3, "padding", 0))
    ceil = bool(_arg(args, kwargs, 4, "ceil_mode", False))
    return [(k[a], s[a] if s[a] is not None else k[a], p[a], p[a], 1, ceil) for a in range(2)]


def _pad(source, args, kwargs):
    pad = list(_arg(args, kwargs, 1, "pad"))
    if len(pad) < 4:  # pads the width only
        pad += [0, 0]
    width, height = (pad[0], pad[1]), (pad[2], pad[3])
    # A pad is a 1×1 "window" with stride 1 and asymmetric padding: sizes grow, fields shift.
    return [(1, 1, height[0], height[1], 1, False), (1, 1, width[0], width[1], 1, False)]


def _adaptive(source, args, kwargs):
    return None


_WINDOWED = {
    "conv2d": _conv,
    "max_pool2d": _max_pool,
    "max_pool2d_with_indices": _max_pool,
    "avg_pool2d": _avg_pool,
    "pad": _pad,
    "adaptive_avg_pool2d": _adaptive,
    "adaptive_max_pool2d": _adaptive,
}


def _merge(fields: list[tuple[torch.Tensor, Field]], out: torch.Tensor) -> Field:
    """Union of the inputs' fields when `out` keeps their spatial size, else GLOBAL."""
    if out.ndim < 2 or any(f == GLOBAL or tuple(t.shape[-2:]) != tuple(out.shape[-2:]) for t, f in fields):
        return GLOBAL
    axes = []
    for axis in range(2):
        column = [f[axis] for _, f in fields]
        axes.append(Axis(min(a.lo for a in column), max(a.hi for a in column), max(a.jump for a in column)))
    return tuple(axes)


def _tensors(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value, {})


def _set(tensor, field) -> None:
    if isinstance(tensor, torch.Tensor):
        try:
            setattr(tensor, _ATTR, field)
        except (AttributeError, RuntimeError):  # some tensor subclasses refuse attributes
            pass


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((t for t in map(_first_tensor, output) if t is not None), None)
    return None


def _per_axis(field: Field | None, value) -> str:
    if field is None:
        return "-"
    if field == GLOBAL:
        return "global"
    rows, cols = value(field[0]), value(field[1])
    return str(rows) if rows == cols else f"{rows}x{cols}"


def format_count(macs: int) -> str:
    """1.81G, 118K, 12: three significant digits with a unit."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.3g}{unit}"
    return str(macs)
