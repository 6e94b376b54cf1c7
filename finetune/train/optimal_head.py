"""A frozen backbone's linear head trained to its optimum (``head.fit.solver=lbfgs``).

On cached features the head's loss is convex (:mod:`finetune.compute.linear_probe`): the run's
epochs are full-batch L-BFGS steps over every cached view of every training image, with the L2
strength chosen by k-fold cross-validation on the training split before the first epoch. The
epoch table, checkpoints, resume (the L-BFGS history is optimizer state), calibration, thresholds
and exports are those of any run: only the training step and its data differ.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune.compute.feature_data import FeatureDataModule
from finetune.compute.features import SPLITS, CachedFeatures
from finetune.compute.linear_probe import Rows, centered_bias, lbfgs, penalized_loss, plain_bias, view_rows
from finetune.data.datamodule import class_weights
from finetune.data.sources import DataSplits
from finetune.errors import ConfigError
from finetune.train.head_strength import chosen_l2
from finetune.train.module import ClassifierModule

log = logging.getLogger(__name__)

SOLVERS = ("auto", "lbfgs", "sgd")


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
    validation and checkpoints are the parent's; ``train/loss`` is the loss without the penalty.
    L-BFGS solves for the weight and the bias of the features centered on `center` (the training
    features' mean; :mod:`finetune.compute.linear_probe`), the head's own bias following each step;
    checkpoints carry that centered bias, so a resumed run takes the same steps."""

    solver_name = "lbfgs"  # no lr/* columns: L-BFGS's line search sets each step's length
    CENTERED_BIAS = "finetune_lbfgs_centered_bias"  # the checkpoint's key

    def __init__(self, *args, l2: float, iterations: int, center: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.l2 = l2
        self.iterations = iterations
        self.linear = single_linear(self.model.head)
        self.register_buffer("center", center.detach().float().clone(), persistent=False)
        self.centered_bias: torch.Tensor | None = None  # L-BFGS's variable beside the weight
        self._restored_bias: torch.Tensor | None = None

    def configure_optimizers(self):
        with torch.no_grad():  # Lightning has restored the weights (not yet the optimizer) by now
            bias = centered_bias(self.linear.weight, self.linear.bias, self.center)
        if self._restored_bias is not None:  # bit for bit what the interrupted run held
            bias = self._restored_bias.to(bias)
        self.centered_bias = bias.detach().clone().requires_grad_(True)
        return lbfgs([{"params": [self.linear.weight, self.centered_bias], "name": "head"}], self.iterations)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.centered_bias is not None:
            checkpoint[self.CENTERED_BIAS] = self.centered_bias.detach().cpu().clone()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._restored_bias = checkpoint.get(self.CENTERED_BIAS)

    def training_step(self, batch, batch_idx):
        features, labels = self._unpack(batch)
        weight = self.class_weights.to(labels.device) if self.class_weights is not None else None
        optimizer = self.optimizers()
        features = features.float()
        settings = (self.task.multilabel, weight, self.label_smoothing)  # the loss's: task, class weights, smoothing
        head, centered = self.linear.weight, self.centered_bias

        def closure():
            optimizer.zero_grad()
            with torch.autocast(features.device.type, enabled=False):  # the optimum at full precision
                # the head, as L-BFGS sees it
                logits = F.linear(features, head, plain_bias(head, centered, self.center))
                loss = penalized_loss(logits, labels, head, self.l2, *settings)
            self.manual_backward(loss)
            return loss

        optimizer.step(closure=closure)
        with torch.no_grad():
            self.linear.bias.copy_(plain_bias(head, centered, self.center))
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
    center = Rows((views.reshape(-1, views.shape[2]),)).mean()
    return {"l2": l2, "iterations": per_epoch, "class_weights": weights, "center": center}, line


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
