"""All the pictures of a trained model, and ``index.md`` linking them with one-line captions
(and ``index.html``, the run's report page around them: :mod:`finetune.viz.html_report`).

One evaluation pass over (up to ``max_images`` of) the validation images feeds the confusion
matrix, the mistakes and the top-activating patches of every chosen layer (forward hooks).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from finetune.data.datamodule import ImageDataset, collate_skipping_unreadable
from finetune.data.sources import Sample
from finetune.use.metrics import classification_report
from finetune.viz import pictures
from finetune.viz.receptive import patch_fields


@dataclass(frozen=True)
class Picture:
    name: str
    path: Path
    caption: str


def default_layers(backbone: nn.Module) -> list[str]:
    """One layer per stage: the modules timm lists in ``feature_info``."""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        return []
    entries = info.get_dicts() if hasattr(info, "get_dicts") else info
    return [e["module"] for e in entries if e.get("module")]


@dataclass(frozen=True)
class PictureSettings:
    """What the pictures need besides the model and its images: the ``viz`` group's choices, the
    evaluation batch size and seed, and the run's decision rule (multi-label `thresholds`, in class
    order; the multi-class `temperature` of the reliability diagram)."""

    layers: tuple[str, ...] | None = None  # None: one per stage (default_layers)
    channels: int = 8
    top_k: int = 6
    max_images: int = 500
    batch_size: int = 32
    seed: int = 0
    thresholds: tuple[float, ...] | None = None  # set: the samples are multi-label
    temperature: float = 1.0


def write_pictures(
    model: nn.Module,
    classes: Sequence[str],
    samples: Sequence[Sample],
    transform,
    data_config: Mapping,
    out_dir: Path,
    *,
    history: Sequence[dict] = (),
    settings: PictureSettings = PictureSettings(),
    train_samples: Sequence[Sample] | None = None,
    page: Mapping | None = None,
) -> list[Picture]:
    """Write every picture for `model` (a Classifier: ``.backbone``, ``.head``) under `out_dir`.
    With ``settings.thresholds`` the samples are multi-label (labels: tuples of class indices):
    per-label AP, the co-occurrence of labels in `train_samples` (else `samples`) and the missed
    labels and false alarms replace the confusion matrix and the mistakes. Multi-class models also
    get the reliability diagram (softmax and softmax at ``settings.temperature``) and the
    risk-coverage curve. `page`: what ``index.html`` shows besides the pictures and `model`'s layer
    groups (keywords of :func:`finetune.viz.html_report.write_page`: summary, summary_path, config,
    group_lrs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    results = [
        Picture(name, path, caption)
        for name, path, caption in [
            (
                "filters",
                pictures.filters(model, out_dir / "filters.png"),
                "First-layer filters: the colors and edge orientations the network looks for first.",
            ),
            (
                "curves",
                pictures.curves(history, out_dir / "curves.png"),
                "Learning curves: train vs validation loss and accuracy per epoch (a widening gap means "
                "over-fitting), and the lr.",
            ),
        ]
        if path is not None
    ]
    if len(samples) > settings.max_images:
        samples = random.Random(settings.seed).sample(list(samples), settings.max_images)
    layers = list(settings.layers) if settings.layers is not None else default_layers(model.backbone)
    spatial = _spatial_layers(model.backbone, layers, data_config)
    num_labels = len(classes) if settings.thresholds is not None else None
    images, labels, logits, peaks, positions = _evaluate(
        model, samples, transform, data_config, spatial, settings.batch_size, num_labels
    )
    if len(labels):
        if settings.thresholds is not None:
            drawn = _multilabel_pictures(
                classes, images, labels, logits, list(settings.thresholds), train_samples or samples, out_dir
            )
        else:
            drawn = _multiclass_pictures(classes, images, labels, logits, settings.temperature, out_dir)
        if spatial:
            drawn += _patch_pictures(model, spatial, data_config, images, peaks, positions, settings, out_dir)
        results += [Picture(name, path, caption) for name, path, caption in drawn if path is not None]
    return _finish(results, out_dir, model, page)


def _multiclass_pictures(classes, images, labels, logits, temperature: float, out_dir: Path) -> list[tuple]:
    """(name, path, caption) of the confusion matrix, the mistakes and the trust pictures."""
    report = classification_report(logits, labels, list(classes))
    return [
        (
            "confusion",
            pictures.confusion(report, out_dir / "confusion.png"),
            f"Confusion matrix on {report['images']} validation images (counts, and normalized by true class), "
            f"with per-class precision/recall.",
        ),
        (
            "mistakes",
            pictures.mistakes(images, labels, logits.softmax(1), classes, out_dir / "mistakes.png"),
            "The most confident mistakes: wrong labels, ambiguous images or a real weakness.",
        ),
        *trust_pictures(logits, labels, temperature, out_dir),
    ]


def _patch_pictures(
    model: nn.Module, spatial, data_config, images, peaks, positions, settings: PictureSettings, out_dir: Path
) -> list[tuple]:
    """(name, path, caption) of the top-activating patches of each spatial layer."""
    drawn = []
    for name, field in patch_fields(model.backbone, spatial, data_config["input_size"][1]).items():
        group = _group_of(model, name)  # files and captions say stage3, as every table does
        safe = group or name.replace(".", "_")
        title = f"{group} ({name})" if group else name
        path = pictures.top_patches(
            images,
            peaks[name],
            positions[name],
            field,
            title,
            out_dir / f"patches_{safe}.png",
            settings.channels,
            settings.top_k,
        )
        drawn.append(
            (
                f"patches_{safe}",
                path,
                f"{title}: the image patches (its receptive field, {field.size}{'+' if field.clipped else ''} px) "
                f"that excite its strongest channels most.",
            )
        )
    return drawn


def trust_pictures(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    out_dir: Path,
    min_confidence: float | None = None,
    split: str = "validation",
) -> list[tuple]:
    """(name, path, caption) of the reliability diagram and the risk-coverage curve."""
    from finetune.viz import trust

    return [
        (
            "reliability",
            trust.reliability(logits, labels, temperature, out_dir / "reliability.png", split),
            f"Reliability: how often the model is right against how sure it says it is, before and after temperature "
            f"scaling (T = {temperature:.2f}, fitted on the validation split). On the diagonal: confidence you can "
            f"take at its word.",
        ),
        (
            "risk_coverage",
            trust.risk_coverage(
                (logits / temperature).softmax(1), labels, out_dir / "risk_coverage.png", min_confidence
            ),
            "Risk-coverage: answering only the most confident images, the error among the answered against the share "
            "answered (predict min_confidence= or target_precision= picks a point on it; the rest are 'unknown').",
        ),
    ]


def _multilabel_pictures(classes, images, targets, logits, thresholds, label_samples, out_dir: Path) -> list[tuple]:
    """(name, path, caption) of the multi-label pictures."""
    from finetune.data.labels import multi_hot
    from finetune.use.multilabel import multilabel_report
    from finetune.viz import multilabel

    probabilities = logits.sigmoid()
    report = multilabel_report(probabilities, targets, classes, thresholds)
    label_sets = np.stack([multi_hot(label, len(classes)) for _, label in label_samples])
    threshold_tensor = torch.tensor(list(thresholds), dtype=torch.float32)
    return [
        (
            "average_precision",
            multilabel.ap_bars(report, out_dir / "average_precision.png"),
            f"Average precision per label on {report['images']} validation images (mAP {report['map']:.3f}): "
            f"the labels the network ranks well, and those it does not.",
        ),
        (
            "cooccurrence",
            multilabel.cooccurrence(label_sets, classes, out_dir / "cooccurrence.png"),
            f"Which labels come together in the {len(label_sets)} images the model learned from (counts, and "
            f"normalized by the row label), with the number of labels per image.",
        ),
        (
            "label_mistakes",
            multilabel.label_mistakes(
                images, targets, probabilities, threshold_tensor, classes, out_dir / "label_mistakes.png"
            ),
            "The most confident mistakes at the tuned thresholds: labels missed, and labels given that do not apply.",
        ),
    ]


def _group_of(model: nn.Module, layer: str) -> str | None:
    """The layer group (stem, stage1, ...) that backbone module `layer` belongs to, if one
    group holds all its parameters."""
    prefix = f"backbone.{layer}."
    owners = {g.name for g in getattr(model, "groups", []) for n in g.param_names if n.startswith(prefix)}
    return owners.pop() if len(owners) == 1 else None


def _finish(results: list[Picture], out_dir: Path, model: nn.Module, page: Mapping | None) -> list[Picture]:
    """``index.md`` and ``index.html`` for `results`."""
    from finetune.viz.html_report import write_page

    lines = ["# What the network learned", ""]
    for picture in results:
        lines += [f"## {picture.name}", "", picture.caption, "", f"![{picture.name}]({picture.path.name})", ""]
    (out_dir / "index.md").write_text("\n".join(lines))
    write_page(out_dir, results, model, **(page or {}))
    return results


def _spatial_layers(backbone: nn.Module, layers: Sequence[str], data_config: Mapping) -> list[str]:
    """The named layers whose output is a spatial map (ViT token layers are not)."""
    captured = {}
    handles = [backbone.get_submodule(n).register_forward_hook(_store(captured, n)) for n in layers]
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, *data_config["input_size"]))
    finally:
        for h in handles:
            h.remove()
    return [n for n in layers if captured.get(n) is not None and captured[n].ndim == 4]


