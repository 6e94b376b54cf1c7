"""The Lightning Trainer of a run: its callbacks, loggers and plugins, from the config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig

from finetune.errors import ConfigError
from finetune.model.classifier import Classifier
from finetune.train.checkpoints import Resume
from finetune.train.distributed import check_launcher
from finetune.train.ema import ema_callback
from finetune.train.history import MetricsHistory
from finetune.train.live import live_callbacks
from finetune.train.loggers import build_loggers
from finetune.train.progress import EpochBar, EpochTable, live_bar_wanted
from finetune.train.run_folder import StopNotice
from finetune.train.unfreeze import gradual_unfreezing


@dataclass(frozen=True)
class TrainerSettings:
    """What the Trainer takes from a run's config: the ``trainer`` group's Lightning arguments
    (resolved for this machine), the ``callbacks``, ``ema`` and ``logger`` groups, and the resolved
    config the loggers record. Built by :meth:`from_config`."""

    lightning: dict[str, Any]  # lightning.Trainer keyword arguments
    monitor: str  # callbacks.checkpoint.monitor, resolved (never auto)
    mode: str
    early_stopping_patience: int | None
    progress_bar: bool
    ema: Mapping | None
    logger: Mapping
    config: dict  # the run's resolved config, as W&B records it

    @classmethod
    def from_config(cls, cfg: DictConfig, trainer_kwargs: dict[str, Any], config: dict) -> TrainerSettings:
        """`trainer_kwargs`: the ``trainer`` group resolved for this machine
        (:func:`finetune.compute.speed.resolve_speed`); `config`: `cfg` as a plain dict."""
        return cls(
            lightning=trainer_kwargs,
            monitor=cfg.callbacks.checkpoint.monitor,
            mode=cfg.callbacks.checkpoint.mode,
            early_stopping_patience=cfg.callbacks.early_stopping_patience,
            progress_bar=bool(cfg.callbacks.progress_bar),
            ema=cfg.get("ema"),
            logger=cfg.logger,
            config=config,
        )


def build_trainer(
    settings: TrainerSettings,
    model: Classifier,
    history: MetricsHistory,
    resume: Resume,
    output_dir: Path,
    extra: Sequence = (),
) -> tuple[L.Trainer, ModelCheckpoint, list]:
    """(the Trainer, the best-checkpoint callback, the loggers)."""
    monitor, mode = settings.monitor, settings.mode
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="best",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        auto_insert_metric_name=False,
        save_on_train_epoch_end=True,  # after the epoch's history row, so a resume keeps it
    )
    unfreezing = gradual_unfreezing(model)
    # best.ckpt's callback before last.ckpt's, so that last.ckpt holds this epoch's best decision;
    # AtomicCheckpointIO writes last.ckpt to disk first all the same (a best never lacks a last).
    callbacks = [history, checkpoint] + ([unfreezing] if unfreezing else []) + resume.callbacks + [StopNotice()]
    ema = ema_callback(settings.ema)
    if ema is not None:  # validation and checkpoints see the averaged weights (finetune.train.ema)
        callbacks.append(ema)
    if settings.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor, mode=mode, patience=settings.early_stopping_patience))
    callbacks += [*extra, EpochTable(), *live_callbacks()]  # a notebook: the panel's bar within the epoch
    live_bar = settings.progress_bar and live_bar_wanted()
    if live_bar:
        callbacks.append(EpochBar())
    loggers = build_loggers(
        settings.logger,
        output_dir,
        settings.config,
        run_id=resume.wandb_id,
        keep_csv_through_epoch=resume.logged_through_epoch,
        mlflow_run_id=resume.mlflow_id,
    )
    try:
        trainer = L.Trainer(
            **settings.lightning,
            default_root_dir=str(output_dir),
            callbacks=callbacks,
            logger=loggers or False,
            enable_progress_bar=live_bar,
            enable_model_summary=False,  # our groups table says more
            plugins=resume.plugins,
        )
    except TypeError as err:
        raise ConfigError(f"Invalid trainer setting: {err}. See lightning.Trainer's arguments.") from None
    check_launcher(trainer, from_cli=HydraConfig.initialized())
    return trainer, checkpoint, loggers
