"""The task of a training run, as :class:`~finetune.train.module.ClassifierModule` asks it: the
loss, target shape and decision rule of :mod:`finetune.compute.task`, plus the torchmetrics each
split accumulates and the columns of the epoch table.

``multiclass``: accuracy (top-5 too on evaluation splits with 5+ classes). ``multilabel``: F1
(micro) on every split; mAP (macro average precision over the labels present), F1 (macro) and
exact-set accuracy on evaluation splits, all at threshold 0.5 (the run tunes per-label thresholds
at the end, :mod:`finetune.train.thresholds`).
"""

from __future__ import annotations

from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MultilabelExactMatch, MultilabelF1Score

import finetune.compute.task as base
from finetune.config import TASK_CHOICES
from finetune.use.multilabel import PresentLabelsAveragePrecision


class MultiClass(base.MultiClass):
    # (train loss, train metric, val loss, val metric): the epoch table's columns after ``epoch``
    columns = ("train/loss", "train/acc", "val/loss", "val/acc")

    def metrics(self, split: str, num_classes: int) -> dict[str, Metric]:
        """`split`'s metrics by name (logged as ``{split}/{name}``), each updated with the logits
        and :meth:`metric_targets`."""
        n = num_classes
        metrics = {"acc": MulticlassAccuracy(num_classes=n, top_k=1, average="micro")}
        if n >= 5 and split != "train":
            metrics["acc_top5"] = MulticlassAccuracy(num_classes=n, top_k=5, average="micro")
        return metrics


class MultiLabel(base.MultiLabel):
    columns = ("train/loss", "train/f1_micro", "val/loss", "val/map")

    def metrics(self, split: str, num_classes: int) -> dict[str, Metric]:
        n = num_classes
        evaluation = (
            {}
            if split == "train"
            else {
                "map": PresentLabelsAveragePrecision(n),
                "f1_macro": MultilabelF1Score(num_labels=n, average="macro"),
                "exact": MultilabelExactMatch(num_labels=n),
            }
        )
        return {"f1_micro": MultilabelF1Score(num_labels=n, average="micro"), **evaluation}


Task = MultiClass | MultiLabel


def task_for(multilabel: bool) -> Task:
    """The training task: :class:`MultiLabel` or :class:`MultiClass`."""
    return MultiLabel() if multilabel else MultiClass()


def task_named(name: str) -> Task:
    """The task of ``task=`` (the config's, a checkpoint's): ``multiclass`` or ``multilabel``."""
    if name not in TASK_CHOICES:
        raise ValueError(f"task={name!r}; expected one of {', '.join(TASK_CHOICES)}")
    return task_for(name == "multilabel")


__all__ = ["MultiClass", "MultiLabel", "Task", "task_for", "task_named"]
