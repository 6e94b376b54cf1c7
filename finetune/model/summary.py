"""The layer-group table printed at the start of a run and by ``finetune show-groups``."""

from __future__ import annotations

from finetune.model.classifier import Classifier
from finetune.model.freeze import batchnorm_layers
from finetune.tables import format_table


def groups_table(model: Classifier, group_lrs: dict[str, float]) -> str:
    """Layer group, parameter count, trainable/frozen (or the epoch it starts training, from the
    model's freeze plan), learning rate, BatchNorm mode."""
    plan = model.freeze_plan
    unfreeze_at = dict(plan.unfreeze_at) if plan is not None else {}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    norm_modes = _norm_modes(model)
    rows = []
    for group in model.groups:
        count = sum(
            params[n].numel() if n in params else buffers[n].numel()
            for n in group.param_names
            if n in params or n in buffers
        )
        trainable = sum(params[n].numel() for n in group.param_names if n in params and params[n].requires_grad)
        state = (
            "trainable" if trainable == count and count else ("frozen" if not trainable else f"partial ({trainable:,})")
        )
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
    modes = {
        name: "frozen" for name, module in model.named_modules() if type(module).__name__.startswith("FrozenBatchNorm")
    }  # timm's and torchvision's
    modes.update({name: "eval" if name in model.frozen_norms else "train" for name in batchnorm_layers(model)})
    return modes
