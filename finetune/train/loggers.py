"""Experiment loggers: Weights & Biases (never blocking, offline by itself) and a local CSV."""

from __future__ import annotations

import csv
import logging
import netrc
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from finetune.train.compat import drop_wandb_anonymous, restart_csv_with

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_mode(requested: str = "auto", timeout: float = 2.0) -> str:
    """The W&B mode to use. ``WANDB_MODE`` in the environment wins; ``auto`` means online only
    when there are credentials and the server answers within `timeout` seconds, else offline."""
    env = os.environ.get("WANDB_MODE")
    if env:
        # Lightning's WandbLogger writes WANDB_MODE=dryrun (wandb's old name for offline) into the
        # environment of an offline run, so the next run in the process (a sweep trial) reads it.
        return "offline" if env == "dryrun" else env
    if requested not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={requested!r}; choose one of {', '.join(WANDB_MODES)}.")
    if requested != "auto":
        return requested
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if not _has_credentials(host):
        return "offline"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return "offline"
    return "online"


def _has_credentials(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def build_loggers(cfg: Mapping, output_dir: Path, config: Mapping, run_id: str | None = None,
                  keep_csv_through_epoch: int = -1) -> list[Logger]:
    """CSV logger at ``output_dir/csv`` when ``cfg.csv``; a W&B logger when ``cfg.wandb`` is set.
    `run_id`: the W&B run id; a resumed run passes its first run's id to continue that W&B run.
    `keep_csv_through_epoch`: a run resumed in its own folder passes the last epoch its checkpoint
    finished, and the rows of epochs up to it stay in ``metrics.csv``; later rows (epochs the
    resumed run redoes) are dropped. -1 starts the file afresh."""
    loggers: list[Logger] = []
    if cfg.get("csv"):
        loggers.append(_csv_logger(output_dir, keep_csv_through_epoch))
    wandb_cfg = cfg.get("wandb")
    if wandb_cfg:
        mode = wandb_mode(wandb_cfg.get("mode", "auto"))
        if mode != "disabled":
            loggers.append(_wandb_logger(wandb_cfg, mode, output_dir, config, run_id))
    return loggers


def _csv_logger(output_dir: Path, keep_through_epoch: int) -> CSVLogger:
    logger = CSVLogger(save_dir=str(output_dir), name="csv", version="")
    path = Path(logger.log_dir) / "metrics.csv"
    if keep_through_epoch < 0 or not path.is_file() or rank_zero_only.rank != 0:
        return logger
    with path.open(newline="") as f:
        kept = [{k: v for k, v in row.items() if k and v} for row in csv.DictReader(f)
                if (row.get("epoch") or "").isdigit() and int(row["epoch"]) <= keep_through_epoch]
    # Lightning's CSV writer deletes an existing metrics.csv when it starts: the kept rows (as
    # text) go back first, written at once, so a second interruption before any new row keeps them.
    restart_csv_with(logger, kept)
    return logger


def _wandb_logger(cfg: Mapping, mode: str, output_dir: Path, config: Mapping, run_id: str | None = None) -> Logger:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    log.info("W&B mode: %s", mode)
    logger = WandbLogger(
        project=cfg.get("project", "finetune"),
        entity=cfg.get("entity"),
        name=cfg.get("name"),
        tags=list(cfg.get("tags") or []),
        save_dir=str(output_dir),
        offline=mode == "offline",
        config=dict(config),
        # Same id on resume: the run continues in W&B instead of starting a second one.
        **({"id": run_id, "resume": "allow"} if run_id else {}),
        # A slow or unreachable server must never hold the run: give up on init after 30 s.
        # silent: W&B's banner, warnings and closing history go to its own log files, not the screen.
        settings=wandb.Settings(init_timeout=30, console="off", silent=True),
    )
    drop_wandb_anonymous(logger)
    return logger


def log_best(loggers: list[Logger], metrics: Mapping[str, float]) -> None:
    """The best epoch's metrics as ``best/NAME`` in the W&B run's summary (rank zero, before
    ``finish``): the value a W&B sweep optimizes (sweeps/wandb/*.yaml), where ``val/acc`` itself
    holds the last epoch's."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update({f"best/{k}": v for k, v in metrics.items()})


def finish_wandb() -> None:
    """Close the W&B run if one is open (call in ``finally``: a crashed run is still synced)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
