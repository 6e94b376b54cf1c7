"""One fine-tuning run from a composed config: the flow of ENGINEERING.md section 1.

``run(cfg)`` is shared by the CLI and :func:`finetune.fit`: compose -> data -> model -> data
module -> Trainer -> fit -> outputs. It returns a :class:`FitResult`; what it prints (start table,
closing report) and writes (``summary.json``, pictures) lives in :mod:`finetune.train.report`.

One config is in flight: the caller composes `cfg` (``run`` composes nothing), the run writes
every ``auto`` it settles into it (``callbacks.checkpoint.monitor``; ``optimizer.lr`` from the lr
finder), and the plain dict that checkpoints, loggers and ``summary.json`` carry is `cfg` resolved
(:func:`plain_config`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.compute.feature_data import FeatureDataModule
from finetune.compute.features import features_for_run
from finetune.compute.speed import Speed, resolve_num_workers, resolve_speed, usable_cores
from finetune.config import check_types
from finetune.console import run_log
from finetune.data.check import DataReport, check_data
from finetune.data.datamodule import ImageDataModule, class_weights
from finetune.data.decoded import decoded_images
from finetune.data.samples import hold_out_calibration
from finetune.data.sources import SPLITS, DataSplits, load_data
from finetune.data.transforms import build_transforms, with_input_size
from finetune.model.backbone import Backbone
from finetune.model.build import backbone_from_config, build_model
from finetune.model.classifier import Classifier
from finetune.model.head import set_prior_bias
from finetune.train import report
from finetune.train.checkpoints import Resume, stored_lr
from finetune.train.compat import epochs_begun
from finetune.train.faults import explain_failure, find_batch_size
from finetune.train.history import MetricsHistory, monitored
from finetune.train.limits import decoding_ahead_pays, images_per_epoch
from finetune.train.live import notebook_screen
from finetune.train.loggers import finish_wandb, log_best
from finetune.train.lr_find import lr_for_run
from finetune.train.mixing import batch_mixer
from finetune.train.module import ClassifierModule
from finetune.train.optimal_head import (
    FullBatchFeatureDataModule,
    OptimalHeadModule,
    fit_settings,
    optimal_head_parts,
    probe_first,
    solver_for_run,
)
from finetune.train.result import FitResult
from finetune.train.run_folder import RunFolder, make_folder
from finetune.train.thresholds import label_count_bounds, tune_and_store
from finetune.train.trainer import TrainerSettings, build_trainer
from finetune.train.trust import calibrate_and_store

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import albumentations as A

__all__ = ["FitResult", "Prepared", "plain_config", "prepare", "run"]


@dataclass
class Prepared:
    """Everything a run sets up before its Trainer: data, model and the LightningModule."""

    splits: DataSplits
    data_report: DataReport
    backbone: Backbone
    module: ClassifierModule
    data: L.LightningDataModule
    eval_tf: A.Compose  # the evaluation pipeline of the pictures (normalized float tensors)
    speed: Speed
    trainer_kwargs: dict[str, Any]  # lightning.Trainer keyword arguments, resolved for this machine


def run(cfg: DictConfig, callbacks: Sequence = ()) -> FitResult:
    """Train as `cfg` says; outputs go to ``cfg.paths.output_dir``. `callbacks`: more Lightning
    callbacks for the Trainer (``finetune auto`` reports each epoch to its study). Every ``auto``
    the run settles (the monitored metric, ``optimizer.lr``) is written into `cfg` itself."""
    started = time.perf_counter()
    check_types(cfg)
    with open_dict(cfg):  # auto -> the task's metric, in the run's config and its checkpoints
        cfg.callbacks.checkpoint.monitor = monitored(cfg)
    output_dir = make_folder(Path(cfg.paths.output_dir).resolve())
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # One run per folder, no silent overwrite, resume=true / ckpt_path=... checked: before any work.
    with RunFolder(cfg, output_dir) as folder, run_log(output_dir), notebook_screen():  # a notebook: one live panel
        p = prepare(cfg, output_dir, resume_from=folder.resume_from)
        config = plain_config(cfg)  # cfg resolved: what the checkpoints, loggers and summary.json carry
        resume = Resume(
            folder.resume_from,
            output_dir,
            cfg.seed,
            config,
            p.splits.classes,
            cfg.callbacks.checkpoint.min_write_interval_s,
        )
        history = MetricsHistory()
        settings = TrainerSettings.from_config(cfg, p.trainer_kwargs, config)
        trainer, checkpoint, loggers = build_trainer(settings, p.module.model, history, resume, output_dir, callbacks)
        p.data.starting_epoch = lambda: epochs_begun(trainer)  # exact resume with DataLoader workers
        try:
            fitted = _fit(cfg, p, trainer, checkpoint, history, resume, output_dir, loggers)
        except Exception as err:
            explained = explain_failure(err, cfg.data.batch_size, output_dir)
            if explained is err:
                raise
            raise explained from err
        finally:
            finish_wandb()
        p.data_report.add_unreadable(p.module.unreadable)
        best, best_path, model, evaluation, pictures = fitted
        result = FitResult(
            metrics=best,
            best_checkpoint=best_path,
            classes=list(p.splits.classes),
            model=model,
            output_dir=output_dir,
            config=config,
            history=history.epochs,
            outputs=report.outputs(output_dir, best_path, loggers, pictures),
            data_report=p.data_report,
            evaluation=evaluation,
            data_config=with_input_size(p.backbone.data_config, cfg.data.image_size),
        )
        if trainer.is_global_zero:
            report.write_summary(result, time.perf_counter() - started)
            report.write_page(result, pictures)
            report.log_end(result)
    return result


def plain_config(cfg: DictConfig) -> dict:
    """`cfg` resolved into plain dicts and lists, without Hydra's own node."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    return config


