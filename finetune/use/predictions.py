"""``finetune predict``'s files: ``predictions.csv`` (one row per image) and ``predictions.json``
(with the checkpoint, the classes, the calibration and decision rule, test-time augmentation and
the images skipped), for a classifier's answers or a multi-label model's label sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write_predictions(predictions: list, out: Path, ckpt: str, model, rule, tta: dict, failures: dict) -> None:
    """A classifier's `predictions` (:meth:`FinetunedModel.predict`, under the decision `rule`) in
    `out`: each image's answer where the rule may abstain, its prediction set where it makes
    them, its top-k labels and probabilities."""
    sets = rule.score is not None
    with (out / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        k = max((len(p.top_k) for p in predictions), default=0)
        abstains = rule.min_confidence is not None  # the answer column: the label or unknown
        writer.writerow(
            ["image"]
            + (["answer"] if abstains else [])
            + (["prediction_set"] if sets else [])
            + [c for i in range(1, k + 1) for c in (f"label_{i}", f"probability_{i}")]
        )
        for p in predictions:
            writer.writerow(
                [p.source]
                + ([p.label] if abstains else [])
                + (["|".join(c for c, _ in p.prediction_set)] if sets else [])
                + [v for label, prob in p.top_k for v in (label, f"{prob:.6f}")]
            )
    (out / "predictions.json").write_text(
        json.dumps(
            {
                "checkpoint": str(Path(ckpt).resolve()),
                "classes": model.classes,
                "temperature": model.temperature,
                **rule.describe(),
                "tta": tta,
                "predictions": [
                    {
                        "image": p.source,
                        "answer": p.label,
                        "top_k": p.top_k,
                        **({"prediction_set": p.prediction_set} if sets else {}),
                    }
                    for p in predictions
                ],
                "skipped": failures,
            },
            indent=2,
        )
    )


def write_label_sets(predictions: list, out: Path, ckpt: str, model, tta: dict, failures: dict) -> None:
    """A multi-label model's `predictions` in `out`: the label set, then every label's
    probability; the json with the thresholds and the bounds on the number of labels."""
    with (out / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "labels"] + model.classes)
        for p in predictions:
            writer.writerow([p.source, " ".join(p.names)] + [f"{p.probabilities[c]:.6f}" for c in model.classes])
    (out / "predictions.json").write_text(
        json.dumps(
            {
                "checkpoint": str(Path(ckpt).resolve()),
                "task": "multilabel",
                "classes": model.classes,
                "thresholds": dict(zip(model.classes, model.thresholds)),
                "min_labels": model.min_labels,
                "max_labels": model.max_labels,
                "tta": tta,
                "predictions": [
                    {"image": p.source, "labels": p.labels, "probabilities": p.probabilities} for p in predictions
                ],
                "skipped": failures,
            },
            indent=2,
        )
    )
