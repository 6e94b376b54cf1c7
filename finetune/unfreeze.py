"""Gradual unfreezing: frozen layer groups start training on a schedule, from the head down.

The schedule is a pure function of the epoch, so resuming from any checkpoint restores the same
trainable set. Parameters of scheduled groups keep ``requires_grad=True`` and sit in the
optimizer from the start with their real learning rates (schedulers and resume see every group,
and DDP sees a fixed set of parameters); until its epoch a group is *gated*: its gradients are
dropped before each optimizer step (so no update, no weight decay, no optimizer state) and its
BatchNorm layers stay in eval mode.
"""

from __future__ import annotations

import lightning as L
from torch import nn

from finetune.errors import ConfigError
from finetune.model import Classifier


def unfreeze_schedule(frozen_groups: list[str], every: int | None = None, at: int | None = None) -> dict[str, int]:
    """group -> first epoch (0-based) it trains. `frozen_groups` in model order (stem first).

    every: the group next to the head at epoch `every`, the next one at 2*every, ... (ULMFiT).
    at: all of them at epoch `at` (linear probe, then fine-tune everything: LP-FT).
    """
    if every is not None and at is not None:
        raise ConfigError("Set freeze.unfreeze_every or freeze.unfreeze_at, not both.")
    if every is not None:
        if every < 1:
            raise ConfigError(f"freeze.unfreeze_every must be >= 1, got {every}.")
        return {g: (i + 1) * every for i, g in enumerate(reversed(frozen_groups))}
    if at is not None:
        if at < 0:
            raise ConfigError(f"freeze.unfreeze_at must be >= 0, got {at}.")
        return {g: at for g in frozen_groups}
    return {}


class GradualUnfreezing(L.Callback):
    """Applies an :func:`unfreeze_schedule` to a :class:`Classifier` epoch by epoch."""

    def __init__(self, model: Classifier, schedule: dict[str, int]):
        self.schedule = dict(schedule)
        by_name = {g.name: g for g in model.groups}
        self.params = {g: set(by_name[g].param_names) for g in schedule}
        self.norms = {g: [n for n in _norm_names(model) if f"{n}.weight" in self.params[g]] for g in schedule}
        scheduled_norms = {n for norms in self.norms.values() for n in norms}
        self.always_frozen_norms = [n for n in model.frozen_norms if n not in scheduled_norms]
        for group in schedule:  # trained later: in the optimizer from the start
            for name, param in model.named_parameters():
                if name in self.params[group]:
                    param.requires_grad_(True)
        self.gated: set[str] = set(schedule)
        self.apply(model, epoch=0)

    def gated_at(self, epoch: int) -> set[str]:
        return {g for g, start in self.schedule.items() if epoch < start}

    def apply(self, model: Classifier, epoch: int) -> None:
        self.gated = self.gated_at(epoch)
        names = set().union(*(self.params[g] for g in self.gated))
        # Resolved once per epoch, not at every optimizer step.
        self.gated_params = [p for n, p in model.named_parameters() if n in names]
        model.frozen_norms = self.always_frozen_norms + [n for g in sorted(self.gated) for n in self.norms[g]]
        model.train(model.training)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module.model, trainer.current_epoch)
        pl_module.log("unfrozen_groups", float(len(self.schedule) - len(self.gated)), on_step=False, on_epoch=True,
                      sync_dist=True)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        for param in self.gated_params:
            param.grad = None


def gradual_unfreezing(model: Classifier, every: int | None, at: int | None) -> GradualUnfreezing | None:
    """The callback for `model`'s frozen groups (as :func:`apply_freeze` left them), or None."""
    params = dict(model.named_parameters())
    frozen = [g.name for g in model.groups
              if g.param_names and all(n in params and not params[n].requires_grad for n in g.param_names)]
    schedule = unfreeze_schedule(frozen, every, at)
    if (every is not None or at is not None) and not frozen:
        raise ConfigError("Gradual unfreezing needs frozen groups: set freeze.groups or freeze.until too.")
    return GradualUnfreezing(model, schedule) if schedule else None


def _norm_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
