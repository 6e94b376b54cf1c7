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
from finetune.model.modes import evaluating
from finetune.train.checkpoints import atomic_save
from finetune.use.calibration import calibration_scores, fit_temperature
from finetune.use.confidence import CONFORMAL_SCORES, conformal_scores
from finetune.use.tta import labelled_log_probabilities

log = logging.getLogger(__name__)


def calibrate_and_store(
    module, splits, data_config: dict, best_path: Path | None, settings, batch_size: int, cached=None
) -> tuple[dict[str, float], dict]:
    """Fit, score and store as the module docstring says. Returns (metrics: ``temperature``,
    ``val/ece``, ``val/ece_calibrated``, ``val/nll``, ``val/nll_calibrated`` and ``test/...``
    likewise when there is a test split; the checkpoint's ``trust`` entry).

    The outputs come at full precision, as finetune.load predicts (so target_precision= holds for
    predict's numbers): through the image pipeline, or, for a frozen backbone, from `cached`
    (:class:`~finetune.compute.features.CachedFeatures`, whose evaluation splits are computed at
    full precision through the same pipeline): the head alone, no second pass over the images;
    a split shortened to what a capped epoch read gives as many of the cache's first rows."""

    def _outputs(split: str):
        if cached is not None and split in cached.features:
            return _head_outputs(module, cached, split, len(getattr(splits, split)))
        return _image_outputs(module, getattr(splits, split), data_config, batch_size)

    logits, labels, _ = _outputs("val")
    temperature = fit_temperature(logits, labels) if settings.temperature else 1.0
    probabilities = (logits / temperature).softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    trust = {
        "temperature": temperature,
        "temperature_split": f"val ({len(labels)} images)",
        "val": {"confidence": confidence.tolist(), "correct": (predicted == labels).tolist()},
    }
    metrics = {"temperature": temperature, **_scores("val", logits, labels, temperature)}
    if splits.test:
        metrics.update(_scores("test", *_outputs("test")[:2], temperature))
    if splits.calibration:
        cal_logits, cal_labels, skipped = _outputs("calibration")
        cal_probabilities = (cal_logits / temperature).softmax(dim=1).numpy()
        trust["calibration"] = {
            "images": len(cal_labels),
            "skipped": len(skipped),
            "score": settings.conformal,
            "scores": {
                s: conformal_scores(cal_probabilities, cal_labels.numpy(), s).tolist() for s in CONFORMAL_SCORES
            },
        }
    if best_path is not None:
        checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
        checkpoint[CHECKPOINT_KEY]["trust"] = trust
        atomic_save(checkpoint, best_path)
    flawless = bool((logits.argmax(dim=1) == labels).all())
    log.info(
        "calibration: temperature %.3f %s (%d images): ECE %.4f -> %.4f, NLL %.4f -> %.4f%s",
        temperature,
        "kept: no mistake on the validation split to fit it on" if flawless else "fitted on the validation split",
        len(labels),
        metrics["val/ece"],
        metrics["val/ece_calibrated"],
        metrics["val/nll"],
        metrics["val/nll_calibrated"],
        f"; calibration split for prediction sets: {len(trust['calibration']['scores']['lac'])} images"
        if splits.calibration
        else "",
    )
    return metrics, trust


def _scores(split: str, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float]:
    before = calibration_scores(logits.softmax(dim=1), labels.long())
    after = calibration_scores((logits / temperature).softmax(dim=1), labels.long())
    return {
        f"{split}/{name}{suffix}": value
        for suffix, scores in (("", before), ("_calibrated", after))
        for name, value in scores.items()
    }


@torch.no_grad()
def _head_outputs(module, cached, split: str, rows: int):
    """(log-softmax of the head's logits on the first `rows` cached features of `split`, their
    labels, no skipped: the cache left unreadable files out already). Log-softmax, not logits:
    softmax, argmax and the temperature's fit are the same on them."""
    head = module.model.head
    device = next(head.parameters()).device
    with evaluating(module.model):
        logits = head(cached.features[split][:rows].to(device)).float().cpu()
    return logits.log_softmax(dim=1), cached.labels[split][:rows].long(), {}


def _image_outputs(module, samples: list, data_config: dict, batch_size: int):
    """(log-softmax of the whole model's logits, labels, skipped) on `samples` through the
    evaluation pipeline, at full precision, as finetune.load predicts."""
    with evaluating(module.model):
        return labelled_log_probabilities(module.model, data_config, samples, len(module.classes), "none", batch_size)
