"""Classification metrics from logits: accuracy, loss, per-class precision/recall/F1, confusion."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.tables import format_table


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy, mean cross-entropy, per-class precision/recall/F1/support, confusion matrix
    (rows: true class, columns: predicted).

    Returns ``{"images", "accuracy", "loss", "per_class": {class: {"precision", "recall", "f1",
    "support"}}, "classes", "confusion"}`` with plain Python numbers (JSON-ready). A class never
    predicted (or never present) has precision (recall) 0, not NaN; F1 is then 0 too. No images:
    every number 0 and an all-zero confusion matrix.

    scikit-learn computes the matrix and the per-class scores (float64, the numbers
    ``evaluation.json`` keeps; torchmetrics would give the same values in float32).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    n = len(classes)
    predicted = logits.argmax(1)
    if len(labels):
        truth, guess = labels.cpu().numpy(), predicted.cpu().numpy()
        confusion = confusion_matrix(truth, guess, labels=range(n)).tolist()
        precision, recall, f1, support = precision_recall_fscore_support(truth, guess, labels=range(n), zero_division=0)
    else:  # scikit-learn refuses empty input
        confusion = [[0] * n for _ in range(n)]
        precision = recall = f1 = support = [0] * n
    per_class = {
        c: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, c in enumerate(classes)
    }
    return {
        "images": len(labels),
        "accuracy": float((predicted == labels).float().mean()) if len(labels) else 0.0,
        "loss": float(F.cross_entropy(logits, labels)) if len(labels) else 0.0,
        "per_class": per_class,
        "classes": classes,
        "confusion": confusion,
    }


def format_report(report: dict) -> str:
    """The report as text: a summary line, the per-class table, the confusion matrix."""
    classes = report["classes"]
    rows = [
        [c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]]
        for c, m in report["per_class"].items()
    ]
    lines = [
        f"accuracy={report['accuracy']:.4f} loss={report['loss']:.4f} on {report['images']} images"
        + (f" ({len(report['skipped'])} skipped)" if report.get("skipped") else ""),
        format_table(["class", "precision", "recall", "f1", "support"], rows, "lrrrr"),
        "confusion matrix (rows: true, columns: predicted)",
        format_table(
            ["true \\ pred"] + classes,
            [[c] + row for c, row in zip(classes, report["confusion"])],
            "l" + "r" * len(classes),
        ),
    ]
    return "\n".join(lines)
