"""What the task is to a loss: multi-class (one class an image) or multi-label (any set of labels).

One object per task, as timm's ``train.py`` keeps its loss and its decision apart from the loop:
the training module (:mod:`finetune.train.task` adds its metrics and logged columns) and the
linear probe's L-BFGS objective (:func:`finetune.compute.linear_probe.penalized_loss`) ask it,
so both minimize the same loss.

* :class:`MultiClass`: targets are class indices (N,), or soft rows (N, C) once mixup has mixed
  them; softmax cross-entropy; the decision is the most probable class.
* :class:`MultiLabel`: targets are multi-hot rows (N, C); a sigmoid binary cross-entropy per label,
  summed over the labels and averaged over the images; each label is decided by its own threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """`logits` in float32 at least (half-precision outputs of autocast; float64 stays float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def soft_target_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy against soft targets (N, C). Without `weight` it is timm's
    SoftTargetCrossEntropy; with per-class weights, each sample counts ``targets @ weight``, and the
    mean divides by the summed counts: for one-hot targets exactly ``F.cross_entropy(..., weight=)``
    (timm's loss has no class weights, hence these lines)."""
    per_class = -targets * F.log_softmax(logits.float(), dim=-1)
    if weight is None:
        return per_class.sum(dim=-1).mean()
    weight = weight.to(logits.device, torch.float)
    return (per_class * weight).sum() / (targets * weight).sum()


class MultiClass:
    """One class an image: softmax cross-entropy, the argmax decides."""

    name = "multiclass"
    multilabel = False

    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        *,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Cross-entropy on class indices (N,), `class_weights` weighting each row by its class (a
        weighted mean, as ``F.cross_entropy`` takes it), or on soft targets (N, C): mixed ones carry
        their label smoothing already, so `label_smoothing` is not applied to them again."""
        if targets.ndim == 2:
            return soft_target_cross_entropy(logits, targets, class_weights)
        return F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing)

    def metric_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """`labels` as torchmetrics' multiclass metrics take them: class indices, as they are."""
        return labels

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """(N,) the most probable class of each row."""
        return logits.argmax(dim=-1)


class MultiLabel:
    """Any set of labels an image: a sigmoid binary cross-entropy per label, thresholds decide."""

    name = "multilabel"
    multilabel = True

    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        *,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """BCE on multi-hot rows (mixed ones too), `class_weights` as BCE's ``pos_weight`` (each
        label's positives). Smoothing pulls each target toward 0.5, as timm's BinaryCrossEntropy
        does. Summed over the labels and averaged over the images: a mean over the labels too
        would shrink every gradient by the number of labels, and the recipes' learning rates, set
        for cross-entropy, would no longer fit."""
        targets = targets.float() * (1 - label_smoothing) + 0.5 * label_smoothing
        per_label = F.binary_cross_entropy_with_logits(
            _full_precision(logits), targets, pos_weight=class_weights, reduction="none"
        )
        return per_label.sum(dim=1).mean()

    def metric_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """`labels` as torchmetrics' multilabel metrics take them: integer multi-hot rows."""
        return labels.long()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def predict(self, logits: torch.Tensor, thresholds: torch.Tensor | float = 0.5) -> torch.Tensor:
        """(N, C) bool: the labels whose probability is at or above their threshold (one for all,
        or one per label), as a loaded model decides before its fewest / most labels apply."""
        return self.probabilities(logits) >= torch.as_tensor(thresholds, dtype=logits.dtype, device=logits.device)


Task = MultiClass | MultiLabel


def task_for(multilabel: bool) -> Task:
    """The task object: :class:`MultiLabel` or :class:`MultiClass`."""
    return MultiLabel() if multilabel else MultiClass()


__all__ = ["MultiClass", "MultiLabel", "Task", "soft_target_cross_entropy", "task_for"]