def _fit(
    cfg: DictConfig,
    p: Prepared,
    trainer: L.Trainer,
    checkpoint: ModelCheckpoint,
    history: MetricsHistory,
    resume: Resume,
    output_dir: Path,
    loggers: list,
) -> tuple[dict[str, float], Path | None, Classifier, dict | None, list]:
    """Train, then (the best metrics, the best checkpoint, the trained model on the CPU, the
    multi-label evaluation, the pictures)."""
    module, data = p.module, p.data
    if cfg.data.find_batch_size:
        found = find_batch_size(trainer, module, data, p.speed.device, resume.path is not None)
        log.info("batch-size finder: data.batch_size=%d fits on %s", found, p.speed.device)
    trainer.fit(module, datamodule=data, ckpt_path=resume.path, weights_only=True)
    best_path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
    best, evaluation = _best_metrics(cfg, trainer, module, data, history, best_path, p.splits, p.backbone)
    if trainer.is_global_zero:
        log_best(loggers, best, plain_config(cfg))
    model = module.model.cpu().eval().to(memory_format=torch.contiguous_format)
    pictures = []
    if trainer.is_global_zero:
        temperature = best.get("temperature", 1.0)
        pictures = report.draw_pictures(
            cfg,
            model,
            p.splits,
            p.eval_tf,
            p.backbone,
            output_dir,
            loggers,
            history=history.epochs,
            evaluation=evaluation,
            temperature=temperature,
        )
    return best, best_path, model, evaluation, pictures


