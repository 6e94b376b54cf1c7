"""Receptive fields: which input pixels can influence one unit of a layer's output.

One implementation, by tracing: one forward pass of a zero image under a torch-function mode
(:class:`FieldTracer`) that carries each tensor's receptive field (the input rows/columns that
unit (0, 0) can see, and the jump between neighbouring units) from op to op:

- convolutions and poolings apply the textbook arithmetic (field grows by (k − 1)·d·jump, the
  jump multiplies by the stride, padding shifts the field), and their output size predicted by
  out = floor((in + 2·pad − dil·(k − 1) − 1) / stride + 1) (ceil with ceil_mode) is checked
  against the real output: a disagreement raises :class:`FieldTraceError`;
- ops that keep the spatial size (activations, norms, residual additions, concatenations, a
  Linear over channels-last maps) take the union of their inputs' fields (the widest branch wins);
  permutes and transposes move the spatial axes with the data (ConvNeXt's channels-last blocks);
- anything that mixes all positions (flatten, global pooling, attention, a squeeze-excitation
  gate) makes the field ``global``.

Written by hand: no library computes receptive fields of arbitrary PyTorch graphs. The fields are
the theoretical ones (a field may reach into the padding, beyond the image); tests check them
against the literature and against autograd (the input pixels with a non-zero gradient for one
output unit). :func:`anatomy <finetune.viz.anatomy.anatomy>` reads them per layer group,
:func:`patch_fields` turns them into the image crops the patch pictures show.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from finetune.model.modes import evaluating

_ATTR = "_finetune_field"
_DIMS = "_finetune_dims"  # positions (negative) of the rows and columns axes; (-2, -1) when absent


class FieldTraceError(RuntimeError):
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
class ReceptiveField:
    """A layer's field as the patch pictures crop it, for a square image."""

    size: int  # side of the (square) field, in input pixels
    stride: int  # input pixels between neighbouring output units ("jump")
    offset: float  # input coordinate of output unit 0's field center
    clipped: bool = False  # the middle unit's field reaches the image border: `size` is what lies inside

    def box(self, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of unit (row, col)'s field, clipped to the image."""
        half = self.size / 2
        cy, cx = self.offset + row * self.stride, self.offset + col * self.stride
        top, left = max(0, round(cy - half + 0.5)), max(0, round(cx - half + 0.5))
        bottom, right = min(height, round(cy + half + 0.5)), min(width, round(cx + half + 0.5))
        return top, left, bottom, right


def output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """floor((in + 2·pad − dil·(k − 1) − 1) / stride + 1): a convolution's output side."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def trace_fields(model: nn.Module, modules: Sequence[str], input_size: Sequence[int]) -> dict[str, Field | None]:
    """The receptive field of each named module's output at `input_size` (C, H, W); None for an
    output that does not depend on the image."""
    captured: dict[str, Field | None] = {}

    def record(name, output):
        captured[name] = output_field(output)

    traced_forward(model, tuple(input_size), modules, record)
    return captured


def patch_fields(model: nn.Module, modules: Sequence[str], side: int) -> dict[str, ReceptiveField]:
    """Each named module's field on a `side` x `side` image, from one traced forward pass.

    Read at the unit in the middle of the output map: its field when that lies inside the image
    (not touching the border); else the part inside, marked ``clipped``; a ``global`` field is
    the whole image, with the stride the map's size implies.
    """
    captured: dict[str, tuple[Field | None, int]] = {}

    def record(name, output):
        tensor = first_tensor(output)
        captured[name] = (output_field(output), tensor.shape[getattr(tensor, _DIMS, (-2, -1))[0]])

    traced_forward(model, (3, side, side), modules, record)
    return {name: _on_image(*captured[name], side) for name in modules}


def _on_image(field: Field | None, units: int, side: int) -> ReceptiveField:
    unit = units // 2
    if not isinstance(field, tuple):  # global (or independent of the image): all of it
        stride = max(1, round(side / units))
        return ReceptiveField(side, stride, (side - 1) / 2 - unit * stride, clipped=True)
    rows = field[0]
    lo, hi = rows.lo + unit * rows.jump, rows.hi + unit * rows.jump
    if lo > 0 and hi < side - 1:
        return ReceptiveField(rows.size, rows.jump, (rows.lo + rows.hi) / 2)
    first, last = max(lo, 0), min(hi, side - 1)
    return ReceptiveField(last - first + 1, rows.jump, (first + last) / 2 - unit * rows.jump, clipped=True)


def traced_forward(
    model: nn.Module,
    input_size: tuple[int, ...],
    watch: Sequence[str],
    record: Callable[[str, object], None],
    *contexts,
) -> FieldTracer:
    """One forward pass of a zero image under a :class:`FieldTracer` (and `contexts`), in eval
    mode without gradients; ``record(name, output)`` runs as each module named in `watch` finishes
    (:func:`output_field` reads the output's field)."""
    lookup = dict(model.named_modules())
    handles = [
        lookup[name].register_forward_hook(lambda module, inputs, output, name=name: record(name, output))
        for name in dict.fromkeys(watch)
    ]
    tracer = FieldTracer()
    try:
        with torch.no_grad(), evaluating(model), contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            stack.enter_context(tracer)
            x = torch.zeros(1, *input_size)
            _set(x, (Axis(0, 0, 1), Axis(0, 0, 1)))
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return tracer


def output_field(output) -> Field | None:
    """The field a traced module output (its first tensor) carries; None if it carries none."""
    return getattr(first_tensor(output), _ATTR, None)


def first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((t for t in map(first_tensor, output) if t is not None), None)
    return None


class FieldTracer(TorchFunctionMode):
    """Propagates receptive fields (tensor attributes) through every op; ``checked`` counts the
    convolutions and poolings whose output size the arithmetic predicted."""

    def __init__(self):
        super().__init__()
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        source = args[0] if args else kwargs.get("input")
        field = getattr(source, _ATTR, None)
        if name in _WINDOWED:
            if field is not None:
                self._windowed(name, source, first_tensor(out), field, args, kwargs)
            return out
        if name in _REORDERING and field is not None and isinstance(out, torch.Tensor):
            _set(out, field, _REORDERING[name](source.ndim, _dims(source), args[1:], kwargs))
            return out
        fields = [(t, getattr(t, _ATTR)) for t in _tensors(args, kwargs) if hasattr(t, _ATTR)]
        if fields:
            for tensor in _tensors((out,), {}):
                _set(tensor, *_merge(fields, tensor))
        return out

    def _windowed(self, name, source, out, field, args, kwargs) -> None:
        if field == GLOBAL or _dims(source) != (-2, -1):  # a window over non-spatial axes mixes everything
            _set(out, GLOBAL)
            return
        geometry = _WINDOWED[name](source, args, kwargs) if _WINDOWED[name] else None
        if geometry is None:  # adaptive pooling
            _set(out, field if tuple(out.shape[-2:]) == tuple(source.shape[-2:]) else GLOBAL)
            return
        axes = []
        for axis, (k, s, p_lo, p_hi, d, ceil) in enumerate(geometry):
            size_in = source.shape[-2 + axis]
            expected = _window_output(size_in, k, s, p_lo, p_hi, d, ceil)
            if expected != out.shape[-2 + axis]:
                raise FieldTraceError(
                    f"{name}: arithmetic gives {expected} for input {size_in} (kernel {k}, stride "
                    f"{s}, padding {p_lo}/{p_hi}, dilation {d}), the forward pass "
                    f"{out.shape[-2 + axis]}."
                )
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
    return args[index] if len(args) > index else kwargs.get(name, default)


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


_WINDOWED = {
    "conv2d": _conv,
    "max_pool2d": _max_pool,
    "max_pool2d_with_indices": _max_pool,
    "avg_pool2d": _avg_pool,
    "pad": _pad,
    "adaptive_avg_pool2d": None,  # to another size: every unit mixes a whole region
    "adaptive_max_pool2d": None,
}


def _permuted(ndim: int, dims: tuple[int, int], rest, kwargs) -> tuple[int, int]:
    order = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest or kwargs["dims"]
    order = [int(o) % ndim for o in order]
    return tuple(order.index(d % ndim) - ndim for d in dims)


def _transposed(ndim: int, dims: tuple[int, int], rest, kwargs) -> tuple[int, int]:
    pair = list(rest) + [kwargs[k] for k in ("dim0", "axis0", "dim1", "axis1") if k in kwargs]
    a, b = (int(v) % ndim for v in pair[:2])
    swap = {a: b, b: a}
    return tuple(swap.get(d % ndim, d % ndim) - ndim for d in dims)


_REORDERING = {"permute": _permuted, "transpose": _transposed, "swapaxes": _transposed, "swapdims": _transposed}


def _dims(tensor) -> tuple[int, int]:
    return getattr(tensor, _DIMS, (-2, -1))


def _merge(fields: list[tuple[torch.Tensor, Field]], out: torch.Tensor) -> tuple[Field, tuple[int, int]]:
    """Union of the inputs' fields (and their spatial axes) when `out` keeps their spatial size,
    else GLOBAL. Axes are counted from the end, as broadcasting aligns them."""
    dims = {_dims(t) for t, _ in fields}
    if len(dims) != 1:
        return GLOBAL, (-2, -1)
    [(h, w)] = dims
    if out.ndim < -h or any(f == GLOBAL or (t.shape[h], t.shape[w]) != (out.shape[h], out.shape[w]) for t, f in fields):
        return GLOBAL, (-2, -1)
    axes = []
    for axis in range(2):
        column = [f[axis] for _, f in fields]
        axes.append(Axis(min(a.lo for a in column), max(a.hi for a in column), max(a.jump for a in column)))
    return tuple(axes), (h, w)


def _tensors(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value, {})


def _set(tensor, field, dims: tuple[int, int] = (-2, -1)) -> None:
    if isinstance(tensor, torch.Tensor):
        try:
            setattr(tensor, _ATTR, field)
            setattr(tensor, _DIMS, dims)
        except (AttributeError, RuntimeError):  # some tensor subclasses refuse attributes
            pass
