"""What a run tells its user: the ``finetune`` logger, printed plainly, once, by rank zero.

Every module logs to ``logging.getLogger(__name__)`` (children of ``finetune``). :func:`setup`
gives that logger, on first use, a plain stdout handler that only the process of global rank zero
passes (``trainer=ddp`` prints each line once) and stops it from propagating (so Hydra's own
handlers do not print it a second time). While a run lasts, :func:`run_log` copies the same
lines to its ``finetune.log`` and sends the libraries' chatter (Lightning's device lines, Python
warnings) there instead of to the screen. Nothing here happens at import: ``import finetune``
leaves the notebook's logging and warning settings alone.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOGGER = "finetune"


def _rank() -> int:
    """Global rank as Lightning reads it (RANK, LOCAL_RANK, SLURM_PROCID), after the Trainer
    set it where Lightning is loaded."""
    lightning = sys.modules.get("lightning.pytorch.utilities.rank_zero")
    rank = getattr(getattr(lightning, "rank_zero_only", None), "rank", None)
    if rank is not None:
        return int(rank)
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


def is_rank_zero() -> bool:
    """True in the process of global rank zero (and in every single-process run)."""
    return _rank() == 0


# Loggers whose records a run keeps in finetune.log only: Lightning's ("GPU available: False"),
# Python warnings (logging.captureWarnings) and W&B's.
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "py.warnings", "wandb")


class _Stdout(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is at each line (a notebook's, pytest's capture),
    written through tqdm so that a live progress bar is cleared and redrawn around the line."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # logging.StreamHandler assigns it; the property always reads sys.stdout
        pass


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's shell is a ``ZMQInteractiveShell``): never on a
    terminal, in a pipe or in plain IPython. IPython is not imported to find out."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython else None
    return any(cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__)  # Colab's subclasses it


@contextmanager
def screen(handler: logging.Handler | None) -> Iterator[None]:
    """While the block runs, `handler` (a notebook's live panel) shows the ``finetune`` logger's
    lines instead of the plain stdout handler; None changes nothing."""
    logger = setup()
    if handler is None:
        yield
        return
    plain = [(logger.handlers.index(h), h) for h in console_handlers()]
    for _, h in plain:
        logger.removeHandler(h)
    handler.addFilter(RankZeroFilter())
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        for i, h in plain:  # back where they were: other handlers (pytest's, a user's) keep their order
            logger.handlers.insert(i, h)


class RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_rank_zero()


def console_handlers() -> list[logging.Handler]:
    """The ``finetune`` logger's plain console handlers (the one :func:`setup` adds)."""
    return [h for h in logging.getLogger(LOGGER).handlers if getattr(h, "_finetune_console", False)]


def console_quieted() -> bool:
    """True while a search has quieted the console (its trials print one line each)."""
    return any(h.level > logging.INFO for h in console_handlers())


def setup() -> logging.Logger:
    """The ``finetune`` logger, given its console handler the first time (idempotent)."""
    logger = logging.getLogger(LOGGER)
    if not console_handlers():
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RankZeroFilter())
        handler._finetune_console = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


@contextmanager
def run_log(output_dir: Path) -> Iterator[None]:
    """While the block runs, the ``finetune`` logger's lines also go to ``output_dir/finetune.log``
    (rank zero), the libraries' records and Python warnings go there only, and library messages
    nobody can act on are muted. Everything is restored afterwards."""
    logger = setup()
    handler: logging.Handler = logging.NullHandler()
    if is_rank_zero():
        handler = logging.FileHandler(Path(output_dir) / "finetune.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    libraries = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lib.handlers[:], lib.propagate) for lib in libraries]
    for lib in libraries:
        lib.handlers, lib.propagate = [handler], False
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    tip_filter = _LightningTips()
    tips.addFilter(tip_filter)
    # W&B prints its warnings (Lightning passes it a deprecated `anonymous`) before reading its settings.
    wandb_silent = os.environ.get("WANDB_SILENT")
    os.environ["WANDB_SILENT"] = "true"
    try:
        with warnings.catch_warnings():
            # Frozen BatchNorm layers are in eval mode on purpose: Classifier.train keeps them there.
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
            # Internal to Lightning and torch, nothing a user can act on.
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
            logging.captureWarnings(True)
            try:
                yield
            finally:
                logging.captureWarnings(False)
    finally:
        if wandb_silent is None:
            os.environ.pop("WANDB_SILENT", None)
        else:
            os.environ["WANDB_SILENT"] = wandb_silent
        tips.removeFilter(tip_filter)
        for lib, (handlers, propagate) in zip(libraries, saved):
            lib.handlers, lib.propagate = handlers, propagate
        logger.removeHandler(handler)
        handler.close()


class _LightningTips(logging.Filter):
    """Lightning's advertisements ("💡 Tip: ..."): nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")
