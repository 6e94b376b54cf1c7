"""The model card's sections on what the run measured: its metrics (accuracies with their Wilson
95% intervals), its calibration (or, multi-label, its decision thresholds) and its limitations.

Every number comes from the checkpoint or the run's summary.json (:class:`RunFiles`),
under the contract of :mod:`finetune.use.model_card`: what they lack is said to be missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.data.check import split_images
from finetune.use.audit import wilson
from finetune.use.calibration import ECE_BINS
from finetune.use.load import FinetunedModel

CALIBRATION_KEYS = {"ece": "ECE", "nll": "NLL", "brier": "Brier"}
METRIC_NAMES = {
    "acc": "accuracy",
    "acc_top5": "top-5 accuracy",
    "loss": "loss (cross-entropy)",
    "map": "mean average precision",
}
ACCURACIES = ("acc", "acc_top5")


@dataclass(frozen=True)
class RunFiles:
    """What the run folder says about a checkpoint. ``summary`` is None when there is no readable
    ``summary.json`` (``missing`` says why); ``is_best``: the checkpoint is the one summary.json's
    metrics describe."""

    run_dir: Path
    summary: dict | None
    missing: str | None
    is_best: bool = False

    def images(self, split: str) -> int | None:
        return split_images((self.summary or {}).get("data") or {}, split)


def monitor_name(config: dict) -> str:
    monitor = ((config.get("callbacks") or {}).get("checkpoint") or {}).get("monitor", "auto")
    return monitor if monitor != "auto" else ("val/map" if config.get("task") == "multilabel" else "val/acc")


def metrics_section(model: FinetunedModel, run: RunFiles) -> list[str]:
    if not run.summary or not run.is_best:
        why = run.missing or "summary.json's metrics are those of the run's best checkpoint, not this one"
        return ["## Metrics\n", f"Not stated: {why}.\n"]
    metrics = run.summary.get("metrics", {})
    rows = []
    for split in ("val", "test", "train"):
        n = run.images(split)
        for key in sorted(k for k in metrics if k.startswith(f"{split}/")):
            name = key.split("/", 1)[1]
            if name.startswith(tuple(CALIBRATION_KEYS)) or not isinstance(metrics[key], (int, float)):
                continue
            value, interval = metrics[key], ""
            label = (
                "loss (binary cross-entropy)"
                if name == "loss" and model.task == "multilabel"
                else METRIC_NAMES.get(name, name)
            )
            if name in ACCURACIES and split != "train" and n:
                right = round(value * n)
                low, high = wilson(right, n)
                interval, value = f"{low:.3f} to {high:.3f}", f"{value:.4f} ({right}/{n})"
            else:
                value = f"{value:.4f}"
            rows.append(f"| {split} | {label} | {value} | {n if n is not None else '?'} | {interval} |")
    epoch = f" at epoch {int(metrics['epoch'])}" if "epoch" in metrics else ""
    return [
        "## Metrics\n",
        f"From the run's summary.json{epoch}, the epoch chosen by {monitor_name(model.config)}. Train scores are "
        f"measured on augmented batches while training.\n",
        "| split | metric | value | images | 95% interval (Wilson) |",
        "|---|---|---:|---:|---|",
        *rows,
        "",
    ]


def calibration_section(model: FinetunedModel, run: RunFiles) -> list[str]:
    lines = ["## Calibration\n"]
    if model.task == "multilabel":
        thresholds = ", ".join(f"`{c}` {t:.3f}" for c, t in zip(model.classes, model.thresholds))
        return [
            "## Decision thresholds\n",
            f"A label applies when its sigmoid probability reaches its threshold (tuned on the "
            f"validation split): {thresholds}; at least {model.min_labels} and at most "
            f"{model.max_labels if model.max_labels is not None else 'any number of'} labels per image.\n",
        ]
    if "temperature" not in model.trust:
        return lines + ["Not calibrated: the checkpoint holds no temperature; probabilities are the plain softmax.\n"]
    lines.append(
        f"Probabilities are `softmax(logits / T)` with T = {model.temperature:.4f}, fitted on "
        f"{model.trust.get('temperature_split', 'the validation split')} by minimizing the log-loss."
    )
    metrics = (run.summary or {}).get("metrics", {}) if run.is_best else {}
    rows = [
        f"| {label} | {metrics[f'val/{k}']:.4f} | {metrics[f'val/{k}_calibrated']:.4f} |"
        for k, label in CALIBRATION_KEYS.items()
        if f"val/{k}" in metrics and f"val/{k}_calibrated" in metrics
    ]
    if rows:
        lines += [
            f"On the same validation images (ECE over {ECE_BINS} bins; these images also fitted T, so the "
            "after column is optimistic):\n",
            "| score | before | after |",
            "|---|---:|---:|",
            *rows,
        ]
    else:
        lines.append("Calibration scores before and after: not stated (no summary.json metrics for this checkpoint).")
    calibration = model.trust.get("calibration") or {}
    if calibration.get("images"):
        lines.append(
            f"\nConformal prediction sets (`coverage=` in `finetune predict`) are calibrated on "
            f"{calibration['images']} held-out images."
        )
    return lines + [""]


def limitations_section(model: FinetunedModel, run: RunFiles) -> list[str]:
    lines = ["## Limitations\n"]
    metrics = (run.summary or {}).get("metrics", {}) if run.is_best else {}
    n = run.images("val")
    if n and "val/acc" in metrics:
        low, high = wilson(round(metrics["val/acc"] * n), n)
        lines.append(
            f"- The validation split holds {n} images: the accuracy's 95% interval runs from {low:.3f} to "
            f"{high:.3f}; differences between models smaller than that are not evidence."
        )
    test = run.images("test")
    fitted = (
        " and the thresholds were"
        if model.task == "multilabel"
        else " and the temperature were"
        if str(model.trust.get("temperature_split", "")).startswith("val")
        else " was"
    )
    lines.append(
        f"- The best epoch{fitted} chosen on the validation split, "
        "so the validation scores are optimistic; "
        + (f"the test split ({test} images) chose nothing." if test else "no separate test split was scored.")
    )
    duplicates = len(((run.summary or {}).get("data") or {}).get("duplicates", []))
    if duplicates:
        lines.append(
            f"- {duplicates} validation or test images have an identical copy in training: scores on them "
            f"measure memory, not generalization."
        )
    every = (
        ""
        if model.task == "multilabel"
        else (
            " and answers one of them for any image unless told to abstain "
            "(`min_confidence` / `target_precision` in `finetune predict`)"
        )
    )
    lines.append(
        f"- It knows only its {len(model.classes)} classes{every}. Images unlike the training data (other "
        "cameras, lighting, places, subjects) were not measured."
    )
    lines.append(
        "- Not measured: robustness to corruptions or distribution shift, out-of-distribution detection, "
        "performance per subgroup, speed."
    )
    return lines + [""]
