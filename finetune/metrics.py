"""Classification metrics from logits: accuracy, loss, per-class precision/recall/F1, confusion."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.summary import format_table


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy, mean cross-entropy, per-class precision/recall/F1/support, confusion matrix
    (rows: true class, columns: predicted)."""
    n = len(classes)
    predicted = logits.argmax(1)
    confusion = torch.zeros(n, n, dtype=torch.long)
    for t, p in zip(labels.tolist(), predicted.tolist()):
        confusion[t, p] += 1
    per_class = {}
    for i, c in enumerate(classes):
        tp = int(confusion[i, i])
        precision = tp / max(int(confusion[:, i].sum()), 1)
        recall = tp / max(int(confusion[i].sum()), 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1, "support": int(confusion[i].sum())}
    return {
        "images": len(labels),
        "accuracy": float((predicted == labels).float().mean()) if len(labels) else 0.0,
        "loss": float(F.cross_entropy(logits, labels)) if len(labels) else 0.0,
        "per_class": per_class,
        "classes": classes,
        "confusion": confusion.tolist(),
    }


def format_report(report: dict) -> str:
    classes = report["classes"]
    rows = [[c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]]
            for c, m in report["per_class"].items()]
    lines = [f"accuracy={report['accuracy']:.4f} loss={report['loss']:.4f} on {report['images']} images"
             + (f" ({len(report['skipped'])} skipped)" if report.get("skipped") else ""),
             format_table(["class", "precision", "recall", "f1", "support"], rows, "lrrrr"),
             "confusion matrix (rows: true, columns: predicted)",
             format_table(["true \\ pred"] + classes, [[c] + row for c, row in zip(classes, report["confusion"])],
                          "l" + "r" * len(classes))]
    return "\n".join(lines)
