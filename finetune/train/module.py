"""The LightningModule: the task's loss and metrics, per-group optimizer, the lr schedule.

The task (:mod:`finetune.train.task`) holds what differs between ``task="multiclass"``
(cross-entropy, accuracy) and ``task="multilabel"`` (binary cross-entropy on multi-hot targets,
mAP, F1 and exact-set accuracy at 0.5): the module asks it for its loss, metrics and columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torchmetrics import MeanMetric

from finetune.compute.speed import to_channels_last
from finetune.data.transforms import normalize_on_device
from finetune.errors import NonFiniteLossError
from finetune.model.build import CHECKPOINT_KEY
from finetune.model.classifier import Classifier
from finetune.train.limits import limited_batches
from finetune.train.mixing import BatchMixer
from finetune.train.optim import build_optimizer, build_scheduler, optimizer_settings, param_groups
from finetune.train.task import Task, task_named


class ClassifierModule(L.LightningModule):
    """Trains a :class:`Classifier`. Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``
    (and ``val/acc_top5`` with 5+ classes; ``test/*`` likewise) per epoch, and the lr of every
    optimizer group. Steps only update torchmetrics accumulators (exact over the epoch and across
    DDP ranks); each epoch's values are logged once, after its last training batch and at the end
    of each evaluation: ``self.log`` costs about 0.4 ms a call, more than a head's whole step. `class_weights` weight
    the training loss (``data.balance=weighted_loss``).
    ``inputs="features"``: batches carry the frozen backbone's cached outputs (see
    :mod:`finetune.compute.features`) and only the head runs; the model stays whole for checkpoints.
    `mixer` (:mod:`finetune.train.mixing`): training batches are mixed (mixup / cutmix, or the
    cached features) and the loss is cross-entropy on its soft targets, which carry the label
    smoothing; ``train/acc`` still compares predictions with each sample's own label.
    `task`: ``"multiclass"``, ``"multilabel"`` or a task object of :mod:`finetune.train.task`;
    every option after `config` is keyword-only.

    Checkpoints carry ``checkpoint["finetune"] = {"classes": [...], "config": {...}}``: plain
    lists, dicts and strings, so they load with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        model: Classifier,
        classes: list[str],
        optimizer: Mapping,
        scheduler: Mapping,
        config: Mapping | None = None,
        *,
        label_smoothing: float = 0.0,
        class_weights: torch.Tensor | None = None,
        inputs: str = "images",
        channels_last: bool = False,
        pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None,
        mixer: BatchMixer | None = None,
        task: str | Task = "multiclass",
    ):
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
        self.mixer = mixer
        # training loss only, evaluation stays comparable; multilabel: BCE's positive-class weights
        self.class_weights = class_weights
        self.task = task_named(task) if isinstance(task, str) else task
        self.epoch_columns = self.task.columns  # (train loss, train metric, val loss, val metric)
        self.unreadable: dict[str, str] = {}  # files that failed to decode mid-run: path -> reason
        for split in ("train", "val", "test"):  # self.train_metrics, ... (a ModuleDict key cannot be "train")
            metrics = {"loss": MeanMetric(), **self.task.metrics(split, len(self.classes))}
            setattr(self, f"{split}_metrics", torch.nn.ModuleDict(metrics))

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
        weight = self.class_weights.to(labels.device) if self.class_weights is not None else None
        targets = labels
        if self.mixer is not None and self.mixer.active(self.current_epoch):
            images, targets = self.mixer(images, labels)  # soft targets; multiclass: smoothed already
        logits = self(images)
        loss = self.task.loss(logits, targets, class_weights=weight, label_smoothing=self.label_smoothing)
        if not torch.isfinite(loss):
            lr = max(g["lr"] for g in self.optimizers().optimizer.param_groups)
            raise NonFiniteLossError(
                f"The training loss became {loss.item()} at epoch {self.current_epoch + 1}, step "
                f"{self.global_step + 1}. "
                f"Lower the learning rate (optimizer.lr; the largest group lr is {lr:g}) or clip gradients "
                f"(+trainer.gradient_clip_val=1.0)."  # the run adds where its last good checkpoint is
            )
        self._update("train", logits, labels, loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if batch_idx + 1 == self.trainer.num_training_batches:  # the epoch's last batch (limits included)
            self._log_epoch("train")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")  # an epoch that ended early (a stop request): log what it has

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _evaluate(self, batch, split: str) -> None:
        images, labels = self._unpack(batch)
        if not len(labels):
            return
        logits = self(images)
        self._update(split, logits, labels, self.task.loss(logits, labels))

    def _update(self, split: str, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        for name, metric in getattr(self, f"{split}_metrics").items():
            if name == "loss":
                metric.update(loss.detach(), len(labels))
            else:
                metric.update(logits.detach(), self.task.metric_targets(labels))

    def _log_epoch_number(self) -> None:
        """``epoch`` counted from 1, with every logging call: CSV, W&B and the console agree
        (Lightning would add its own 0-based one)."""
        self.log("epoch", float(self.current_epoch + 1), on_step=False, on_epoch=True, batch_size=1)

    def _log_epoch(self, split: str) -> None:
        """Log `split`'s epoch values (all ranks take part: compute() syncs) and start afresh."""
        metrics = getattr(self, f"{split}_metrics")
        if not metrics["loss"].update_called:
            return  # nothing seen this epoch, or already logged
        if split != "train":  # the training loop logs it at the start of the epoch
            self._log_epoch_number()
        for name, metric in metrics.items():
            shown = f"{split}/{name}" in self.epoch_columns[::2] + self.epoch_columns[3:]  # not the train metric
            # compute() already synced the ranks: sync_dist only tells Lightning so, batch_size=1: one value
            self.log(
                f"{split}/{name}",
                metric.compute(),
                on_step=False,
                on_epoch=True,
                prog_bar=shown,
                sync_dist=True,
                batch_size=1,
            )
            metric.reset()

    def configure_optimizers(self):
        cfg = optimizer_settings(self.optimizer_cfg)
        groups = param_groups(self.model, cfg["lr"], cfg["weight_decay"], cfg["layer_decay"])
        optimizer = build_optimizer(groups, cfg)
        max_epochs = self.trainer.max_epochs or 1
        scheduler, interval = build_scheduler(optimizer, self.scheduler_cfg, max_epochs, self._steps_per_epoch())
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per training epoch, from the data module's size, this rank's share,
        ``limit_train_batches`` and ``accumulate_grad_batches``. Not Lightning's
        ``estimated_stepping_batches``: it builds the training DataLoader here, before a resumed
        run has restored its epoch, and the loader's sampler would then start at epoch 0."""
        trainer, data = self.trainer, self.trainer.datamodule
        if data is None or not hasattr(data, "train_labels"):
            return 1
        batches = math.ceil(math.ceil(len(data.train_labels()) / trainer.world_size) / data.batch_size)
        batches = limited_batches(batches, trainer.limit_train_batches)
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    solver_name: str | None = None  # a solver without a learning rate (the epoch table shows its name)

    def on_train_epoch_start(self) -> None:
        self._log_epoch_number()
        if self.solver_name is not None:
            return
        for group in self.optimizers().optimizer.param_groups:
            self.log(f"lr/{group['name']}", group["lr"], on_step=False, on_epoch=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"classes": self.classes, "config": self.config, "task": self.task.name}
