"""One fine-tuning run from a composed config: the flow of ENGINEERING.md section 1.

``run(cfg)`` is shared by the CLI and :func:`finetune.fit`; it returns a :class:`FitResult`
and prints a start table (data, weights, layer groups) and a closing report.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf
from torch import nn

from finetune.backbone import Backbone, build_backbone
from finetune.checkpoints import Resume, resume_source
from finetune.config import check_types
from finetune.data.check import DataReport, check_data
from finetune.data.datamodule import ImageDataModule, class_weights
from finetune.data.decoded import decode_splits, estimated_bytes, stored_short_side
from finetune.data.sources import DataSplits, load_digits, load_folder, load_manifest
from finetune.data.transforms import augmentation_is_random, build_transforms, input_size, with_input_size
from finetune.distributed import check_launcher, is_rank_zero
from finetune.errors import ConfigError
from finetune.faults import explain_failure, find_batch_size
from finetune.features import (CachedFeatures, FeatureDataModule, cache_settings, cached_features,
                               not_cacheable_reason)
from finetune.freeze import apply_freeze
from finetune.head import build_head
from finetune.history import MetricsHistory
from finetune.loggers import build_loggers, finish_wandb, log_best
from finetune.model import Classifier
from finetune.module import ClassifierModule
from finetune.optim import group_lrs
from finetune.speed import Speed, resolve_num_workers, resolve_speed, usable_cores
from finetune.summary import groups_table
from finetune.unfreeze import gradual_unfreezing

log = logging.getLogger(__name__)

# Frozen BatchNorm layers are in eval mode on purpose: Classifier.train keeps them there.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
# Internal to Lightning and torch, nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip")  # Lightning's advertisements
)


@dataclass
class FitResult:
    """What a run leaves behind. ``metrics`` are the best epoch's (by ``val/acc``)."""

    metrics: dict[str, float]
    best_checkpoint: Path | None
    classes: list[str]
    model: nn.Module
    output_dir: Path
    config: dict
    history: list[dict[str, float]] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)
    data_report: DataReport | None = None  # counts per split, skipped files and why, duplicates

    def __repr__(self) -> str:
        acc = self.metrics.get("val/acc")
        shown = f"{acc:.4f}" if acc is not None else "n/a"
        return f"FitResult(val/acc={shown}, classes={len(self.classes)}, output_dir={str(self.output_dir)!r})"


def load_data(cfg: DictConfig, seed: int) -> DataSplits:
    if cfg.name == "digits":
        return load_digits(cfg.val_fraction, seed)
    if cfg.name == "folder":
        return load_folder(cfg.root, cfg.train_dir, cfg.val_dir, cfg.val_fraction, seed, cfg.get("test_dir"))
    if cfg.name == "csv":
        return load_manifest(cfg.csv, cfg.root, cfg.path_column, cfg.label_column, cfg.split_column,
                             cfg.path_template, cfg.val_fraction, seed)
    raise ConfigError(f"data.name={cfg.name!r}; choose data=digits, data=folder or data=csv.")


def backbone_from_config(cfg: DictConfig, weights: str | None = None) -> Backbone:
    """The run's backbone; `weights` overrides ``cfg.backbone.weights`` (``random`` to inspect)."""
    return build_backbone(cfg.backbone.name, weights or cfg.backbone.weights, cfg.backbone.drop_rate,
                          cfg.head.get("pool"))


def build_model(backbone: Backbone, num_classes: int, head_cfg: DictConfig, freeze_cfg: DictConfig) -> Classifier:
    head = build_head(backbone.num_features, num_classes, head_cfg.hidden, head_cfg.dropout, head_cfg.get("norm"))
    model = Classifier(backbone.model, head, backbone.groups)
    apply_freeze(
        model,
        groups=freeze_cfg.groups if isinstance(freeze_cfg.groups, str) else list(freeze_cfg.groups),
        until=freeze_cfg.until,
        patterns=list(freeze_cfg.patterns),
        batchnorm=freeze_cfg.batchnorm,
    )
    return model


