"""A frozen backbone's linear head trained to its optimum (``head.fit.solver=lbfgs``).

On cached features the head's loss is convex (:mod:`finetune.compute.linear_probe`): the run's
epochs are full-batch L-BFGS steps over every cached view of every training image, with the L2
strength chosen by k-fold cross-validation on the training split before the first epoch. The
epoch table, checkpoints, resume (the L-BFGS history is optimizer state), calibration, thresholds
and exports are those of any run: only the training step and its data differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune.compute.feature_data import FeatureDataModule
from finetune.compute.features import SPLITS, CachedFeatures
from finetune.compute.linear_probe import (
    DEFAULT_GRID,
    L2Choice,
    c_of,
    choose_l2,
    feature_scale,
    lbfgs,
    penalized_loss,
    view_rows,
)
from finetune.data.datamodule import class_weights
from finetune.data.sources import DataSplits
from finetune.errors import ConfigError
from finetune.files import follow_umask
from finetune.train.module import ClassifierModule

log = logging.getLogger(__name__)

SOLVERS = ("auto", "lbfgs", "sgd")
DEFAULT_STRENGTH = 1e-4  # when cross-validation cannot run (a class with a single training image)


def fit_settings(head_cfg: Mapping) -> dict:
    """``head.fit`` with its defaults (configs and checkpoints from before it existed: sgd)."""
    fit = dict(head_cfg.get("fit") or {})
    settings = {
        "solver": fit.get("solver", "sgd"),
        "l2": fit.get("l2", "auto"),
        "folds": fit.get("folds", 3),
        "iterations": fit.get("iterations", 200),
    }
    if settings["solver"] not in SOLVERS:
        raise ConfigError(f"head.fit.solver={settings['solver']!r}; choose auto, lbfgs or sgd.")
    l2 = settings["l2"]
    if l2 != "auto" and (isinstance(l2, bool) or not isinstance(l2, (int, float)) or not 0 <= l2 < math.inf):
        raise ConfigError(f"head.fit.l2={l2!r}: use auto (cross-validation) or a strength >= 0 (1e-4 is typical).")
    for key, least in (("folds", 2), ("iterations", 1)):
        if isinstance(settings[key], bool) or not isinstance(settings[key], int) or settings[key] < least:
            raise ConfigError(f"head.fit.{key}={settings[key]!r}: an integer >= {least}.")
    return settings


def single_linear(head: nn.Module) -> nn.Linear | None:
    """The head's one Linear layer, or None when it has several (an MLP head)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[0] if len(linears) == 1 else None


def solver_for_run(cfg, on_features: bool, head: nn.Module, mixer, trainer_kwargs: Mapping) -> tuple[str, str]:
    """(``lbfgs`` or ``sgd``, why) for this run, as ``head.fit.solver`` asks. ``lbfgs`` needs the
    cached features, a linear head without dropout and one process; ``auto`` also keeps SGD
    for the techniques that only make sense with it (mixup, EMA, gradient clipping)."""
    asked = fit_settings(cfg.head)["solver"]
    if asked == "sgd":
        return "sgd", "head.fit.solver=sgd"
    obstacles = []
    if not on_features:
        obstacles.append("the backbone trains (no feature cache)")
    if single_linear(head) is None:
        obstacles.append("the head is an MLP, not a linear layer")
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in head.modules()):
        obstacles.append("the head has dropout")
    devices, nodes = trainer_kwargs.get("devices", "auto"), trainer_kwargs.get("num_nodes", 1)
    if nodes != 1 or not (devices in (1, "1", [0]) or (devices == "auto" and torch.cuda.device_count() <= 1)):
        obstacles.append("the run has several processes")
    if trainer_kwargs.get("gradient_clip_val") or (trainer_kwargs.get("accumulate_grad_batches") or 1) > 1:
        obstacles.append("gradient clipping or accumulation is set")
    if asked == "auto":
        if mixer is not None:
            obstacles.append("mixup is on")
        if (cfg.get("ema") or {}).get("decay"):
            obstacles.append("EMA is on")
        if cfg.optimizer.lr == "auto":
            obstacles.append("optimizer.lr=auto asks for the lr finder")
    if not obstacles:
        return "lbfgs", f"head.fit.solver={asked}"
    if asked == "lbfgs":
        raise ConfigError(
            f"head.fit.solver=lbfgs fits a linear head on a frozen backbone's cached features, but "
            f"{'; '.join(obstacles)}. Use head.fit.solver=auto (SGD when L-BFGS cannot run)."
        )
    return "sgd", "; ".join(obstacles)


def loss_weights(splits: DataSplits, balance: str) -> torch.Tensor | None:
    """The class (or positive-label) weights of the solver's loss: ``weighted_loss`` as for SGD;
    ``sampler`` too, since a full batch draws nothing (the weighted loss is the expected loss of
    class-balanced draws)."""
    if balance == "weighted_loss" or (balance == "sampler" and not splits.multilabel):
        return class_weights(splits)
    return None


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
            "version": 1,
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


class _FullBatch(Dataset):
    """One item: every view of every training image, stacked (V*N, D), with their labels."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.rows, self.labels = view_rows(features if features.ndim == 3 else features[None], labels)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index):
        return self.rows, self.labels


class FullBatchFeatureDataModule(FeatureDataModule):
    """Cached features whose training loader yields the whole training set as one batch."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_FullBatch(self.cached.features["train"], self.cached.labels["train"]), batch_size=None)