def _store(captured: dict, name: str):
    def hook(module, inputs, output):
        captured[name] = output if isinstance(output, torch.Tensor) else None

    return hook


@torch.no_grad()
def _evaluate(model, samples, transform, data_config, layers, batch_size, num_labels=None):
    """Display images (uint8), labels (multi-hot rows with `num_labels`), logits, and per layer
    each image's per-channel peak activation with its position."""
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    captured = {}
    handles = [model.backbone.get_submodule(n).register_forward_hook(_store(captured, n)) for n in layers]
    loader = DataLoader(
        ImageDataset(list(samples), transform, num_labels=num_labels),
        batch_size=batch_size,
        collate_fn=collate_skipping_unreadable,
    )
    images, labels, logits = [], [], []
    peaks = {n: [] for n in layers}
    positions = {n: [] for n in layers}
    device = next(model.parameters()).device
    try:
        for x, y, _ in tqdm(loader, desc="looking inside", unit="batch", leave=False, disable=None):
            if not len(y):
                continue
            logits.append(model(x.to(device)).float().cpu())
            labels.append(y)
            images.append(((x * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())
            for n in layers:
                act = captured[n].float().cpu()
                flat = act.flatten(2)  # (B, C, H*W)
                value, index = flat.max(dim=2)
                peaks[n].append(value)
                positions[n].append(torch.stack([index // act.shape[3], index % act.shape[3]], dim=2))
    finally:
        for h in handles:
            h.remove()
    if not labels:
        return np.zeros((0, 1, 1, 3), np.uint8), torch.zeros(0, dtype=torch.long), torch.zeros(0), {}, {}
    return (
        np.concatenate(images),
        torch.cat(labels),
        torch.cat(logits),
        {n: torch.cat(v) for n, v in peaks.items()},
        {n: torch.cat(v) for n, v in positions.items()},
    )