def run(cfg: DictConfig) -> FitResult:
    """Train as `cfg` says; outputs go to ``cfg.paths.output_dir``."""
    started = time.perf_counter()
    check_types(cfg)
    output_dir = Path(cfg.paths.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    resume_from = resume_source(cfg, output_dir)  # resume=true / ckpt_path=...: fail before any work

    splits = load_data(cfg.data, cfg.seed)
    report = check_data(splits)
    if is_rank_zero():  # trainer=ddp: one process speaks and writes
        print(report.table(), flush=True)
    backbone = backbone_from_config(cfg)
    train_tf, eval_tf = build_transforms(backbone.data_config, cfg.augment, cfg.data.image_size, seed=cfg.seed)
    balance = cfg.data.get("balance", "none")
    model = build_model(backbone, len(splits.classes), cfg.head, cfg.freeze)
    weights = class_weights(splits) if balance == "weighted_loss" else None
    unfreezing = gradual_unfreezing(model, cfg.freeze.get("unfreeze_every"), cfg.freeze.get("unfreeze_at"))
    trainer_kwargs, speed = resolve_speed(OmegaConf.to_container(cfg.trainer, resolve=True), model)
    if is_rank_zero():
        _print_start(cfg, backbone, model, unfreezing.schedule if unfreezing else None, speed)
    file_workers = resolve_num_workers(cfg.data.num_workers, speed.device, in_memory=False)
    cached = _cached_features(cfg, model, backbone, splits, train_tf, eval_tf, speed, file_workers)
    if cached is not None:
        data = FeatureDataModule(cached, splits, cfg.data.batch_size, balance, cfg.seed)
        report.add_unreadable(cached.skipped)
    else:
        # uint8 batches through the DataLoader, normalized on the training device by the module
        uint8_train_tf, uint8_eval_tf = build_transforms(backbone.data_config, cfg.augment, cfg.data.image_size,
                                                         seed=cfg.seed, normalize=False)
        decoded = _decoded_images(cfg, splits, backbone, report)
        workers = resolve_num_workers(cfg.data.num_workers, speed.device, in_memory=decoded is not None)
        data = ImageDataModule(decoded or splits, uint8_train_tf, uint8_eval_tf, cfg.data.batch_size, workers,
                               balance, cfg.seed)
        if speed.channels_last:
            model.to(memory_format=torch.channels_last)
    if speed.compile:
        model.compile()
    module = ClassifierModule(model, splits.classes, cfg.optimizer, cfg.scheduler, config, class_weights=weights,
                              inputs="images" if cached is None else "features", channels_last=speed.channels_last,
                              pixel_stats=(backbone.data_config["mean"], backbone.data_config["std"]))
    resume = Resume(resume_from, output_dir, cfg.seed, config, splits.classes,
                    cfg.callbacks.checkpoint.get("min_write_interval_s", 0))

    history = MetricsHistory()
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="best",
        monitor=cfg.callbacks.checkpoint.monitor,
        mode=cfg.callbacks.checkpoint.mode,
        save_top_k=1,
        auto_insert_metric_name=False,
        save_on_train_epoch_end=True,  # after the epoch's history row, so a resume keeps it
    )
    callbacks = [history, checkpoint] + ([unfreezing] if unfreezing else []) + resume.callbacks
    if cfg.callbacks.early_stopping_patience:
        callbacks.append(EarlyStopping(cfg.callbacks.checkpoint.monitor, mode=cfg.callbacks.checkpoint.mode,
                                       patience=cfg.callbacks.early_stopping_patience))
    if cfg.callbacks.progress_bar:
        callbacks.append(TQDMProgressBar())
    loggers = build_loggers(cfg.logger, output_dir, config, run_id=resume.wandb_id,
                            keep_csv_through_epoch=resume.logged_through_epoch)
    try:
        trainer = L.Trainer(
            **trainer_kwargs,
            default_root_dir=str(output_dir),
            callbacks=callbacks,
            logger=loggers or False,
            enable_progress_bar=bool(cfg.callbacks.progress_bar),
            enable_model_summary=False,  # our groups table says more
            plugins=resume.plugins,
        )
    except TypeError as err:
        raise ConfigError(f"Invalid trainer setting: {err}. See lightning.Trainer's arguments.") from None
    check_launcher(trainer, from_cli=HydraConfig.initialized())
    try:
        if cfg.data.get("find_batch_size"):
            found = find_batch_size(trainer, module, data, speed.device, resume.path is not None)
            print(f"batch-size finder: data.batch_size={found} fits on {speed.device}", flush=True)
        trainer.fit(module, datamodule=data, ckpt_path=resume.path, weights_only=True)
        best_path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
        if best_path is not None:
            state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
        best = dict(history.best(cfg.callbacks.checkpoint.monitor, cfg.callbacks.checkpoint.mode))
        if splits.test:  # the held-out test split, scored once with the best weights
            best.update({k: float(v) for k, v in trainer.test(module, datamodule=data, verbose=False)[0].items()})
        if trainer.is_global_zero:
            log_best(loggers, best)
        model = module.model.cpu().eval().to(memory_format=torch.contiguous_format)
        pictures = _pictures(cfg, model, splits, eval_tf, backbone, history.epochs, output_dir, loggers) \
            if trainer.is_global_zero else []
    except Exception as err:
        explained = explain_failure(err, cfg.data.batch_size, output_dir)
        if explained is err:
            raise
        raise explained from err
    finally:
        finish_wandb()

    report.add_unreadable(module.unreadable)
    outputs = _outputs(output_dir, best_path, loggers)
    if pictures:
        outputs["pictures"] = output_dir / "viz" / "index.md"
    result = FitResult(best, best_path, list(splits.classes), model, output_dir, config, history.epochs, outputs, report)
    if trainer.is_global_zero:
        _write_summary(result, time.perf_counter() - started)
        _print_end(result, len(history.epochs))
    return result


