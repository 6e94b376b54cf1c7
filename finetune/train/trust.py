"""The end of a multi-class run: calibrated confidence, and what abstaining and prediction sets
are later chosen from, stored in ``best.ckpt`` (so ``finetune.load``, ``predict`` and every export
use them).

With the best weights loaded: a temperature is fitted on the validation split
(:func:`finetune.use.calibration.fit_temperature`; ``trust.temperature=false`` keeps 1), the
validation images' calibrated top-class confidence and correctness are kept (``target_precision=``
picks its threshold from them), and, when ``trust.calibration_fraction`` held a calibration split
out of training, its conformity scores (``coverage=`` takes their quantile). The calibration split
is disjoint from the validation split that picked the checkpoint and fitted the temperature, as
split conformal prediction needs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from finetune.model.build import CHECKPOINT_KEY
from finetune.train.checkpoints import atomic_save
from finetune.use.calibration import calibration_scores, fit_temperature
from finetune.use.confidence import CONFORMAL_SCORES, conformal_scores
from finetune.use.tta import readable

log = logging.getLogger(__name__)


def calibrate_and_store(module, splits, eval_tf, best_path: Path | None, settings,
                        batch_size: int) -> tuple[dict[str, float], dict]:
    """Fit, score and store as the module docstring says. Returns (metrics: ``temperature``,
    ``val/ece``, ``val/ece_calibrated``, ``val/nll``, ``val/nll_calibrated`` and ``test/...``
    likewise when there is a test split; the checkpoint's ``trust`` entry)."""
    # Through the image pipeline at full precision, as finetune.load predicts: not the cached
    # features (computed under the run's autocast), so target_precision= holds for predict's numbers.
    logits, labels, _ = image_logits(module.model, splits.val, eval_tf, batch_size)
    temperature = fit_temperature(logits, labels) if settings.temperature else 1.0
    probabilities = (logits / temperature).softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    trust = {"temperature": temperature, "temperature_split": f"val ({len(labels)} images)",
             "val": {"confidence": confidence.tolist(), "correct": (predicted == labels).tolist()}}
    metrics = {"temperature": temperature, **_scores("val", logits, labels, temperature)}
    if splits.test:
        metrics.update(_scores("test", *image_logits(module.model, splits.test, eval_tf, batch_size)[:2], temperature))
    if splits.calibration:
        cal_logits, cal_labels, skipped = image_logits(module.model, splits.calibration, eval_tf, batch_size)
        cal_probabilities = (cal_logits / temperature).softmax(dim=1).numpy()
        trust["calibration"] = {"images": len(cal_labels), "skipped": skipped, "score": settings.conformal,
                                "scores": {s: conformal_scores(cal_probabilities, cal_labels.numpy(), s).tolist()
                                           for s in CONFORMAL_SCORES}}
    if best_path is not None:
        checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
        checkpoint[CHECKPOINT_KEY]["trust"] = trust
        atomic_save(checkpoint, best_path)
    flawless = bool((logits.argmax(dim=1) == labels).all())
    log.info("calibration: temperature %.3f %s (%d images): ECE %.4f -> %.4f, "
             "NLL %.4f -> %.4f%s", temperature, "kept: no mistake on the validation split to fit it on" if flawless
             else "fitted on the validation split", len(labels), metrics["val/ece"], metrics["val/ece_calibrated"],
             metrics["val/nll"], metrics["val/nll_calibrated"],
             f"; calibration split for prediction sets: {len(trust['calibration']['scores']['lac'])} images"
             if splits.calibration else "")
    return metrics, trust


def _scores(split: str, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float]:
    before = calibration_scores(logits.softmax(dim=1), labels.long())
    after = calibration_scores((logits / temperature).softmax(dim=1), labels.long())
    return {f"{split}/{name}{suffix}": value for suffix, scores in (("", before), ("_calibrated", after))
            for name, value in scores.items()}


@torch.no_grad()
def image_logits(model: torch.nn.Module, samples: list, eval_tf, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(float32 logits (N, C), labels (N,), files skipped) of `model` (a whole Classifier) on
    labelled image `samples` through the evaluation pipeline `eval_tf` (normalized tensors out)."""
    model.eval()
    device = next(model.parameters()).device
    skipped: dict[str, str] = {}
    logits, labels, batch = [], [], []

    def flush():
        inputs = torch.stack([eval_tf(image=image)["image"] for image, _ in batch]).to(device)
        logits.append(model(inputs).float().cpu())
        labels.extend(label for _, label in batch)
        batch.clear()

    for image, label in readable(samples, skipped):
        batch.append((image, label))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    n = model.head[-1].out_features if hasattr(model.head[-1], "out_features") else 0
    return (torch.cat(logits) if logits else torch.zeros(0, n)), torch.tensor(labels, dtype=torch.long), len(skipped)
