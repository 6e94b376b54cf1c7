"""Gradual unfreezing, epoch by epoch, as the model's :class:`~finetune.model.freeze.FreezePlan`
schedules it (``freeze.unfreeze_every`` / ``freeze.unfreeze_at``).

The schedule is a pure function of the epoch, so resuming from any checkpoint restores the same
trainable set. Scheduled groups are in the optimizer from the start (schedulers and resume see
every group); until its epoch a group is *gated*: its parameters do not require gradients, so
autograd computes none for them and the backward pass stops at the lowest group that trains (a
gated stem-side part costs a forward pass only). A parameter without a gradient gets no update,
no weight decay and no optimizer state. Its BatchNorm layers stay in eval mode (the plan's
:meth:`set_epoch`).

Under DDP (several processes) ``requires_grad`` stays on: DDP fixes the set of parameters it
reduces when it wraps the model, and a parameter that stops requiring gradients afterwards
would break its reduction. There the gated groups' gradients are computed and dropped before
each optimizer step, which gives the same updates at the cost of their backward pass.
"""

from __future__ import annotations

import lightning as L

from finetune.model.classifier import Classifier
from finetune.model.freeze import FreezePlan


class GradualUnfreezing(L.Callback):
    """Moves `model`'s freeze plan along at each training epoch and gates the groups that do not
    train yet."""

    def __init__(self, model: Classifier):
        self.plan: FreezePlan = model.freeze_plan
        self.schedule = dict(self.plan.unfreeze_at)
        self.gate_by_requires_grad = False  # decided when training starts (one process or several)
        self.apply(model, epoch=0)

    def apply(self, model: Classifier, epoch: int) -> None:
        self.gated = self.plan.gated_at(epoch)
        names = self.plan.gated_params(epoch)
        scheduled = set().union(*self.plan.group_params.values())
        # Resolved once per epoch, not at every optimizer step.
        self.gated_params = [p for n, p in model.named_parameters() if n in names]
        if self.gate_by_requires_grad:
            for name, param in model.named_parameters():
                if name in scheduled:
                    param.requires_grad_(name not in names)
        self.plan.set_epoch(model, epoch)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.gate_by_requires_grad = trainer.world_size == 1

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module.model, trainer.current_epoch)
        pl_module.log(
            "unfrozen_groups", float(len(self.schedule) - len(self.gated)), on_step=False, on_epoch=True, sync_dist=True
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for param in self.gated_params:  # the returned model's parameters are as the plan made them
            param.requires_grad_(True)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self.gate_by_requires_grad:
            for param in self.gated_params:
                param.grad = None


def gradual_unfreezing(model: Classifier) -> GradualUnfreezing | None:
    """The callback for `model`'s freeze plan, or None when it schedules no unfreezing."""
    plan = model.freeze_plan
    return GradualUnfreezing(model) if plan is not None and plan.unfreeze_at else None