def _cached_features(cfg, model, backbone, splits, train_tf, eval_tf, speed, workers: int) -> CachedFeatures | None:
    """The frozen backbone's features for every image (data.cache), or None to train on images."""
    cache = cfg.data.get("cache") or {}
    setting = cache.get("features", "auto")
    if setting not in ("auto", True, False):
        raise ConfigError(f"data.cache.features={setting!r}; use auto, true or false.")
    if setting is False:
        return None
    reason = not_cacheable_reason(model)
    if reason is not None:
        if setting is True:
            raise ConfigError(f"data.cache.features=true needs a frozen backbone, but {reason}. "
                              f"Use +recipe=freeze_all_but_head, or data.cache.features=auto.")
        print(f"feature cache: off ({reason})", flush=True)
        return None
    augmented = augmentation_is_random(cfg.augment)
    architecture, cache_dir = cache_settings(cfg, backbone.name)
    cached = cached_features(model.backbone, architecture, {"train": splits.train, "val": splits.val, "test": splits.test},
                             train_tf, eval_tf, augmented, cache.get("views", 1), cache_dir, cfg.data.batch_size,
                             workers, speed, cfg.seed)
    how = "loaded" if cached.hit else "computed"
    views = f"{cached.views} augmented views per training image" if augmented else "no augmentation: one view"
    print(f"feature cache: on, backbone frozen; {views}; {how} in {cached.seconds:.1f} s: {cached.path}", flush=True)
    return cached


def _decoded_images(cfg, splits: DataSplits, backbone: Backbone, report: DataReport) -> DataSplits | None:
    """`splits` decoded once into memory (data.cache.decoded), or None to decode at every epoch."""
    cache = cfg.data.get("cache") or {}
    setting = cache.get("decoded", False)
    if setting not in ("auto", True, False):
        raise ConfigError(f"data.cache.decoded={setting!r}; use auto, true or false.")
    files = any(isinstance(item, str) for split in (splits.train, splits.val, splits.test) for item, _ in split)
    if setting is False or not files:
        return None
    height, width = input_size(backbone.data_config, cfg.data.image_size)
    short_side = stored_short_side(height, width, backbone.data_config.get("crop_pct"))
    needed, budget = estimated_bytes(splits, short_side), float(cache.get("memory_gb", 4)) * 2**30
    if needed > budget:
        message = f"needs {needed / 2**30:.1f} GB, more than data.cache.memory_gb={cache.get('memory_gb', 4)}"
        if setting is True:
            raise ConfigError(f"data.cache.decoded=true {message}: raise the budget or use data.cache.decoded=auto.")
        print(f"decoded-image cache: off ({message})", flush=True)
        return None
    started, failures = time.perf_counter(), {}
    decoded = decode_splits(splits, short_side, usable_cores(), failures)  # threads: all cores
    report.add_unreadable(failures)
    print(f"decoded-image cache: on, {needed / 2**20:.0f} MB of uint8 images (short side <= {short_side} px), "
          f"decoded in {time.perf_counter() - started:.1f} s", flush=True)
    return decoded


