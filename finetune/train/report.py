"""What a run reports: its start table, its pictures, ``summary.json``, the report page
(``viz/index.html``), the closing block and the :class:`FitResult` it returns. Rank zero only: the
caller decides."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from finetune.compute.speed import Speed
from finetune.data.sources import DataSplits
from finetune.data.transforms import input_size, with_input_size
from finetune.model.backbone import Backbone
from finetune.model.classifier import Classifier
from finetune.model.summary import groups_table
from finetune.train.optim import group_lrs
from finetune.train.result import FitResult
from finetune.train.tracking import log_pictures, store_folder

log = logging.getLogger(__name__)


def log_start(cfg: DictConfig, backbone: Backbone, model: Classifier, speed: Speed) -> None:
    """The backbone and its preprocessing, the layer-group table, the speed settings. With
    ``optimizer.lr=auto`` the table's lrs are multiples of the lr the finder will choose."""
    height, width = input_size(backbone.data_config, cfg.data.image_size)
    data_config = backbone.data_config
    auto = cfg.optimizer.lr == "auto"
    optimizer = {**cfg.optimizer, "lr": 1.0} if auto else cfg.optimizer
    log.info(
        "\n".join(
            [
                f"backbone: {backbone.name}, weights: {backbone.weights}",
                f"  input {height}x{width}, {data_config['interpolation']}, mean "
                f"{tuple(round(m, 3) for m in data_config['mean'])},"
                f" std {tuple(round(s, 3) for s in data_config['std'])}, crop_pct {data_config['crop_pct']}",
                groups_table(model, group_lrs(model, optimizer)),
                *(
                    ["  optimizer.lr=auto: the lr finder runs first; lrs above are multiples of what it finds"]
                    if auto
                    else []
                ),
                speed.describe(),
            ]
        )
    )


def log_techniques(cfg: DictConfig, mixer) -> None:
    """One line per training technique that is on (nothing when none is): the augmentation policy,
    color jitter and erasing, mixing (on images or on cached features), label smoothing, EMA,
    stochastic depth, lr warm-up and test-time augmentation."""
    from finetune.train.ema import describe, ema_callback

    augment, lines = cfg.augment, []
    if augment.get("policy", "none") != "none":
        ops = f" ({augment.num_ops} ops, magnitude {augment.magnitude})" if augment.policy == "randaugment" else ""
        lines.append(f"augmentation policy: {augment.policy}{ops}")
    if augment.get("color_jitter"):
        lines.append(f"color jitter: {augment.color_jitter:g}")
    if augment.get("random_erasing"):
        lines.append(f"random erasing: p {augment.random_erasing:g}")
    if mixer is not None:
        lines.append(f"mixing: {mixer.description}")
    if cfg.loss.label_smoothing:
        lines.append(f"label smoothing: {cfg.loss.label_smoothing:g}")
    ema = ema_callback(cfg.get("ema"))
    if ema is not None:
        lines.append(describe(ema))
    if cfg.backbone.get("drop_path_rate"):
        lines.append(f"stochastic depth: drop_path_rate {cfg.backbone.drop_path_rate:g}")
    if cfg.scheduler.get("warmup_epochs"):
        n = cfg.scheduler.warmup_epochs
        lines.append(
            f"lr warm-up: {n:g} epoch{'' if n == 1 else 's'}, then {cfg.scheduler.name} "
            f"(stepped every {cfg.scheduler.get('interval', 'epoch')})"
        )
    if cfg.get("tta", "none") != "none":
        from finetune.use.tta import TTA_MODES

        lines.append(f"test-time augmentation at the end: {cfg.tta} ({TTA_MODES[cfg.tta]} views per image)")
    if lines:
        log.info("techniques:\n" + "\n".join(f"  {line}" for line in lines))


def score_with_tta(
    cfg: DictConfig, model: Classifier, splits: DataSplits, backbone: Backbone, evaluation: dict | None = None
) -> dict[str, float]:
    """The test split (else the validation split) scored with ``cfg.tta``'s views, logged with
    the number of views: ``{split}/acc_tta``, ``{split}/loss_tta``, ``tta_views`` (multi-label:
    ``{split}/map_tta`` and ``{split}/f1_micro_tta`` by the decision rule of `evaluation`)."""
    from finetune.use.tta import evaluate_with_tta

    split = "test" if splits.test else "val"
    data_config = with_input_size(backbone.data_config, cfg.data.image_size)
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    if splits.multilabel:
        from finetune.use.multilabel import evaluate_multilabel

        scored = evaluate_multilabel(
            model,
            data_config,
            getattr(splits, split),
            splits.classes,
            list(evaluation["thresholds"].values()),
            mode=cfg.tta,
            batch_size=cfg.data.batch_size,
            min_labels=evaluation["min_labels"],
            max_labels=evaluation["max_labels"],
        )
        log.info(
            "test-time augmentation (%s, %d views per image) on the %s split: %s/map %.4f",
            cfg.tta,
            scored["views"],
            split,
            split,
            scored["map"],
        )
        return {
            f"{split}/map_tta": scored["map"],
            f"{split}/f1_micro_tta": scored["f1_micro"],
            f"{split}/loss_tta": scored["loss"],
            "tta_views": float(scored["views"]),
        }
    scores = evaluate_with_tta(model, data_config, getattr(splits, split), splits.classes, cfg.tta, cfg.data.batch_size)
    log.info(
        "test-time augmentation (%s, %d views per image) on the %s split: %s/acc %.4f",
        cfg.tta,
        scores["views"],
        split,
        split,
        scores["acc"],
    )
    return {f"{split}/acc_tta": scores["acc"], f"{split}/loss_tta": scores["loss"], "tta_views": float(scores["views"])}


