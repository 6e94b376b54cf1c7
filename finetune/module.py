"""The LightningModule: cross-entropy, accuracy metrics, per-group optimizer, epoch-wise schedule."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from finetune.model import Classifier
from finetune.optim import build_optimizer, build_scheduler, param_groups

CHECKPOINT_KEY = "finetune"


class ClassifierModule(L.LightningModule):
    """Trains a :class:`Classifier`. Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``
    (and ``val/acc_top5`` with 5+ classes) per epoch, and the lr of every optimizer group.

    Checkpoints carry ``checkpoint["finetune"] = {"classes": [...], "config": {...}}``: plain
    lists, dicts and strings, so they load with ``torch.load(weights_only=True)``.
    """

    def __init__(self, model: Classifier, classes: list[str], optimizer: Mapping, scheduler: Mapping,
                 config: Mapping | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.classes = list(classes)
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = dict(scheduler)
        self.config = dict(config or {})
        self.label_smoothing = label_smoothing
        n = len(self.classes)
        self.train_acc = MulticlassAccuracy(num_classes=n, top_k=1, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n, top_k=1, average="micro")
        self.val_acc_top5 = MulticlassAccuracy(num_classes=n, top_k=5, average="micro") if n >= 5 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.val_acc(logits, labels)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=len(labels))
        if self.val_acc_top5 is not None:
            self.val_acc_top5(logits, labels)
            self.log("val/acc_top5", self.val_acc_top5, on_epoch=True, batch_size=len(labels))

    def configure_optimizers(self):
        cfg = self.optimizer_cfg
        groups = param_groups(self.model, cfg["lr"], cfg.get("weight_decay", 0.0), cfg.get("layer_decay", 1.0))
        optimizer = build_optimizer(groups, cfg)
        scheduler = build_scheduler(optimizer, self.scheduler_cfg, self.trainer.max_epochs or 1)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_train_epoch_start(self) -> None:
        for group in self.optimizers().optimizer.param_groups:
            self.log(f"lr/{group['name']}", group["lr"], on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"classes": self.classes, "config": self.config}
