"""What a run shows while it trains: one row per epoch that stays on screen (fastai-style), and on
a terminal a live bar within the epoch that leaves no trace.

Epochs are numbered from 1 everywhere a person reads them (these rows, the closing block,
``summary.json``, ``FitResult.metrics``, the curves); Lightning's ``current_epoch`` counts from 0.
"""

from __future__ import annotations

import logging
import sys
import time

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger(__name__)

COLUMNS = ("epoch", "train/loss", "train/acc", "val/loss", "val/acc", "lr", "s")
WIDTHS = (7, 10, 9, 8, 7, 8, 5)


def _row(cells, columns=COLUMNS) -> str:
    return "  ".join(str(c).rjust(max(w, len(name))) for c, w, name in zip(cells, WIDTHS, columns))


class EpochTable(L.Callback):
    """Logs a header when training starts, then one row per finished epoch: its number (of
    ``max_epochs``), training and validation loss and accuracy, the head's learning rate and the
    epoch's seconds (validation included). The records carry the cells (``epoch_columns``,
    ``epoch_cells``) for a notebook's live table (:mod:`finetune.train.live`)."""

    def __init__(self):
        self._started = time.perf_counter()
        self.columns = COLUMNS

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The module names its four metrics (multi-label runs show train/f1_micro and val/map).
        self.columns = ("epoch", *getattr(pl_module, "epoch_columns", COLUMNS[1:5]), *COLUMNS[5:])
        log.info(
            "%s\n%s",
            _row(self.columns, self.columns),
            _row(("-" * max(w, len(c)) for w, c in zip(WIDTHS, self.columns)), self.columns),
            extra={"epoch_columns": list(self.columns)},  # a notebook's live table reads the cells
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        head_lr = next((g["lr"] for g in groups if g.get("name") == "head"), groups[0]["lr"] if groups else None)
        cells = [f"{trainer.current_epoch + 1}/{total}"]
        cells += [f"{metrics[k]:.4f}" if k in metrics else "-" for k in self.columns[1:5]]
        seconds = time.perf_counter() - self._started
        lr_cell = getattr(pl_module, "solver_name", None) or (f"{head_lr:.2g}" if head_lr is not None else "-")
        cells += [lr_cell, f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.2f}"]
        log.info(_row(cells, self.columns), extra={"epoch_cells": cells})


class EpochBar(TQDMProgressBar):
    """Lightning's bar, reduced to one live line within the training epoch: no sanity-check or
    validation bars, no ``v_num``, cleared at the end of the epoch (the :class:`EpochTable` row
    takes its place). Only on a terminal: piped output gets the rows alone."""

    def init_sanity_tqdm(self):
        bar = super().init_sanity_tqdm()
        bar.disable = True
        return bar

    def init_validation_tqdm(self):
        bar = super().init_validation_tqdm()
        bar.disable = True
        return bar

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.leave = False
        return bar

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.train_progress_bar.clear()


def live_bar_wanted() -> bool:
    """A live bar only where a person watches: stderr is a terminal."""
    return sys.stderr.isatty()
