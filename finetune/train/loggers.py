"""Experiment loggers: Weights & Biases (never blocking, offline by itself), a local CSV, and
MLflow and TensorBoard (:mod:`finetune.train.tracking`)."""

from __future__ import annotations

import csv
import io
import logging
import netrc
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from finetune.train.compat import drop_wandb_anonymous
from finetune.train.tracking import group_trial, log_best_metrics, mlflow_logger, sweep_trial, tensorboard_logger

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


def build_loggers(
    cfg: Mapping,
    output_dir: Path,
    config: Mapping,
    run_id: str | None = None,
    keep_csv_through_epoch: int = 0,
    *,
    mlflow_run_id: str | None = None,
) -> list[Logger]:
    """CSV logger at ``output_dir/csv`` when ``cfg.csv``; a W&B logger when ``cfg.wandb`` is set;
    TensorBoard when ``cfg.tensorboard``; MLflow when ``cfg.mlflow`` is set and its store answers.
    `run_id`: the W&B run id; a resumed run passes its first run's id to continue that W&B run,
    and `mlflow_run_id` to continue its MLflow run.
    `keep_csv_through_epoch`: a run resumed in its own folder passes the number of epochs its
    checkpoint finished, and their rows stay in ``metrics.csv``; later rows (epochs the resumed
    run redoes) are dropped. 0 starts the file afresh."""
    loggers: list[Logger] = []
    if cfg.get("csv"):
        loggers.append(_csv_logger(output_dir, keep_csv_through_epoch))
    wandb_cfg = cfg.get("wandb")
    if wandb_cfg:
        mode = wandb_mode(wandb_cfg.get("mode", "auto"))
        if mode != "disabled":
            loggers.append(_wandb_logger(wandb_cfg, mode, output_dir, config, run_id))
    if cfg.get("tensorboard"):
        loggers.append(tensorboard_logger(output_dir, config))
    mlflow_cfg = cfg.get("mlflow")
    if mlflow_cfg:
        group = mlflow_cfg.get("group")
        trial = group_trial(group, output_dir) if group else sweep_trial()
        found = mlflow_logger(mlflow_cfg, output_dir, config, trial, run_id=mlflow_run_id)
        loggers += [found] if found else []
    return loggers


def _csv_logger(output_dir: Path, keep_through_epoch: int) -> Logger:
    return EpochCSVLogger(Path(output_dir) / "csv", keep_through_epoch)


class EpochCSVLogger(Logger):
    """``csv/metrics.csv`` with one row per epoch (numbered from 1, as the console and
    ``summary.json`` number them) holding everything logged in it: training and validation
    metrics, learning rates, the test scores in the last row.

    Lightning's CSVLogger writes a row per logging call, so each epoch took two rows (training's
    and validation's) under its 0-based epoch; no library writes one row per epoch. The whole
    file is small and is rewritten atomically after every call, so a kill leaves a whole file.
    `keep_through_epoch`: a run resumed in its own folder keeps the rows of epochs 1..that from
    the file (0: start afresh); the epochs it redoes are written again.
    """

    def __init__(self, log_dir: Path, keep_through_epoch: int = 0):
        super().__init__()
        self._log_dir = Path(log_dir)
        self.path = self._log_dir / "metrics.csv"
        self.rows: dict[int, dict] = {}
        if keep_through_epoch > 0 and self.path.is_file() and rank_zero_only.rank == 0:
            with self.path.open(newline="") as f:
                for row in csv.DictReader(f):
                    epoch = row.get("epoch") or ""
                    if epoch.isdigit() and 1 <= int(epoch) <= keep_through_epoch:
                        self.rows[int(epoch)] = {k: v for k, v in row.items() if k and v}
        # Written now: the kept rows survive a second interruption, a stale file is replaced at once.
        self.save()

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def log_dir(self) -> str:
        return str(self._log_dir)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the whole config is in .hydra/config.yaml, the checkpoints and summary.json

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        # finetune's module logs a 1-based "epoch" with every call; Lightning adds its 0-based one otherwise.
        epoch = int(metrics.get("epoch", 0))
        row = self.rows.setdefault(epoch, {"epoch": epoch})
        row.update({k: v for k, v in metrics.items() if k != "epoch"}, step=step)

    @rank_zero_only
    def save(self) -> None:
        columns = ["epoch", "step"] + sorted({k for row in self.rows.values() for k in row} - {"epoch", "step"})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows[e] for e in sorted(self.rows))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".csv.tmp")
        tmp.write_text(text.getvalue())
        os.replace(tmp, self.path)


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


def log_best(loggers: list[Logger], metrics: Mapping[str, float], config: Mapping | None = None) -> None:
    """The best epoch's metrics as ``best/NAME`` in the W&B run's summary (rank zero, before
    ``finish``): the value a W&B sweep optimizes (sweeps/wandb/*.yaml), where ``val/acc`` itself
    holds the last epoch's. MLflow and TensorBoard get them too (TensorBoard with `config`)."""
    log_best_metrics(loggers, config or {}, metrics)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update({f"best/{k}": v for k, v in metrics.items()})


def finish_wandb() -> None:
    """Close the W&B run if one is open (call in ``finally``: a crashed run is still synced)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def log_table(cfg: Mapping, output_dir: Path, name: str, columns: list[str], rows: list[list]) -> Path | None:
    """A W&B run of its own (job type ``name``) holding one table, when the ``logger`` config `cfg`
    has W&B on: ``finetune auto``'s leaderboard beside its trials' runs. Returns the run's folder."""
    wandb_cfg = cfg.get("wandb") if cfg else None
    if not wandb_cfg:
        return None
    mode = wandb_mode(wandb_cfg.get("mode", "auto"))
    if mode == "disabled":
        return None
    import wandb

    run = wandb.init(
        project=wandb_cfg.get("project", "finetune"),
        entity=wandb_cfg.get("entity"),
        job_type=name,
        name=name,
        tags=list(wandb_cfg.get("tags") or []),
        dir=str(output_dir),
        mode=mode,
        settings=wandb.Settings(init_timeout=30, console="off", silent=True),
    )
    try:
        run.log({name: wandb.Table(columns=columns, data=rows)})
        return Path(run.dir).parent
    finally:
        run.finish()