class OptimalHeadModule(ClassifierModule):
    """A :class:`ClassifierModule` whose training step is one L-BFGS step (``iterations`` inner
    iterations, strong-Wolfe line search) on the whole cached training set, minimizing the
    loss plus ``l2 / 2 * |W|^2`` (manual optimization: L-BFGS re-evaluates its closure). Metrics,
    validation and checkpoints are the parent's; ``train/loss`` is the loss without the penalty."""

    solver_name = "lbfgs"  # no lr/* columns: L-BFGS's line search sets each step's length

    def __init__(self, *args, l2: float, iterations: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.l2 = l2
        self.iterations = iterations
        self.linear = single_linear(self.model.head)

    def configure_optimizers(self):
        return lbfgs([{"params": list(self.linear.parameters()), "name": "head"}], self.iterations)

    def training_step(self, batch, batch_idx):
        features, labels = self._unpack(batch)
        weight = self.class_weights.to(labels.device) if self.class_weights is not None else None
        optimizer = self.optimizers()
        features = features.float()
        settings = (self.task.multilabel, weight, self.label_smoothing)  # the loss's: task, class weights, smoothing

        def closure():
            optimizer.zero_grad()
            with torch.autocast(features.device.type, enabled=False):  # the optimum at full precision
                loss = penalized_loss(self(features), labels, self.linear.weight, self.l2, *settings)
            self.manual_backward(loss)
            return loss

        optimizer.step(closure=closure)
        with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
            logits = self(features)
            loss = self.task.loss(logits, labels, class_weights=weight, label_smoothing=self.label_smoothing)
            self._update("train", logits, labels, loss)


def optimal_head_parts(cached: CachedFeatures, splits: DataSplits, cfg, seed: int) -> tuple[dict, str]:
    """(the keyword arguments of :class:`OptimalHeadModule` beyond the parent's, the start line)."""
    settings = fit_settings(cfg.head)
    weights = loss_weights(splits, cfg.data.balance)
    l2, how = chosen_l2(cached, splits, settings, seed, weights, cfg.loss.label_smoothing)
    epochs = int(cfg.trainer.max_epochs) if int(cfg.trainer.max_epochs) > 0 else 10  # -1: no limit
    per_epoch = max(1, math.ceil(settings["iterations"] / epochs))
    views = cached.features["train"]
    line = (
        f"head: fitted to the optimum of its L2-regularized loss by full-batch L-BFGS ({per_epoch} iterations "
        f"an epoch, every epoch over {views.shape[0]} view{'s' if views.shape[0] > 1 else ''} x "
        f"{views.shape[1]} training images); {how}"
    )
    return {"l2": l2, "iterations": per_epoch, "class_weights": weights}, line


def probe_first(cfg, model, backbone_name: str, splits: DataSplits, train_tf, eval_tf, speed, num_workers: int) -> None:
    """The linear-probe stage of LP-FT (``head.init=probe``): `model`'s head becomes the optimal
    head of its pretrained backbone's features (cached, like a head-only run's, and shared with
    them), before the first epoch trains every layer. One pass over the images (none when the
    cache has them) and a convex solve: no epoch of backward passes through a frozen network.
    Draws nothing from the global random state, so a run that probes and one that resumes past
    the probe continue alike."""
    from finetune.compute.features import FeatureCacheSettings, cached_features
    from finetune.compute.linear_probe import Problem, fit

    linear = single_linear(model.head)
    if linear is None:
        raise ConfigError(
            "head.init=probe fits a linear head on the frozen backbone's features; this head is an MLP "
            "(head=linear, or head.init=random)."
        )
    started = time.perf_counter()
    cache = FeatureCacheSettings.from_config(
        cfg, backbone_name, num_workers, num_labels=len(splits.classes) if splits.multilabel else None
    )
    cached = cached_features(
        model.backbone, {split: getattr(splits, split) for split in SPLITS}, train_tf, eval_tf, speed, cache
    )
    settings, weights = fit_settings(cfg.head), loss_weights(splits, cfg.data.balance)
    l2, how = chosen_l2(cached, splits, settings, cfg.seed, weights, cfg.loss.label_smoothing)
    rows, targets = view_rows(cached.features["train"], cached.labels["train"])
    problem = Problem(rows, targets, len(splits.classes), splits.multilabel, weights, cfg.loss.label_smoothing)
    weight, bias = fit(
        problem, l2, (linear.weight.detach().cpu(), linear.bias.detach().cpu()), max_iter=settings["iterations"]
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
        logits = linear(cached.features["val"]) if "val" in cached.features else None
    score = ""
    if logits is not None and not splits.multilabel:
        score = f", val/acc {float((logits.argmax(dim=1) == cached.labels['val']).float().mean()):.4f}"
    log.info(
        "LP-FT: probe head fitted to the optimum on the frozen backbone's features (%s)%s, in %.1f s; "
        "every layer trains from it",
        how,
        score,
        time.perf_counter() - started,
    )


__all__ = [
    "FullBatchFeatureDataModule",
    "OptimalHeadModule",
    "fit_settings",
    "optimal_head_parts",
    "probe_first",
    "solver_for_run",
]
