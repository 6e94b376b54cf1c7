"""The LightningModule: cross-entropy, accuracy metrics, per-group optimizer, epoch-wise schedule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from finetune.data.transforms import normalize_on_device
from finetune.errors import NonFiniteLossError
from finetune.model import Classifier
from finetune.optim import build_optimizer, build_scheduler, param_groups
from finetune.speed import to_channels_last

CHECKPOINT_KEY = "finetune"


class ClassifierModule(L.LightningModule):
    """Trains a :class:`Classifier`. Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``
    (and ``val/acc_top5`` with 5+ classes; ``test/*`` likewise) per epoch, and the lr of every
    optimizer group. `class_weights` weight the training loss (``data.balance=weighted_loss``).
    ``inputs="features"``: batches carry the frozen backbone's cached outputs (see
    :mod:`finetune.features`) and only the head runs; the model stays whole for checkpoints.

    Checkpoints carry ``checkpoint["finetune"] = {"classes": [...], "config": {...}}``: plain
    lists, dicts and strings, so they load with ``torch.load(weights_only=True)``.
    """

    def __init__(self, model: Classifier, classes: list[str], optimizer: Mapping, scheduler: Mapping,
                 config: Mapping | None = None, label_smoothing: float = 0.0,
                 class_weights: torch.Tensor | None = None, inputs: str = "images", channels_last: bool = False,
                 pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None):
        super().__init__()
        if inputs not in ("images", "features"):
            raise ValueError(f"inputs={inputs!r}; expected 'images' or 'features'")
        self.inputs = inputs  # "features": batches hold cached backbone outputs, only the head runs
        self.channels_last = channels_last
        # uint8 image batches are normalized here, on the training device (mean, std in 0..1).
        if pixel_stats is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) * 255 for v in pixel_stats)
            self.register_buffer("pixel_mean", mean, persistent=False)
            self.register_buffer("pixel_std", std, persistent=False)
        self.pixel_stats = pixel_stats
        self.model = model
        self.classes = list(classes)
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = dict(scheduler)
        self.config = dict(config or {})
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights  # training loss only: evaluation stays comparable
        self.unreadable: dict[str, str] = {}  # files that failed to decode mid-run: path -> reason
        n = len(self.classes)
        self.train_acc = MulticlassAccuracy(num_classes=n, top_k=1, average="micro")
        self.eval_metrics = torch.nn.ModuleDict({
            split: torch.nn.ModuleDict({
                "acc": MulticlassAccuracy(num_classes=n, top_k=1, average="micro"),
                **({"acc_top5": MulticlassAccuracy(num_classes=n, top_k=5, average="micro")} if n >= 5 else {}),
            })
            for split in ("val", "test")
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs == "features":
            return self.model.head(x)
        return self.model(to_channels_last(x) if self.channels_last else x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images = batch[0]
        if self.pixel_stats is not None and images.dtype == torch.uint8:
            batch = (normalize_on_device(images, self.pixel_mean, self.pixel_std), *batch[1:])
        return batch

    def _unpack(self, batch):
        """(images, labels) of a batch; files that failed to decode are recorded, not fatal."""
        images, labels = batch[0], batch[1]
        for path, reason in batch[2] if len(batch) > 2 else ():
            self.unreadable[path] = reason
        return images, labels

    def training_step(self, batch, batch_idx):
        images, labels = self._unpack(batch)
        if not len(labels):
            return None  # every file of this batch was unreadable: skip the step
        logits = self(images)
        weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
        loss = F.cross_entropy(logits, labels, weight=weight, label_smoothing=self.label_smoothing)
        if not torch.isfinite(loss):
            lr = max(g["lr"] for g in self.optimizers().optimizer.param_groups)
            raise NonFiniteLossError(
                f"The training loss became {loss.item()} at epoch {self.current_epoch + 1}, step {self.global_step + 1}. "
                f"Lower the learning rate (optimizer.lr; the largest group lr is {lr:g}) or clip gradients "
                f"(+trainer.gradient_clip_val=1.0)."  # the run adds where its last good checkpoint is
            )
        self.train_acc(logits, labels)
        # sync_dist: with trainer=ddp the epoch loss is the mean over every rank's batches (torchmetrics
        # objects such as the accuracies sync themselves).
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels),
                 sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def _evaluate(self, batch, split: str) -> None:
        images, labels = self._unpack(batch)
        if not len(labels):
            return
        logits = self(images)
        self.log(f"{split}/loss", F.cross_entropy(logits, labels), on_epoch=True, prog_bar=split == "val",
                 batch_size=len(labels), sync_dist=True)
        for name, metric in self.eval_metrics[split].items():
            metric(logits, labels)
            self.log(f"{split}/{name}", metric, on_epoch=True, prog_bar=name == "acc" and split == "val",
                     batch_size=len(labels))

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
            self.log(f"lr/{group['name']}", group["lr"], on_step=False, on_epoch=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"classes": self.classes, "config": self.config}
