"""Per-epoch metrics, recorded as the run goes, to report the best epoch at the end."""

from __future__ import annotations

import lightning as L
from omegaconf import OmegaConf

from finetune.train.task import task_for


def task_metric(task: str | None) -> str:
    """A task's score, the last column of its epoch table: ``val/acc`` (multiclass, also when
    `task` is unset) or ``val/map`` (multilabel, mean average precision)."""
    return task_for(task == "multilabel").columns[-1]


def monitored(cfg) -> str:
    """The metric that picks the best epoch: ``callbacks.checkpoint.monitor``, where ``auto`` is
    the task's (:func:`task_metric`)."""
    monitor = OmegaConf.select(cfg, "callbacks.checkpoint.monitor", default="auto")
    return monitor if monitor != "auto" else task_metric(cfg.get("task"))


class MetricsHistory(L.Callback):
    """Records ``trainer.callback_metrics`` (floats) at the end of every training epoch, when
    both the epoch's training and validation metrics are known. ``epoch`` counts from 1, as
    everywhere a person reads it (Lightning's ``current_epoch`` counts from 0)."""

    def __init__(self):
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        row["epoch"] = trainer.current_epoch + 1
        self.epochs = [r for r in self.epochs if r["epoch"] != row["epoch"]] + [row]

    # Saved in checkpoints, so that a resumed run reports the epochs before the interruption too.
    def state_dict(self) -> dict:
        return {"epochs": [dict(r) for r in self.epochs], "first_epoch": 1}

    def load_state_dict(self, state: dict) -> None:
        shift = 1 - state.get("first_epoch", 0)  # checkpoints written before epochs counted from 1
        self.epochs = [{**r, "epoch": r["epoch"] + shift} for r in state.get("epochs", [])]

    def best(self, monitor: str = "val/acc", mode: str = "max") -> dict[str, float]:
        """The recorded epoch with the best `monitor` (the first of ties); {} if none."""
        rows = [r for r in self.epochs if monitor in r]
        if not rows:
            return self.epochs[-1] if self.epochs else {}
        sign = 1.0 if mode == "max" else -1.0
        return max(rows, key=lambda r: (sign * r[monitor], -r["epoch"]))