def prepare(cfg: DictConfig, output_dir: Path, resume_from: Path | None = None, find_lr: bool = True) -> Prepared:
    """Data (checked), model, speed settings, data module and LightningModule, with the start table
    logged. ``optimizer.lr=auto`` runs the lr finder here (unless `find_lr` is false) and writes
    the lr it found into ``cfg.optimizer.lr`` (and the module's config, which the checkpoints carry)."""
    splits = load_data(cfg.data, cfg.seed, cfg.get("task", "multiclass"))
    hold_out_calibration(splits, cfg.trust.calibration_fraction, cfg.seed)
    data_report = check_data(splits, cfg.data.batch_size)
    log.info(data_report.table())
    backbone = backbone_from_config(cfg)
    model = build_model(backbone, len(splits.classes), cfg.head, cfg.freeze)
    if splits.multilabel:
        counts = torch.tensor(list(splits.counts("train").values()), dtype=torch.float32)
        set_prior_bias(model.head, counts / len(splits.train))
    trainer_kwargs, speed = resolve_speed(OmegaConf.to_container(cfg.trainer, resolve=True), model)
    report.log_start(cfg, backbone, model, speed)
    probe = cfg.head.get("init", "random") == "probe" and resume_from is None  # a resumed run has its weights
    data, eval_tf = _datamodule(cfg, model, backbone, splits, data_report, speed, probe)
    on_features = isinstance(data, FeatureDataModule)
    mixer = batch_mixer(
        cfg.mixup, cfg.cutmix, len(splits.classes), cfg.loss.label_smoothing, on_features, splits.multilabel
    )
    report.log_techniques(cfg, mixer)
    solver, why = solver_for_run(cfg, on_features, model.head, mixer, trainer_kwargs)
    module_kwargs = dict(
        label_smoothing=cfg.loss.label_smoothing,
        class_weights=class_weights(splits) if cfg.data.balance == "weighted_loss" else None,
        inputs="features" if on_features else "images",
        channels_last=speed.channels_last,
        pixel_stats=(backbone.data_config["mean"], backbone.data_config["std"]),
        mixer=mixer,
        task=splits.task,
    )
    config = plain_config(cfg)
    if solver == "lbfgs":
        parts, line = optimal_head_parts(data.cached, splits, cfg, cfg.seed)
        log.info(line)
        module = OptimalHeadModule(
            model, splits.classes, cfg.optimizer, cfg.scheduler, config, **(module_kwargs | parts)
        )
        data = FullBatchFeatureDataModule(data.cached, splits, cfg.data.batch_size, cfg.data.balance, cfg.seed)
        trainer_kwargs["log_every_n_steps"] = 1  # one step an epoch
        return Prepared(splits, data_report, backbone, module, data, eval_tf, speed, trainer_kwargs)
    if on_features and fit_settings(cfg.head)["solver"] == "auto":
        log.info("head: trained by %s epochs (not L-BFGS: %s)", cfg.optimizer.name.upper(), why)
    module = ClassifierModule(model, splits.classes, cfg.optimizer, cfg.scheduler, config, **module_kwargs)
    if cfg.optimizer.lr == "auto":
        module.optimizer_cfg["lr"] = 1.0  # the finder sets every lr itself; the groups keep their ratios
        if find_lr:
            lr = lr_for_run(module, data, trainer_kwargs, output_dir / "viz", stored_lr(resume_from))
            cfg.optimizer.lr = module.optimizer_cfg["lr"] = lr
            module.config = plain_config(cfg)
    return Prepared(splits, data_report, backbone, module, data, eval_tf, speed, trainer_kwargs)


