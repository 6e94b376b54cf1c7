"""What :func:`finetune.fit` returns: a run's metrics, best checkpoint, model and outputs; in a
notebook it renders as HTML and shows its pictures on demand (:mod:`finetune.viz.notebook`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from finetune.data.check import DataReport
from finetune.train.history import task_metric


@dataclass
class FitResult:
    """What a run leaves behind. ``metrics`` are the best epoch's (by :attr:`objective`: ``val/acc``,
    or ``val/map`` for multi-label runs, whose ``evaluation`` holds the tuned thresholds and the
    per-label validation (and test) reports)."""

    metrics: dict[str, float]
    best_checkpoint: Path | None
    classes: list[str]
    model: nn.Module
    output_dir: Path
    config: dict
    history: list[dict[str, float]] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)
    data_report: DataReport | None = None  # counts per split, skipped files and why, duplicates
    evaluation: dict | None = None  # multi-label: thresholds, per-label reports (summary.json "multilabel")
    data_config: dict | None = None  # the model's input size, mean, std, interpolation, crop (as trained)

    @property
    def objective(self) -> str:
        """The metric that chose the best epoch (``callbacks.checkpoint.monitor``, resolved)."""
        return (self.config.get("callbacks") or {}).get("checkpoint", {}).get("monitor", "val/acc")

    @property
    def headline(self) -> str:
        """The task's score a person reads first: ``val/acc``, or ``val/map`` for multi-label."""
        return task_metric(self.config.get("task"))

    def __repr__(self) -> str:
        value = self.metrics.get(self.headline)
        shown = f"{value:.4f}" if value is not None else "n/a"
        return f"FitResult({self.headline}={shown}, classes={len(self.classes)}, output_dir={str(self.output_dir)!r})"

    def _repr_html_(self) -> str:
        from finetune.viz.notebook import result_html

        return result_html(self)

    def show_curves(self):
        """The learning curves (loss, accuracy, each group's lr per epoch), for a notebook cell."""
        from finetune.viz import pictures
        from finetune.viz.notebook import drawn

        return drawn(lambda path: pictures.curves(self.history, path), "learning curves")

    def show_confusion(self):
        """The confusion matrix of the best model on the validation split."""
        from finetune.viz.notebook import confusion

        return confusion(self.finetuned(), self._splits().val, self._batch_size())

    def show_mistakes(self, k: int = 16):
        """The `k` most confident mistakes of the best model on the validation split."""
        from finetune.viz.notebook import mistakes

        return mistakes(self.finetuned(), self._splits().val, k, self._batch_size())

    def show_batch(self, n: int = 16):
        """`n` training images through the training pipeline (augmented), as the network sees them."""
        from finetune.data.transforms import build_transforms
        from finetune.viz.notebook import batch

        model = self.finetuned()
        augment, seed = self.config.get("augment") or {}, int(self.config.get("seed", 0))
        train_tf, _ = build_transforms(model.data_config, augment, seed=seed, normalize=False)
        return batch(self._splits().train, train_tf, self.classes, n, seed)

    def finetuned(self):
        """The best model as :func:`finetune.load` gives it (``predict``, ``probabilities``)."""
        from finetune.use.load import FinetunedModel

        if self.data_config is None:
            import timm

            self.data_config = timm.data.resolve_model_data_config(self.model.backbone)
        trust = {"temperature": self.metrics.get("temperature", 1.0)}
        return FinetunedModel(self.model, self.classes, self.data_config, self.config, trust=trust)

    def _splits(self):
        from omegaconf import OmegaConf

        from finetune.data.sources import load_data

        cfg = OmegaConf.create(self.config)
        return load_data(cfg.data, cfg.seed, cfg.get("task", "multiclass"))

    def _batch_size(self) -> int:
        return int((self.config.get("data") or {}).get("batch_size", 32))
