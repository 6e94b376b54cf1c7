"""The end of a multi-label run: per-label decision thresholds tuned on the validation split with
the best weights, stored in ``best.ckpt`` (so ``finetune.load``, ``predict`` and every export use
them), and the scores they give on the validation (and test) split beside those at 0.5."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from finetune.model.build import CHECKPOINT_KEY
from finetune.train.checkpoints import atomic_save
from finetune.use.multilabel import multilabel_report, tune_thresholds

log = logging.getLogger(__name__)


@torch.no_grad()
def split_probabilities(module, loader) -> tuple[np.ndarray, np.ndarray]:
    """(sigmoid probabilities (N, C), multi-hot targets (N, C)) of `module` over `loader`'s
    batches, normalized as in training (images or cached features alike)."""
    was_training = module.training
    module.eval()
    probabilities, targets = [], []
    try:
        for batch in loader:
            inputs, labels = batch[0], batch[1]
            if not len(labels):
                continue
            inputs = module.on_after_batch_transfer((inputs.to(module.device), labels), 0)[0]
            probabilities.append(torch.sigmoid(module(inputs).float()).cpu())
            targets.append(labels.float())
    finally:
        module.train(was_training)
    n = len(module.classes)
    return (torch.cat(probabilities).numpy() if probabilities else np.zeros((0, n)),
            torch.cat(targets).numpy() if targets else np.zeros((0, n)))


def tune_and_store(module, data, best_path: Path | None, has_test: bool) -> tuple[dict[str, float], dict]:
    """Tune thresholds on the validation split, write them into `best_path`'s finetune entry, and
    return (metrics at the tuned thresholds: ``val/f1_micro_tuned``, ``val/f1_macro_tuned``,
    ``val/exact_tuned``, and ``test/...`` likewise; the summary entry: thresholds and the
    per-label reports)."""
    classes = list(module.classes)
    probabilities, targets = split_probabilities(module, data.val_dataloader())
    thresholds, global_threshold = tune_thresholds(probabilities, targets)
    reports = {"val": multilabel_report(probabilities, targets, classes, thresholds)}
    if has_test:
        reports["test"] = multilabel_report(*split_probabilities(module, data.test_dataloader()), classes, thresholds)
    metrics = {f"{split}/{name}_tuned": report[name] for split, report in reports.items()
               for name in ("f1_micro", "f1_macro", "exact")}
    stored = {c: float(t) for c, t in zip(classes, thresholds)}
    if best_path is not None:
        checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
        checkpoint[CHECKPOINT_KEY]["thresholds"] = stored
        atomic_save(checkpoint, best_path)
    val = reports["val"]
    log.info("thresholds tuned on the validation split (global %.2f, per label %.2f to %.2f): f1_micro %.4f "
             "(at 0.5: %.4f), exact-set accuracy %.4f (at 0.5: %.4f)", global_threshold, thresholds.min(),
             thresholds.max(), val["f1_micro"], val["at_0.5"]["f1_micro"], val["exact"], val["at_0.5"]["exact"])
    return metrics, {"thresholds": stored, "global_threshold": global_threshold, **reports}