def _datamodule(
    cfg: DictConfig,
    model: Classifier,
    backbone: Backbone,
    splits: DataSplits,
    data_report: DataReport,
    speed: Speed,
    probe: bool = False,
) -> tuple[L.LightningDataModule, A.Compose]:
    """(the run's data module, the evaluation pipeline): the frozen backbone's cached features
    when nothing below the head trains, else images (decoded once into memory when they fit),
    as uint8 batches normalized on the training device by the module. `probe`: on images, the
    head starts as the optimal probe of the pretrained features (LP-FT's first stage)."""
    train_tf, eval_tf = build_transforms(backbone.data_config, cfg.augment, cfg.data.image_size, seed=cfg.seed)
    file_workers = resolve_num_workers(cfg.data.num_workers, speed.device, in_memory=False)
    cached = features_for_run(cfg, model, backbone.name, splits, train_tf, eval_tf, speed, file_workers)
    if cached is not None:
        data_report.add_unreadable(cached.skipped)
        data = FeatureDataModule(cached, splits, cfg.data.batch_size, cfg.data.balance, cfg.seed)
    else:
        if probe:
            probe_first(cfg, model, backbone.name, splits, train_tf, eval_tf, speed, file_workers)
        uint8_train_tf, uint8_eval_tf = build_transforms(
            backbone.data_config, cfg.augment, cfg.data.image_size, seed=cfg.seed, normalize=False
        )
        decoded = decoded_images(
            cfg.data.cache,
            splits,
            backbone.data_config,
            cfg.data.image_size,
            data_report,
            usable_cores(),  # decoding threads: all cores
            ahead_pays=decoding_ahead_pays(
                cfg.trainer, cfg.data.batch_size, {s: len(getattr(splits, s)) for s in SPLITS}
            ),
        )
        workers = resolve_num_workers(cfg.data.num_workers, speed.device, in_memory=decoded is not None)
        data = ImageDataModule(
            decoded or splits, uint8_train_tf, uint8_eval_tf, cfg.data.batch_size, workers, cfg.data.balance, cfg.seed
        )
        if speed.channels_last:
            model.to(memory_format=torch.channels_last)
    if speed.compile:
        model.compile()
    return data, eval_tf


def _best_metrics(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: ClassifierModule,
    data: L.LightningDataModule,
    history: MetricsHistory,
    best_path: Path | None,
    splits: DataSplits,
    backbone: Backbone,
) -> tuple[dict[str, float], dict | None]:
    """(the best epoch's metrics, the multi-label evaluation or None), with the best weights loaded
    into `module` and, when the data have a held-out test split, its ``test/*`` scores (computed
    once, here). Multi-label runs tune their thresholds here (:mod:`finetune.train.thresholds`),
    multi-class runs fit their temperature (:mod:`finetune.train.trust`: ``temperature``, ECE and NLL).
    With ``tta`` set, the test split (else the validation split) is scored once more with
    test-time augmentation: ``test/acc_tta`` (or ``val/acc_tta``; ``map_tta`` for multi-label),
    ``.../loss_tta`` and ``tta_views``."""
    trainer.strategy.barrier("best.ckpt written")  # DDP: rank zero writes held checkpoints as fit ends
    if best_path is not None:
        module.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"])
    best = dict(history.best(cfg.callbacks.checkpoint.monitor, cfg.callbacks.checkpoint.mode))
    if splits.test:
        best.update({k: float(v) for k, v in trainer.test(module, datamodule=data, verbose=False)[0].items()})
    evaluation = None
    if splits.multilabel and trainer.is_global_zero:
        tuned, evaluation = tune_and_store(
            module,
            data,
            best_path,
            bool(splits.test),
            cfg.multilabel.thresholds,
            *label_count_bounds(cfg.multilabel.label_count, splits),
        )
        best.update(tuned)
    elif trainer.is_global_zero:
        data_config = with_input_size(backbone.data_config, cfg.data.image_size)
        # What validation read: a capped run (limit_val_batches) is calibrated on those images only.
        val_read = images_per_epoch(len(splits.val), cfg.data.batch_size, cfg.trainer.get("limit_val_batches"))
        calibrated, _ = calibrate_and_store(
            module,
            replace(splits, val=splits.val[:val_read]),
            data_config,
            best_path,
            cfg.trust,
            cfg.data.batch_size,
            data.cached if isinstance(data, FeatureDataModule) else None,
        )
        best.update(calibrated)
    if cfg.tta != "none" and trainer.is_global_zero:
        best.update(report.score_with_tta(cfg, module.model, splits, backbone, evaluation))
    return best, evaluation
