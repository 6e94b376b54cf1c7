"""The end of a multi-label run: per-label decision thresholds tuned on the validation split with
the best weights, stored in ``best.ckpt`` (so ``finetune.load``, ``predict`` and every export use
them), and the scores they give on the validation (and test) split beside those at 0.5."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from finetune.model.build import CHECKPOINT_KEY
from finetune.model.modes import evaluating
from finetune.train.checkpoints import atomic_save
from finetune.use.multilabel import multilabel_report, tune_thresholds

log = logging.getLogger(__name__)


def label_count_bounds(setting: str, splits) -> tuple[int, int | None]:
    """(fewest, most) labels an answer may hold: ``auto``, those of the training images (an
    answer then never has fewer or more labels than every training image had); ``any``: (0, None)."""
    if setting == "any":
        return 0, None
    sizes = [len(label) for _, label in splits.train]
    return min(sizes), max(sizes)


@torch.no_grad()
def split_probabilities(module, loader) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, C), the task's sigmoids; multi-hot targets (N, C)) of `module` over
    `loader`'s batches, normalized as in training (images or cached features alike)."""
    probabilities, targets = [], []
    with evaluating(module):
        for batch in loader:
            inputs, labels = batch[0], batch[1]
            if not len(labels):
                continue
            inputs = module.on_after_batch_transfer((inputs.to(module.device), labels), 0)[0]
            probabilities.append(module.task.probabilities(module(inputs).float()).cpu())
            targets.append(labels.float())
    n = len(module.classes)
    return (
        torch.cat(probabilities).numpy() if probabilities else np.zeros((0, n)),
        torch.cat(targets).numpy() if targets else np.zeros((0, n)),
    )


def tune_and_store(
    module,
    data,
    best_path: Path | None,
    has_test: bool,
    objective: str = "f1",
    min_labels: int = 0,
    max_labels: int | None = None,
) -> tuple[dict[str, float], dict]:
    """Tune thresholds for `objective` on the validation split, write them (and the fewest and most
    labels an answer has, see :func:`finetune.use.multilabel.decisions`) into `best_path`'s
    finetune entry, and
    return (metrics at the tuned thresholds: ``val/f1_micro_tuned``, ``val/f1_macro_tuned``,
    ``val/exact_tuned``, and ``test/...`` likewise; the summary entry: thresholds and the
    per-label reports)."""
    classes = list(module.classes)
    probabilities, targets = split_probabilities(module, data.val_dataloader())
    thresholds, global_threshold = tune_thresholds(probabilities, targets, objective)
    rule = (min_labels, max_labels)
    reports = {"val": multilabel_report(probabilities, targets, classes, thresholds, *rule)}
    if has_test:
        reports["test"] = multilabel_report(
            *split_probabilities(module, data.test_dataloader()), classes, thresholds, *rule
        )
    metrics = {
        f"{split}/{name}_tuned": report[name]
        for split, report in reports.items()
        for name in ("f1_micro", "f1_macro", "exact")
    }
    stored = {c: float(t) for c, t in zip(classes, thresholds)}
    if best_path is not None:
        checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
        checkpoint[CHECKPOINT_KEY]["thresholds"] = stored
        checkpoint[CHECKPOINT_KEY]["min_labels"] = min_labels
        checkpoint[CHECKPOINT_KEY]["max_labels"] = max_labels
        atomic_save(checkpoint, best_path)
    val = reports["val"]
    count = f"{min_labels} to {max_labels}" if max_labels is not None else f"at least {min_labels}"
    log.info(
        "thresholds tuned for %s on the validation split (global %.2f, per label %.2f to %.2f), %s labels "
        "per image: f1_micro %.4f (at 0.5: %.4f), exact-set accuracy %.4f (at 0.5: %.4f)",
        objective,
        global_threshold,
        thresholds.min(),
        thresholds.max(),
        count,
        val["f1_micro"],
        val["at_0.5"]["f1_micro"],
        val["exact"],
        val["at_0.5"]["exact"],
    )
    return metrics, {
        "objective": objective,
        "thresholds": stored,
        "global_threshold": global_threshold,
        "min_labels": min_labels,
        "max_labels": max_labels,
        **reports,
    }
