"""Optimizer parameter groups (one per layer group, explicit lr) and learning-rate schedules."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from finetune.config import with_defaults
from finetune.errors import ConfigError
from finetune.model.classifier import Classifier


def param_groups(model: Classifier, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """One group per layer group with trainable parameters, named after it, each with its own lr:
    ``lr * layer_decay**depth`` where the head has depth 0 and the group below it depth 1.
    Biases and normalization weights (1-d tensors) get no weight decay (``<name>/no_decay``).
    Each group's ``lr_scale`` (``layer_decay**depth``) is its lr over the head's, for the lr finder."""
    params = dict(model.named_parameters())
    result = []
    for depth, group in enumerate(reversed(model.groups)):
        # Names can be gone: batchnorm=frozen turns BatchNorm weights into buffers.
        trainable = [params[n] for n in group.param_names if n in params and params[n].requires_grad]
        decay = [p for p in trainable if p.ndim > 1]
        no_decay = [p for p in trainable if p.ndim <= 1]
        group_lr = lr * layer_decay**depth
        if decay:
            result.append(
                {
                    "name": group.name,
                    "params": decay,
                    "lr": group_lr,
                    "weight_decay": weight_decay,
                    "lr_scale": layer_decay**depth,
                }
            )
        if no_decay:
            result.append(
                {
                    "name": f"{group.name}/no_decay",
                    "params": no_decay,
                    "lr": group_lr,
                    "weight_decay": 0.0,
                    "lr_scale": layer_decay**depth,
                }
            )
    grouped = {id(p) for g in result for p in g["params"]}
    orphans = [n for n, p in params.items() if p.requires_grad and id(p) not in grouped]
    if orphans:  # a parameter outside every group would silently never train
        raise RuntimeError(f"Trainable parameters outside every layer group: {orphans[:5]}")
    return result


def group_lrs(model: Classifier, cfg: Mapping) -> dict[str, float]:
    """Layer group -> the lr :func:`param_groups` gives it (trainable groups only)."""
    groups = param_groups(model, cfg["lr"], 0.0, optimizer_settings(cfg)["layer_decay"])
    return {g["name"].split("/")[0]: g["lr"] for g in groups}


def optimizer_settings(cfg: Mapping) -> dict:
    """The ``optimizer`` group's values, completed from ``conf/optimizer/NAME.yaml``."""
    name = cfg["name"]
    if name not in ("sgd", "adamw"):
        raise ConfigError(f"optimizer.name={name!r}; choose sgd or adamw (optimizer=sgd|adamw).")
    return with_defaults("optimizer", name, cfg)


def build_optimizer(groups: list[dict], cfg: Mapping) -> torch.optim.Optimizer:
    cfg = optimizer_settings(cfg)
    if cfg["name"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"])
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping, max_epochs: int, steps_per_epoch: int = 1):
    """``(scheduler, interval)``: the ``scheduler`` group's schedule, stepped every ``"epoch"`` or
    every ``"step"`` (``scheduler.interval``), or ``(None, "epoch")`` for ``name: none`` without
    warm-up. Every schedule can start with ``warmup_epochs`` of linear warm-up from lr/(n+1) to
    the lr (n: warm-up length in steps of the schedule); the main schedule starts after it (a step
    decay's step_size counts from there, a cosine spans the epochs left). With ``interval: step``
    lengths are epochs times `steps_per_epoch` (optimizer steps), so the lr moves smoothly within
    epochs and warm-up may last a fraction of one."""
    name = cfg["name"]
    if name not in ("step", "cosine", "none"):
        raise ConfigError(f"scheduler.name={name!r}; choose step, cosine or none (scheduler=step|cosine|none).")
    cfg = with_defaults("scheduler", name, cfg)
    interval = cfg["interval"]
    if interval not in ("epoch", "step"):
        raise ConfigError(f"scheduler.interval={interval!r}; choose epoch or step.")
    per_unit = steps_per_epoch if interval == "step" else 1
    warmup_epochs = float(cfg["warmup_epochs"] or 0)
    if warmup_epochs < 0 or (interval == "epoch" and not warmup_epochs.is_integer()):
        raise ConfigError(
            f"scheduler.warmup_epochs={cfg['warmup_epochs']}: a whole number of epochs >= 0 "
            f"(fractions need scheduler.interval=step)."
        )
    warmup = round(warmup_epochs * per_unit)
    total = max(1, max_epochs) * per_unit
    if name == "none":
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0) if warmup else None
    elif name == "step":
        main = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max(1, round(cfg["step_size"] * per_unit)), gamma=cfg["gamma"]
        )
    else:
        main = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, total - warmup), eta_min=cfg["min_lr"]
        )
    if warmup <= 0 or main is None:
        return main, interval
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup]), interval
