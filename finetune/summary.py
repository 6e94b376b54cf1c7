"""Plain-text tables printed at the start and end of a run."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from finetune.model import Classifier


def format_table(header: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """Columns padded to their widest cell; `align` has one char per column: l or r."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    align = align or "l" * len(header)

    def line(cells):
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line([str(h) for h in header]), line(["-" * w for w in widths])] + [line(r) for r in rows])


def groups_table(model: Classifier, group_lrs: dict[str, float], unfreeze_at: dict[str, int] | None = None) -> str:
    """Layer group, parameter count, trainable/frozen (or the epoch it starts training), learning
    rate, BatchNorm mode."""
    unfreeze_at = unfreeze_at or {}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    norm_modes = _norm_modes(model)
    rows = []
    for group in model.groups:
        count = sum(params[n].numel() if n in params else buffers[n].numel() for n in group.param_names if n in params or n in buffers)
        trainable = sum(params[n].numel() for n in group.param_names if n in params and params[n].requires_grad)
        state = "trainable" if trainable == count and count else ("frozen" if not trainable else f"partial ({trainable:,})")
        if group.name in unfreeze_at:
            state = f"from epoch {unfreeze_at[group.name] + 1}"
        lr = group_lrs.get(group.name)
        modes = sorted({mode for norm, mode in norm_modes.items() if f"{norm}.weight" in group.param_names})
        rows.append([group.name, f"{count:,}", state, f"{lr:.3g}" if lr is not None else "-", ",".join(modes) or "-"])
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    table = format_table(["group", "params", "state", "lr", "batchnorm"], rows, "lrllr")
    return f"{table}\ntotal {total:,} parameters, {trainable:,} trainable ({trainable / max(total, 1):.1%})"


def _norm_modes(model: Classifier) -> dict[str, str]:
    modes = {}
    for name, module in model.named_modules():
        if type(module).__name__.startswith("FrozenBatchNorm"):  # timm's and torchvision's
            modes[name] = "frozen"
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            modes[name] = "eval" if name in model.frozen_norms else "train"
    return modes
