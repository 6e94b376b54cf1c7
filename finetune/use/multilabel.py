"""Multi-label scores: mAP over the labels present, per-label decision thresholds tuned for F1 on
the validation split, and the evaluation report ``finetune evaluate`` prints.

Conventions (those of scikit-learn and the multi-label literature): mAP is the mean of per-label
average precision over the labels with at least one positive image (a label absent from the data
has no defined AP and is left out, never counted as 0); F1 and exact-set accuracy are taken at the
decision thresholds (a label is predicted when its probability >= its threshold).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics.classification import MultilabelAveragePrecision
from torchmetrics.utilities import dim_zero_cat

from finetune.tables import format_table

# Candidate thresholds: a grid, not every observed probability, so a threshold is never fitted to
# a single validation image's score.
GRID = np.round(np.linspace(0.02, 0.98, 49), 2)


class PresentLabelsAveragePrecision(MultilabelAveragePrecision):
    """Macro mAP over the labels with at least one positive target. torchmetrics' own macro
    average counts a label without positives as AP 0 (and warns at every epoch): with a small
    validation split that lowers mAP for a reason the data check already reports."""

    def __init__(self, num_labels: int):
        super().__init__(num_labels=num_labels, average="none")

    def compute(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No positive samples")
            values = super().compute()
        present = dim_zero_cat(self.target).sum(0) > 0
        return values[present].mean() if present.any() else values.new_tensor(float("nan"))


def _f1(predicted: np.ndarray, targets: np.ndarray, axis=None) -> np.ndarray:
    """F1 per column (axis=0) or micro over everything (axis=None); 0 where it is 0/0."""
    tp = (predicted & targets).sum(axis)
    denominator = predicted.sum(axis) + targets.sum(axis)
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


OBJECTIVES = ("f1", "accuracy", "none")


def _accuracy(predicted: np.ndarray, targets: np.ndarray, axis=None) -> np.ndarray:
    return (predicted == targets).mean(axis)


def tune_thresholds(probabilities: np.ndarray, targets: np.ndarray, objective: str = "f1") -> tuple[np.ndarray, float]:
    """(a threshold per label, the global threshold) maximizing `objective`: ``f1`` (each label's
    F1; the global one micro-F1), ``accuracy`` (each label's accuracy, i.e. Hamming loss: fewer
    false alarms, better exact-set accuracy), or ``none`` (0.5 everywhere). Each label with a
    positive image gets its own threshold (the middle of the best plateau: ties are common on
    small splits), the others the global one."""
    if objective not in OBJECTIVES:
        raise ValueError(f"threshold objective {objective!r}; choose {', '.join(OBJECTIVES)}")
    probabilities, targets = np.asarray(probabilities, np.float64), np.asarray(targets) > 0.5
    if not len(probabilities) or objective == "none":
        return np.full(targets.shape[1], 0.5), 0.5
    score = _f1 if objective == "f1" else _accuracy
    micro = [score(probabilities >= t, targets) for t in GRID]
    best = np.flatnonzero(np.isclose(micro, max(micro)))
    global_threshold = float(GRID[best[len(best) // 2]])
    thresholds = np.full(targets.shape[1], global_threshold)
    per_label = np.stack([score(probabilities >= t, targets, axis=0) for t in GRID])  # (grid, labels)
    for label in np.flatnonzero(targets.any(axis=0)):
        scores = per_label[:, label]
        best = np.flatnonzero(np.isclose(scores, scores.max()))
        thresholds[label] = GRID[best[len(best) // 2]]
    return thresholds, global_threshold


def decisions(
    probabilities: torch.Tensor | np.ndarray,
    thresholds: Sequence[float],
    min_labels: int = 0,
    max_labels: int | None = None,
) -> np.ndarray:
    """(N, C) bool: which labels each image gets: those at or above their thresholds, but at least
    the `min_labels` and at most the `max_labels` most probable (a run sets them to the fewest and
    most labels a training image has: an empty answer is always wrong when every image has a
    label, three labels when none has more than two)."""
    p = np.asarray(probabilities, np.float64)
    chosen = p >= np.asarray(thresholds, np.float64)[None, :]
    if not p.size:
        return chosen
    rank = np.argsort(np.argsort(-p, axis=1, kind="stable"), axis=1, kind="stable")  # 0: the most probable
    chosen |= rank < min_labels
    if max_labels is not None:
        chosen &= rank < max_labels
    return chosen


def decision_scores(predicted: np.ndarray, targets: np.ndarray) -> dict:
    """Micro F1, macro F1 (mean over labels) and exact-set accuracy of (N, C) bool decisions."""
    y = np.asarray(targets) > 0.5
    return {
        "f1_micro": float(_f1(predicted, y)),
        "f1_macro": float(_f1(predicted, y, axis=0).mean()),
        "exact": float((predicted == y).all(axis=1).mean()) if len(y) else 0.0,
    }


def multilabel_report(
    probabilities,
    targets,
    classes: Sequence[str],
    thresholds: Sequence[float],
    min_labels: int = 0,
    max_labels: int | None = None,
) -> dict:
    """mAP, micro/macro F1 and exact-set accuracy at `thresholds` (with `min_labels` and
    `max_labels`, see :func:`decisions`) and at a plain 0.5, the mean binary cross-entropy, and per label:
    threshold, precision, recall, F1, AP (None without positives), support. Plain Python numbers
    (JSON-ready)."""
    from sklearn.metrics import average_precision_score

    p = np.asarray(probabilities, np.float64).reshape(-1, len(classes))
    y = np.asarray(targets).reshape(-1, len(classes)) > 0.5
    thresholds = [float(t) for t in thresholds]
    scores = lambda predicted: decision_scores(predicted, y)  # noqa: E731

    predicted = decisions(p, thresholds, min_labels, max_labels)
    ap = [float(average_precision_score(y[:, j], p[:, j])) if y[:, j].any() else None for j in range(len(classes))]
    present = [a for a in ap if a is not None]
    tp, npred, npos = (predicted & y).sum(0), predicted.sum(0), y.sum(0)
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    return {
        "task": "multilabel",
        "images": len(y),
        "map": float(np.mean(present)) if present else math.nan,
        **scores(predicted),
        "at_0.5": scores(p >= 0.5),
        "loss": float(-(y * np.log(clipped) + ~y * np.log(1 - clipped)).mean()) if len(y) else 0.0,
        "classes": list(classes),
        "min_labels": min_labels,
        "max_labels": max_labels,
        "per_label": {
            c: {
                "threshold": thresholds[j],
                "precision": float(tp[j] / npred[j]) if npred[j] else 0.0,
                "recall": float(tp[j] / npos[j]) if npos[j] else 0.0,
                "f1": float(2 * tp[j] / (npred[j] + npos[j])) if npred[j] + npos[j] else 0.0,
                "ap": ap[j],
                "support": int(npos[j]),
            }
            for j, c in enumerate(classes)
        },
    }


def format_multilabel_report(report: dict) -> str:
    """A summary line (tuned thresholds, then 0.5) and the per-label table, best AP first."""
    half = report["at_0.5"]
    rows = sorted(report["per_label"].items(), key=lambda kv: -1 if kv[1]["ap"] is None else kv[1]["ap"], reverse=True)
    table = [
        [
            c,
            f"{m['threshold']:.2f}",
            f"{m['precision']:.3f}",
            f"{m['recall']:.3f}",
            f"{m['f1']:.3f}",
            "-" if m["ap"] is None else f"{m['ap']:.3f}",
            m["support"],
        ]
        for c, m in rows
    ]
    return "\n".join(
        [
            f"mAP={report['map']:.4f} f1_micro={report['f1_micro']:.4f} f1_macro={report['f1_macro']:.4f} "
            f"exact={report['exact']:.4f} at the tuned thresholds, loss={report['loss']:.4f} on "
            f"{report['images']} images" + (f" ({len(report['skipped'])} skipped)" if report.get("skipped") else ""),
            f"at 0.5: f1_micro={half['f1_micro']:.4f} f1_macro={half['f1_macro']:.4f} exact={half['exact']:.4f}",
            format_table(["label", "threshold", "precision", "recall", "f1", "AP", "positives"], table, "lrrrrrr"),
        ]
    )


def evaluate_multilabel(
    model,
    data_config,
    samples,
    classes: Sequence[str],
    thresholds: Sequence[float] | None,
    *,
    mode: str = "none",
    batch_size: int = 32,
    min_labels: int = 0,
    max_labels: int | None = None,
) -> dict:
    """:func:`multilabel_report` of `model` on labelled `samples` ((path or array, tuple of label
    indices) pairs) with test-time augmentation `mode`, plus ``views`` and ``skipped``; files
    that do not decode are skipped. Thresholds default to 0.5."""
    from itertools import islice

    from finetune.data.labels import multi_hot
    from finetune.use.tta import check_tta, readable, tta_probabilities

    views, skipped = check_tta(mode), {}
    decoded = readable(samples, skipped)
    probabilities, targets = [np.zeros((0, len(classes)))], [np.zeros((0, len(classes)))]
    while chunk := list(islice(decoded, max(1, batch_size // views))):
        probabilities.append(
            tta_probabilities(
                model, [image for image, _ in chunk], data_config, mode, batch_size, multilabel=True
            ).numpy()
        )
        targets.append(np.stack([multi_hot(label, len(classes)) for _, label in chunk]))
    thresholds = thresholds if thresholds is not None else [0.5] * len(classes)
    report = multilabel_report(
        np.concatenate(probabilities), np.concatenate(targets), classes, thresholds, min_labels, max_labels
    )
    return {**report, "views": views, "skipped": skipped}