def _pictures(cfg, model, splits, eval_tf, backbone, history, output_dir, loggers) -> list:
    """The run's pictures (config group viz), also sent to W&B when it is on."""
    if not cfg.viz.enabled:
        return []
    from finetune.viz.report import write_pictures

    data_config = with_input_size(backbone.data_config, cfg.data.image_size)
    pictures = write_pictures(model, splits.classes, splits.val, eval_tf, data_config, output_dir / "viz", history,
                              cfg.viz.layers, cfg.viz.channels, cfg.viz.top_k, cfg.viz.max_images,
                              cfg.data.batch_size, cfg.seed)
    for logger in loggers:
        if hasattr(logger, "log_image"):  # WandbLogger
            for picture in pictures:
                logger.log_image(key=f"viz/{picture.name}", images=[str(picture.path)], caption=[picture.caption])
    return pictures


def _print_start(cfg: DictConfig, backbone: Backbone, model: Classifier, schedule: dict[str, int] | None,
                 speed: Speed) -> None:
    height, width = input_size(backbone.data_config, cfg.data.image_size)
    data_config = backbone.data_config
    print("\n".join([
        f"backbone: {backbone.name}, weights: {backbone.weights}",
        f"  input {height}x{width}, {data_config['interpolation']}, mean {tuple(round(m, 3) for m in data_config['mean'])},"
        f" std {tuple(round(s, 3) for s in data_config['std'])}, crop_pct {data_config['crop_pct']}",
        groups_table(model, group_lrs(model, cfg.optimizer), schedule),
        speed.describe(),
    ]), flush=True)


def _outputs(output_dir: Path, best_path: Path | None, loggers) -> dict[str, Path]:
    outputs = {"output_dir": output_dir}
    if best_path is not None:
        outputs["checkpoint"] = best_path
    for logger in loggers:
        if type(logger).__name__ == "CSVLogger":
            outputs["metrics_csv"] = Path(logger.log_dir) / "metrics.csv"
        elif type(logger).__name__ == "WandbLogger":
            outputs["wandb"] = output_dir / "wandb"
    outputs["summary"] = output_dir / "summary.json"
    hydra_config = output_dir / ".hydra" / "config.yaml"
    if hydra_config.exists():
        outputs["config"] = hydra_config
    return outputs


def _write_summary(result: FitResult, seconds: float) -> None:
    summary = {
        "metrics": result.metrics,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "classes": result.classes,
        "history": result.history,
        "data": result.data_report.to_dict() if result.data_report else None,
        "seconds": round(seconds, 1),
    }
    result.outputs["summary"].write_text(json.dumps(summary, indent=2))


def _print_end(result: FitResult, epochs: int) -> None:
    m = result.metrics
    best_epoch = int(m["epoch"]) + 1 if "epoch" in m else "?"
    lines = ["", f"best epoch {best_epoch} of {epochs}: " + ", ".join(
        f"{k}={m[k]:.4f}" for k in ("train/loss", "train/acc", "val/loss", "val/acc_top5", "test/acc") if k in m)]
    if result.data_report and result.data_report.skipped:
        lines.append(f"skipped {len(result.data_report.skipped)} unreadable or non-image files (listed in summary.json)")
    lines += [f"  {name}: {path}" for name, path in result.outputs.items()]
    if "wandb" in result.outputs:
        lines.append("  (an offline W&B run uploads with: wandb sync " + str(result.outputs["wandb"]) + "/offline-run-*)")
    if "val/acc" in m:
        lines.append(f"val/acc={m['val/acc']:.4f}")
    print("\n".join(lines), flush=True)
