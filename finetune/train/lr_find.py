"""The learning-rate range test (Smith 2017; fastai's ``lr_find``) through Lightning's ``Tuner.lr_find``.

Lightning's finder sets every optimizer group to the same lr and raises it exponentially for a
number of steps, recording the training loss; its suggestion is the lr of the steepest descent.
Two things are added so that it measures the run that will actually train:

- layer groups keep their ratios: each group carries ``lr_scale`` (its lr over the head's, from
  ``optimizer.layer_decay``) and :class:`KeepGroupRatios` re-applies it before every step (the
  finder's schedule recomputes each lr from its start value, so the scale never compounds);
- frozen parameters stay frozen: they are in no optimizer group, and a scheduled unfreezing keeps
  its gates (the run's :func:`~finetune.train.unfreeze.gradual_unfreezing` callback runs too).

and two corrections to what it reports (measured on hymenoptera, full fine-tuning: Lightning 2.6's
own suggestion was 1.4e-05, which trained to 0.49 where the grid's best lr reached 0.9):

- its smoothed loss is de-biased one step too far (``1 - beta**(step + 1)`` after ``step``
  samples), so the curve starts at about half the real loss and climbs for ~50 steps: undone here;
- it picks the steepest fall per unit of lr on an exponential grid, where a tiny wiggle among
  small lrs outweighs a real fall a decade later. The steepest fall per decade (fastai's "steep")
  was no steadier: over 3 seeds it chose 0.0052, 0.063 and 0.0091 (0.815 mean accuracy against
  0.871 for the grid's best lr). Here the suggestion is a tenth of the lr of the lowest loss.

The suggestion is the head's lr, i.e. ``optimizer.lr``. The finder restores the weights it started
from when it ends, so a run can search and then train from the same start (``optimizer.lr=auto``).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.tuner import Tuner
from torchmetrics import Metric

from finetune.errors import ConfigError
from finetune.train.unfreeze import gradual_unfreezing

log = logging.getLogger(__name__)

STEPS, MIN_LR, MAX_LR = 100, 1e-6, 1.0
BETA = 0.98  # the loss smoothing of Lightning's finder (_LRCallback's default)
SKIP_BEGIN, SKIP_END = 10, 1  # as Lightning's suggestion(): the first points are mostly smoothing


class KeepGroupRatios(L.Callback):
    """Multiplies every optimizer group's lr by its ``lr_scale`` before each step."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= group.get("lr_scale", 1.0)


@dataclass
class LRFinding:
    """The finder's curve (lrs, losses), its suggestion (None when the loss never fell) and the picture."""

    suggestion: float | None
    lrs: list[float]
    losses: list[float]
    picture: Path | None


def find_lr(
    module: L.LightningModule,
    data: L.LightningDataModule,
    trainer_kwargs: dict,
    out_dir: Path,
    steps: int = STEPS,
    min_lr: float = MIN_LR,
    max_lr: float = MAX_LR,
) -> LRFinding:
    """Run the range test on `module` and `data` for `steps` optimizer steps from `min_lr` to
    `max_lr`; draw the curve to ``out_dir/lr_find.png``. `trainer_kwargs`: the run's resolved
    Trainer arguments (device, precision); the rest of the run's Trainer (loggers, checkpoints) is
    not involved."""
    if not 0 < min_lr < max_lr:
        raise ConfigError(f"lr finder: min_lr={min_lr:g} and max_lr={max_lr:g} must satisfy 0 < min_lr < max_lr.")
    if "ddp" in str(trainer_kwargs.get("strategy", "")):
        raise ConfigError(
            "The lr finder runs in one process: find the lr with `finetune lr-find` on one device "
            "(same overrides, without trainer=ddp), then train with optimizer.lr=THE_LR."
        )
    kept = {k: v for k, v in trainer_kwargs.items() if k in ("accelerator", "precision")}
    callbacks = [KeepGroupRatios()] + [c for c in [gradual_unfreezing(module.model)] if c is not None]
    with tempfile.TemporaryDirectory(prefix="finetune-lr-find-") as scratch:
        trainer = L.Trainer(
            **kept,
            devices=1,
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=scratch,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        finder = Tuner(trainer).lr_find(
            module, datamodule=data, min_lr=min_lr, max_lr=max_lr, num_training=steps, update_attr=False
        )
    # The finder restores the weights, not torchmetrics' accumulators: the run's first epoch
    # must not count the finder's batches.
    for metric in module.modules():
        if isinstance(metric, Metric):
            metric.reset()
    lrs = [float(lr) for lr in finder.results["lr"]]
    losses = [
        loss * (1 - BETA ** (step + 2)) / (1 - BETA ** (step + 1))  # step + 1 samples were averaged
        for step, loss in enumerate(finder.results["loss"])
    ]
    finder.results["loss"] = losses  # what the picture shows
    suggestion = suggest_lr(lrs, losses)
    index = min(range(len(lrs)), key=lambda i: abs(math.log10(lrs[i] / suggestion))) if suggestion else None
    picture = _draw(finder, index, suggestion, Path(out_dir) / "lr_find.png")
    return LRFinding(suggestion, lrs, losses, picture)


def suggest_lr(lrs: list[float], losses: list[float]) -> float | None:
    """A tenth of the lr where the smoothed loss is lowest (fastai v1's rule), among the points
    from SKIP_BEGIN on (before the last SKIP_END): the lowest point is where steps start to
    overshoot, and a decade below it the loss still falls steadily. None when fewer than 3 finite
    points remain or the loss never falls below where it started."""
    kept = [i for i in range(SKIP_BEGIN, len(lrs) - SKIP_END) if lrs[i] > 0 and math.isfinite(losses[i])]
    if len(kept) < 3:
        return None
    lowest = min(kept, key=lambda i: losses[i])
    if lowest == kept[0]:
        return None
    return lrs[lowest] / 10


def _draw(finder, index: int | None, suggestion: float | None, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = finder.plot(suggest=False)
    if figure is None:
        return None
    axis = figure.axes[0]
    if index is not None:
        axis.plot(finder.results["lr"][index], finder.results["loss"][index], "o", color="red", markersize=10)
    axis.set_title(
        "lr finder: training loss while the lr grows"
        + (f"; suggestion {suggestion:.2g}" if suggestion else "; no suggestion (the loss never fell)")
    )
    axis.set_xlabel("learning rate of the head (layer groups keep their ratios)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def lr_for_run(
    module: L.LightningModule,
    data: L.LightningDataModule,
    trainer_kwargs: dict,
    out_dir: Path,
    resumed_lr: float | None,
) -> float:
    """``optimizer.lr=auto``: the lr the run trains with. A resumed run takes the lr its checkpoint
    was started with (`resumed_lr`); a new one runs the finder first and refuses to guess when it
    has no suggestion."""
    if resumed_lr is not None:
        log.info("lr finder: optimizer.lr=%.3g, found when this run started (resumed)", resumed_lr)
        return resumed_lr
    finding = find_lr(module, data, trainer_kwargs, out_dir)
    if finding.suggestion is None:
        raise ConfigError(
            "optimizer.lr=auto: the lr finder found no lr where the loss falls (see "
            f"{finding.picture}); set optimizer.lr to a number."
        )
    log.info(
        "lr finder: optimizer.lr=%.3g (a tenth of the lr of the lowest loss over %d steps; curve: %s)",
        finding.suggestion,
        len(finding.lrs),
        finding.picture,
    )
    return finding.suggestion