def draw_pictures(
    cfg: DictConfig,
    model: Classifier,
    splits: DataSplits,
    eval_tf,
    backbone: Backbone,
    output_dir: Path,
    loggers,
    *,
    history: list[dict],
    evaluation: dict | None = None,
    temperature: float = 1.0,
) -> list:
    """The run's pictures (config group viz) of `model` on the validation split, also sent to W&B
    when it is on. Multi-label runs draw theirs at the tuned thresholds of `evaluation`; multi-class
    runs' reliability diagram compares the softmax with the calibrated one at `temperature`."""
    if not cfg.viz.enabled:
        return []
    from finetune.viz.report import PictureSettings, write_pictures

    settings = PictureSettings(
        layers=tuple(cfg.viz.layers) if cfg.viz.layers is not None else None,
        channels=cfg.viz.channels,
        top_k=cfg.viz.top_k,
        max_images=cfg.viz.max_images,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        thresholds=tuple(evaluation["thresholds"].values()) if evaluation else None,
        temperature=temperature,
    )
    pictures = write_pictures(
        model,
        splits.classes,
        splits.val,
        eval_tf,
        with_input_size(backbone.data_config, cfg.data.image_size),
        output_dir / "viz",
        history=history,
        settings=settings,
        train_samples=splits.train if splits.multilabel else None,
        page={"summary_path": output_dir / "summary.json"},
    )
    log_pictures(loggers, pictures)
    return pictures


def outputs(output_dir: Path, best_path: Path | None, loggers, pictures: list) -> dict[str, Path]:
    """Name -> path of everything the run wrote, in the order the closing block lists them."""
    found = {"output_dir": output_dir}
    if best_path is not None:
        found["checkpoint"] = best_path
    for logger in loggers:
        if type(logger).__name__ == "EpochCSVLogger":
            found["metrics_csv"] = Path(logger.log_dir) / "metrics.csv"
        elif type(logger).__name__ == "WandbLogger":
            found["wandb"] = output_dir / "wandb"
        elif type(logger).__name__ == "TensorBoardLogger":
            found["tensorboard"] = Path(logger.log_dir)
        elif type(logger).__name__ == "BestCheckpointMLFlowLogger" and store_folder(logger):
            found["mlflow"] = store_folder(logger)
    found["summary"] = output_dir / "summary.json"
    hydra_config = output_dir / ".hydra" / "config.yaml"
    if hydra_config.exists():
        found["config"] = hydra_config
    if pictures:
        found["pictures"] = output_dir / "viz" / "index.md"
        found["report"] = output_dir / "viz" / "index.html"
    return found


def write_summary(result: FitResult, seconds: float) -> None:
    """``summary.json``: best-epoch metrics, history, classes, the data report, wall time."""
    summary = {
        "metrics": result.metrics,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "classes": result.classes,
        "history": result.history,
        "data": result.data_report.to_dict() if result.data_report else None,
        **({"multilabel": result.evaluation} if result.evaluation else {}),
        "seconds": round(seconds, 1),
    }
    result.outputs["summary"].write_text(json.dumps(summary, indent=2))


def write_page(result: FitResult, pictures: list) -> None:
    """``viz/index.html`` once more, now that ``summary.json`` exists: the pictures with the
    best epoch's metrics, the data report, the layer groups with their lrs and the resolved config
    (:mod:`finetune.viz.html_report`). Nothing without pictures (``viz=none``)."""
    if "report" not in result.outputs:
        return
    from finetune.viz.html_report import write_page as write_html

    summary_path = result.outputs["summary"]
    optimizer = result.config.get("optimizer") or {}
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        lrs = group_lrs(result.model, optimizer) if isinstance(optimizer.get("lr"), (int, float)) else None
        write_html(result.outputs["report"].parent, pictures, result.model, summary, result.config, lrs, summary_path)
    except Exception as err:  # a report page never fails a finished run
        log.warning("could not write %s: %s: %s", result.outputs["report"], type(err).__name__, err)


_VIEW = {
    "wandb": " (offline runs upload with: wandb sync {path}/offline-run-*)",
    "tensorboard": " (view: tensorboard --logdir {path})",
    "mlflow": " (view: mlflow ui --backend-store-uri sqlite:///{path}/mlflow.db)",
}


def log_end(result: FitResult) -> None:
    """The closing block: the best epoch, skipped files, where every output went, the headline
    (val/acc; val/map for multi-label) last."""
    m = result.metrics
    best_epoch = int(m["epoch"]) if "epoch" in m else "?"
    shown = ("val/acc", "val/loss", "val/acc_top5", "train/loss", "train/acc", "test/acc")
    if result.headline == "val/map":
        shown = (
            "val/map",
            "val/loss",
            "val/f1_micro",
            "val/f1_micro_tuned",
            "val/exact",
            "val/exact_tuned",
            "train/loss",
            "test/map",
            "test/f1_micro_tuned",
        )
    lines = [
        f"best epoch {best_epoch} of {len(result.history)}: " + ", ".join(f"{k}={m[k]:.4f}" for k in shown if k in m)
    ]
    if result.data_report and result.data_report.skipped:
        lines.append(
            f"skipped {len(result.data_report.skipped)} unreadable or non-image files (listed in summary.json)"
        )
    lines += [f"  {name}: {path}" + _VIEW.get(name, "").format(path=path) for name, path in result.outputs.items()]
    if result.headline in m:
        lines.append(f"{result.headline}={m[result.headline]:.4f}")
    log.info("\n".join(lines))
