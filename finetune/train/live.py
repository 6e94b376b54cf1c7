"""A run's screen in a notebook: one HTML panel updated in place (an IPython display handle, no
widget extension), in place of the plain lines a terminal or a pipe gets.

The panel folds the start tables away, shows the epochs as a table that grows row by row
(:class:`~finetune.train.progress.EpochTable` records carry their cells) and the closing block
below it. Everything still goes to the run's ``finetune.log``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L

from finetune.console import console_quieted, in_notebook, screen

_SHOWN: list[NotebookPanel] = []  # the panel of the run in flight, if it runs in a notebook


class NotebookPanel(logging.Handler):
    """A logging handler that draws the ``finetune`` logger's records into one display."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setup: list[str] = []
        self.columns: list[str] = []
        self.rows: list[list[str]] = []
        self.after: list[str] = []
        self.progress: tuple[str, int, int] | None = None  # (what, done, of) within the epoch
        self.text: list[str] = []
        self._handle = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.text.append(record.getMessage())
            if hasattr(record, "epoch_columns"):
                self.columns, self.rows = list(record.epoch_columns), []
            elif hasattr(record, "epoch_cells"):
                self.rows.append([str(c) for c in record.epoch_cells])
                self.progress = None  # the epoch's row takes the place of its bar
            else:
                (self.after if self.columns else self.setup).extend(record.getMessage().splitlines())
            self.draw()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)

    def html(self) -> str:
        from finetune.viz.notebook import epoch_panel

        return epoch_panel(self.setup, self.columns, self.rows, self.after, self.progress)

    def draw(self) -> None:
        from IPython.display import display

        # text/plain: the lines a terminal would show, for front ends that render no HTML
        bundle = {"text/html": self.html(), "text/plain": "\n".join(self.text)}
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)


@contextmanager
def notebook_screen() -> Iterator[None]:
    """In a Jupyter kernel, the run's lines go to a :class:`NotebookPanel`; elsewhere nothing
    changes (a terminal or a pipe prints what it always did), and a console quieted by a search
    (its trials print one line each) stays quiet."""
    if not in_notebook() or console_quieted():
        yield
        return
    panel = NotebookPanel()
    _SHOWN.append(panel)
    try:
        with screen(panel):
            yield
    finally:
        _SHOWN.remove(panel)
        if panel.progress is not None:
            panel.progress = None
            panel.draw()


class EpochProgress(L.Callback):
    """The panel's bar within the epoch (training batches done of the epoch's), redrawn at most
    twice a second; the epoch's row replaces it."""

    def __init__(self, panel: NotebookPanel, every_s: float = 0.5):
        self.panel, self.every_s, self._drawn = panel, every_s, 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if time.monotonic() - self._drawn < self.every_s:
            return
        total = trainer.num_training_batches if isinstance(trainer.num_training_batches, int) else 0
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        self.panel.progress = (f"epoch {trainer.current_epoch + 1}/{epochs}", batch_idx + 1, total)
        self.panel.draw()
        self._drawn = time.monotonic()


def live_callbacks() -> list[L.Callback]:
    """The callbacks of the notebook panel of the run in flight (none outside a notebook)."""
    return [EpochProgress(_SHOWN[-1])] if _SHOWN else []
