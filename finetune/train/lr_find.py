"""The learning-rate range test (Smith 2017; fastai's ``lr_find``) through Lightning's ``Tuner.lr_find``.

Lightning's finder sets every optimizer group to the same lr and raises it exponentially for a
number of steps, recording the training loss; its suggestion is the lr of the steepest descent.
Two things are added so that it measures the run that will actually train:

- layer groups keep their ratios: each group carries ``lr_scale`` (its lr over the head's, from
  ``optimizer.layer_decay``) and :class:`KeepGroupRatios` re-applies it before every step (the
  finder's schedule recomputes each lr from its start value, so the scale never compounds);
- frozen parameters stay frozen: they are in no optimizer group, and a scheduled unfreezing keeps
  its gates (the run's :func:`~finetune.train.unfreeze.gradual_unfreezing` callback runs too).

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

from finetune.errors import ConfigError
from finetune.train.unfreeze import gradual_unfreezing

log = logging.getLogger(__name__)

STEPS, MIN_LR, MAX_LR = 100, 1e-6, 1.0


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


def find_lr(module: L.LightningModule, data: L.LightningDataModule, trainer_kwargs: dict, out_dir: Path,
            steps: int = STEPS, min_lr: float = MIN_LR, max_lr: float = MAX_LR) -> LRFinding:
    """Run the range test on `module` and `data` for `steps` optimizer steps from `min_lr` to
    `max_lr`; draw the curve to ``out_dir/lr_find.png``. `trainer_kwargs`: the run's resolved
    Trainer arguments (device, precision); the rest of the run's Trainer (loggers, checkpoints) is
    not involved."""
    if not 0 < min_lr < max_lr:
        raise ConfigError(f"lr finder: min_lr={min_lr:g} and max_lr={max_lr:g} must satisfy 0 < min_lr < max_lr.")
    if "ddp" in str(trainer_kwargs.get("strategy", "")):
        raise ConfigError("The lr finder runs in one process: find the lr with `finetune lr-find` on one device "
                          "(same overrides, without trainer=ddp), then train with optimizer.lr=THE_LR.")
    kept = {k: v for k, v in trainer_kwargs.items() if k in ("accelerator", "precision")}
    callbacks = [KeepGroupRatios()] + [c for c in [gradual_unfreezing(module.model)] if c is not None]
    with tempfile.TemporaryDirectory(prefix="finetune-lr-find-") as scratch:
        trainer = L.Trainer(**kept, devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                            default_root_dir=scratch, num_sanity_val_steps=0, limit_val_batches=0)
        finder = Tuner(trainer).lr_find(module, datamodule=data, min_lr=min_lr, max_lr=max_lr,
                                        num_training=steps, update_attr=False)
    lrs, losses = list(finder.results["lr"]), list(finder.results["loss"])
    suggestion = _suggest(finder)
    picture = _draw(finder, suggestion, Path(out_dir) / "lr_find.png")
    return LRFinding(suggestion, lrs, losses, picture)


def _suggest(finder) -> float | None:
    """Lightning's steepest-descent suggestion; None when the curve is too short or flat."""
    try:
        value = finder.suggestion()
    except Exception:  # noqa: BLE001 - Lightning raises on curves too short to differentiate
        return None
    return float(value) if value is not None and math.isfinite(value) else None


def _draw(finder, suggestion: float | None, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = finder.plot(suggest=suggestion is not None)
    if figure is None:
        return None
    axis = figure.axes[0]
    axis.set_title("lr finder: training loss while the lr grows" +
                   (f"; suggestion {suggestion:.2g}" if suggestion else "; no suggestion (the loss never fell)"))
    axis.set_xlabel("learning rate of the head (layer groups keep their ratios)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def lr_for_run(module: L.LightningModule, data: L.LightningDataModule, trainer_kwargs: dict, out_dir: Path,
               resumed_lr: float | None) -> float:
    """``optimizer.lr=auto``: the lr the run trains with. A resumed run takes the lr its checkpoint
    was started with (`resumed_lr`); a new one runs the finder first and refuses to guess when it
    has no suggestion."""
    if resumed_lr is not None:
        log.info("lr finder: optimizer.lr=%.3g, found when this run started (resumed)", resumed_lr)
        return resumed_lr
    finding = find_lr(module, data, trainer_kwargs, out_dir)
    if finding.suggestion is None:
        raise ConfigError("optimizer.lr=auto: the lr finder found no lr where the loss falls (see "
                          f"{finding.picture}); set optimizer.lr to a number.")
    log.info("lr finder: optimizer.lr=%.3g (steepest fall of the loss over %d steps; curve: %s)",
             finding.suggestion, len(finding.lrs), finding.picture)
    return finding.suggestion
