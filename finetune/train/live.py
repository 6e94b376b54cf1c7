"""A run's screen in a notebook: one HTML panel updated in place (an IPython display handle, no
widget extension), in place of the plain lines a terminal or a pipe gets.

The panel folds the start tables away, shows the epochs as a table that grows row by row
(:class:`~finetune.train.progress.EpochTable` records carry their cells) and the closing block
below it. Everything still goes to the run's ``finetune.log``.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

from finetune.console import in_notebook, screen


class NotebookPanel(logging.Handler):
    """A logging handler that draws the ``finetune`` logger's records into one display."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setup: list[str] = []
        self.columns: list[str] = []
        self.rows: list[list[str]] = []
        self.after: list[str] = []
        self._handle = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if hasattr(record, "epoch_columns"):
                self.columns, self.rows = list(record.epoch_columns), []
            elif hasattr(record, "epoch_cells"):
                self.rows.append([str(c) for c in record.epoch_cells])
            else:
                (self.after if self.columns else self.setup).extend(record.getMessage().splitlines())
            self.draw()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)

    def html(self) -> str:
        from finetune.viz.notebook import epoch_panel

        return epoch_panel(self.setup, self.columns, self.rows, self.after)

    def draw(self) -> None:
        from IPython.display import HTML, display

        if self._handle is None:
            self._handle = display(HTML(self.html()), display_id=True)
        else:
            self._handle.update(HTML(self.html()))


def notebook_screen() -> AbstractContextManager:
    """In a Jupyter kernel, the run's lines go to a :class:`NotebookPanel`; elsewhere nothing
    changes (a terminal or a pipe prints what it always did)."""
    return screen(NotebookPanel()) if in_notebook() else nullcontext()
