"""The L2 strength of a run's optimal head: ``head.fit.l2`` as given, or chosen by k-fold
cross-validation (:mod:`finetune.compute.l2_choice`) and remembered beside the cached features, so
that a sweep's trials on the same cache pay for it once."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping

import torch

from finetune.compute.features import CachedFeatures
from finetune.compute.l2_choice import DEFAULT_GRID, L2Choice, choose_l2
from finetune.compute.linear_probe import c_of, feature_scale
from finetune.data.sources import DataSplits
from finetune.files import follow_umask

log = logging.getLogger(__name__)

DEFAULT_STRENGTH = 1e-4  # when cross-validation cannot run (a class with a single training image)


def chosen_l2(
    cached: CachedFeatures,
    splits: DataSplits,
    settings: Mapping,
    seed: int,
    weights: torch.Tensor | None,
    label_smoothing: float,
) -> tuple[float, str]:
    """(the absolute L2 of the objective, a line for the start of the run). ``auto``: k-fold
    cross-validation, remembered beside the cached features (a sweep's trials share it)."""
    views, targets = cached.features["train"], cached.labels["train"]
    scale = feature_scale(views)
    outputs = len(splits.classes)
    rows = views.shape[0] * views.shape[1]
    if settings["l2"] != "auto":
        l2 = float(settings["l2"]) * scale
        return l2, f"L2 strength {settings['l2']:g} (head.fit.l2; scikit-learn C {c_of(l2, rows):.3g})"
    folds = settings["folds"]
    if not splits.multilabel:
        counts = torch.bincount(targets, minlength=outputs)
        folds = min(folds, int(counts[counts > 0].min()))  # StratifiedKFold: every class in every fold
    if folds < 2 or len(targets) < 2 * settings["folds"]:
        l2 = DEFAULT_STRENGTH * scale
        return l2, (
            f"L2 strength {DEFAULT_STRENGTH:g}: too few training images per class for cross-validation "
            f"(head.fit.l2=NUMBER to choose)"
        )
    started = time.perf_counter()
    memo = _memo_path(cached, splits.multilabel, folds, seed, weights, label_smoothing)
    choice = _read_memo(memo)
    remembered = choice is not None
    if choice is None:
        choice = choose_l2(
            views,
            targets,
            outputs,
            grid=DEFAULT_GRID,
            folds=folds,
            seed=seed,
            multilabel=splits.multilabel,
            class_weights=weights,
            label_smoothing=label_smoothing,
        )
        _write_memo(memo, choice)
    metric = "mAP" if splits.multilabel else "accuracy"
    line = (
        f"L2 strength {choice.strength:.2g} (scikit-learn C {c_of(choice.l2, rows):.3g}) chosen by {folds}-fold "
        f"cross-validation on the training split: held-out {metric} {choice.score:.4f}, "
        f"{'remembered' if remembered else 'computed'} in "
        f"{time.perf_counter() - started:.1f} s"
    )
    return choice.l2, line


def _memo_path(cached: CachedFeatures, multilabel: bool, folds: int, seed: int, weights, smoothing: float):
    if cached.path is None:
        return None
    key = json.dumps(
        {
            "grid": DEFAULT_GRID,
            "folds": folds,
            "seed": seed,
            "multilabel": multilabel,
            "version": 2,  # 2: solved around the features' mean (better converged)
            "weights": None if weights is None else [round(float(w), 6) for w in weights],
            "label_smoothing": smoothing,
        }
    )
    return cached.path.with_name(f"{cached.path.stem}.l2-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")


def _read_memo(path) -> L2Choice | None:
    try:
        stored = json.loads(path.read_text())
        return L2Choice(
            float(stored["l2"]),
            float(stored["strength"]),
            float(stored["score"]),
            tuple(stored["grid"]),
            tuple(stored["scores"]),
            int(stored["folds"]),
        )
    except (AttributeError, OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: compute it
        return None


def _write_memo(path, choice: L2Choice) -> None:
    if path is None:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(choice.as_dict()))
        follow_umask(tmp)
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache: the choice is only a speed-up for the next run
        log.warning("feature cache: could not remember the L2 choice in %s (%s)", path, err.strerror or err)
