"""The pictures of a saved model: ``finetune viz`` and the best trial of a sweep."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from finetune.use.load import FinetunedModel
from finetune.viz.report import Picture, PictureSettings, write_pictures


def checkpoint_pictures(
    model: FinetunedModel, checkpoint: str | Path, out_dir: Path, samples: Sequence | None = None, max_images: int = 500
) -> list[Picture]:
    """Every picture of `model` (loaded from `checkpoint`) into `out_dir`, on `samples`
    ((image, label) pairs; default: :meth:`FinetunedModel.evaluation_samples`), with the curves
    of the run's ``summary.json`` when it lies beside the checkpoint folder (``index.html`` then
    shows its metrics and data report too; the config is the checkpoint's)."""
    if samples is None:
        samples, _ = model.evaluation_samples()
    summary_path = Path(checkpoint).resolve().parent.parent / "summary.json"
    summary = _read_summary(summary_path)
    page = {"summary": summary, "summary_path": summary_path, "config": model.config}
    layers = model.run_config().viz.layers
    settings = PictureSettings(
        layers=tuple(layers) if layers is not None else None,
        max_images=max_images,
        thresholds=tuple(model.thresholds) if model.thresholds is not None else None,
        temperature=model.temperature,
    )
    return write_pictures(
        model.model,
        model.classes,
        samples,
        model.transform,
        model.data_config,
        Path(out_dir),
        history=(summary or {}).get("history", []),
        settings=settings,
        page=page,
    )


def _read_summary(path: Path) -> dict | None:
    """``summary.json`` as a dict; None when it is missing or unreadable (the pictures go on)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None
