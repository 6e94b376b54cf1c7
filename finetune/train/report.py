"""What a run reports: its start table, its pictures, ``summary.json``, the closing block and the
:class:`FitResult` it returns. Rank zero only: the caller decides."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from finetune.compute.speed import Speed
from finetune.data.check import DataReport
from finetune.data.sources import DataSplits
from finetune.data.transforms import input_size, with_input_size
from finetune.model.backbone import Backbone
from finetune.model.classifier import Classifier
from finetune.model.summary import groups_table
from finetune.train.optim import group_lrs

log = logging.getLogger(__name__)


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


def log_start(cfg: DictConfig, backbone: Backbone, model: Classifier, speed: Speed) -> None:
    """The backbone and its preprocessing, the layer-group table, the speed settings."""
    height, width = input_size(backbone.data_config, cfg.data.image_size)
    data_config = backbone.data_config
    log.info("\n".join([
        f"backbone: {backbone.name}, weights: {backbone.weights}",
        f"  input {height}x{width}, {data_config['interpolation']}, mean {tuple(round(m, 3) for m in data_config['mean'])},"
        f" std {tuple(round(s, 3) for s in data_config['std'])}, crop_pct {data_config['crop_pct']}",
        groups_table(model, group_lrs(model, cfg.optimizer)),
        speed.describe(),
    ]))


def draw_pictures(cfg: DictConfig, model: Classifier, splits: DataSplits, eval_tf, backbone: Backbone,
                  history: list[dict], output_dir: Path, loggers) -> list:
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
    found["summary"] = output_dir / "summary.json"
    hydra_config = output_dir / ".hydra" / "config.yaml"
    if hydra_config.exists():
        found["config"] = hydra_config
    if pictures:
        found["pictures"] = output_dir / "viz" / "index.md"
    return found


def write_summary(result: FitResult, seconds: float) -> None:
    """``summary.json``: best-epoch metrics, history, classes, the data report, wall time."""
    summary = {
        "metrics": result.metrics,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "classes": result.classes,
        "history": result.history,
        "data": result.data_report.to_dict() if result.data_report else None,
        "seconds": round(seconds, 1),
    }
    result.outputs["summary"].write_text(json.dumps(summary, indent=2))


def log_end(result: FitResult) -> None:
    """The closing block: the best epoch, skipped files, where every output went, val/acc last."""
    m = result.metrics
    best_epoch = int(m["epoch"]) if "epoch" in m else "?"
    lines = [f"best epoch {best_epoch} of {len(result.history)}: " + ", ".join(
        f"{k}={m[k]:.4f}" for k in ("val/acc", "val/loss", "val/acc_top5", "train/loss", "train/acc", "test/acc")
        if k in m)]
    if result.data_report and result.data_report.skipped:
        lines.append(f"skipped {len(result.data_report.skipped)} unreadable or non-image files (listed in summary.json)")
    lines += [f"  {name}: {path}" + (f" (offline runs upload with: wandb sync {path}/offline-run-*)"
                                     if name == "wandb" else "") for name, path in result.outputs.items()]
    if "val/acc" in m:
        lines.append(f"val/acc={m['val/acc']:.4f}")
    log.info("\n".join(lines))
