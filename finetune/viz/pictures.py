"""One function per picture; each writes a PNG and returns its path.

Inputs are plain tensors and dicts (no Trainer), so the same code serves the end of a run and
``finetune viz``. Images to show are uint8 HxWx3 (the network's input, de-normalized).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from finetune.viz.receptive import ReceptiveField  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The first convolution that reads RGB pixels."""
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)


def mosaic(tiles: Sequence[np.ndarray], cols: int, cell: int = 48, pad: int = 2, above: int = 0) -> np.ndarray:
    """Tiles (HxWx3 float in [0, 1] or uint8) resized to `cell` px (nearest), on a white grid;
    `above` px more of white above each row (room for captions)."""
    from PIL import Image

    rows = int(np.ceil(len(tiles) / cols))
    row_height = cell + pad + above
    grid = np.ones((rows * row_height + pad, cols * (cell + pad) + pad, 3), np.float32)
    for i, tile in enumerate(tiles):
        tile = np.asarray(tile)
        if tile.dtype != np.uint8:
            tile = (np.clip(tile, 0, 1) * 255).astype(np.uint8)
        resized = np.asarray(Image.fromarray(tile).resize((cell, cell), Image.Resampling.NEAREST), np.float32) / 255
        r, c = divmod(i, cols)
        top = pad + above + r * row_height
        grid[top : top + cell, pad + c * (cell + pad) : pad + c * (cell + pad) + cell] = resized
    return grid


def filters(model: nn.Module, path: Path, max_filters: int = 64) -> Path | None:
    """First-layer filters as RGB tiles, each scaled to its own [min, max]."""
    conv = first_conv(model)
    if conv is None:
        return None
    weights = conv.weight.detach().float().cpu()[:max_filters]
    tiles = [((w - w.min()) / (w.max() - w.min() + 1e-12)).permute(1, 2, 0).numpy() for w in weights]
    cols = int(np.ceil(np.sqrt(len(tiles))))
    fig, ax = plt.subplots(figsize=(cols * 0.8, int(np.ceil(len(tiles) / cols)) * 0.8 + 0.4))
    ax.imshow(mosaic(tiles, cols, cell=32))
    ax.axis("off")
    k = conv.kernel_size
    ax.set_title(f"first-layer filters: {conv.out_channels} x {k[0]}x{k[1]} (stride {conv.stride[0]})", fontsize=9)
    return _save(fig, path)


def curves(history: Sequence[dict], path: Path) -> Path | None:
    """Train/val loss and accuracy (multi-label: val mAP and F1, train F1) per epoch, and each
    optimizer group's learning rate."""
    if not history:
        return None
    epochs = [int(h["epoch"]) for h in history]  # counted from 1 (MetricsHistory)
    lr_keys = sorted({k for h in history for k in h if k.startswith("lr/") and not k.endswith("no_decay")})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    multilabel = any("val/map" in h for h in history)
    scores = ("train/f1_micro", "val/f1_micro", "val/map") if multilabel else ("train/acc", "val/acc")
    for ax, keys, title in (
        (axes[0], ("train/loss", "val/loss"), "loss"),
        (axes[1], scores, "mAP and F1 at 0.5" if multilabel else "acc"),
    ):
        for key, style in zip(keys, ("-o", "-s", "-^")):
            values = [h.get(key) for h in history]
            if any(v is not None for v in values):
                label = key if multilabel else key.split("/")[0]
                ax.plot(epochs, [np.nan if v is None else v for v in values], style, label=label, markersize=4)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    for key in lr_keys:
        axes[2].plot(epochs, [h.get(key, np.nan) for h in history], "-", label=key[3:])
    axes[2].set(title="learning rate", xlabel="epoch", yscale="log" if lr_keys else "linear")
    axes[2].grid(alpha=0.3)
    if lr_keys:
        axes[2].legend(fontsize=7)
    return _save(fig, path)


def confusion(report: dict, path: Path) -> Path:
    """Confusion matrix as counts and row-normalized, with per-class precision and recall."""
    classes = report["classes"]
    counts = np.array(report["confusion"])
    normalized = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    for ax, matrix, title, fmt in (
        (axes[0], counts, "counts", "d"),
        (axes[1], normalized, "normalized by true class", ".2f"),
    ):
        ax.imshow(matrix, cmap="Blues")
        ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(len(classes)), yticks=range(len(classes)))
        ax.set_xticklabels(classes, rotation=90, fontsize=7)
        ax.set_yticklabels(
            [
                f"{c}  P={report['per_class'][c]['precision']:.2f} R={report['per_class'][c]['recall']:.2f}"
                for c in classes
            ]
            if ax is axes[0]
            else classes,
            fontsize=7,
        )
        if len(classes) <= 20:
            top = matrix.max() or 1
            for (i, j), v in np.ndenumerate(matrix):
                if v:  # empty cells stay blank: easier to read, and far fewer artists to draw
                    ax.text(
                        j,
                        i,
                        format(v, fmt),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if v > top / 2 else "black",
                    )
    fig.suptitle(f"accuracy {report['accuracy']:.3f} on {report['images']} images", fontsize=10)
    return _save(fig, path)


def mistakes(
    images: np.ndarray,
    labels: torch.Tensor,
    probabilities: torch.Tensor,
    classes: Sequence[str],
    path: Path,
    count: int = 16,
) -> Path | None:
    """The most confident wrong predictions, with true and predicted labels."""
    confidence, predicted = probabilities.max(dim=1)
    wrong = torch.nonzero(predicted != labels).flatten()
    if not len(wrong):
        return None
    order = wrong[confidence[wrong].argsort(descending=True)][:count].tolist()
    cols, cell, pad, above = min(4, len(order)), 160, 4, 44
    rows = int(np.ceil(len(order) / cols))
    # One mosaic on one axes: 16 small axes cost more to draw than the whole rest of the picture.
    fig, ax = plt.subplots(figsize=(cols * 2.4, rows * 2.7))
    ax.imshow(mosaic([images[i] for i in order], cols, cell=cell, pad=pad, above=above))
    ax.axis("off")
    for n, i in enumerate(order):
        r, c = divmod(n, cols)
        ax.text(
            pad + c * (cell + pad) + cell / 2,
            pad + above + r * (cell + pad + above) - 4,
            f"true: {classes[labels[i]]}\npred: {classes[predicted[i]]} ({confidence[i]:.2f})",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    fig.suptitle(f"most confident mistakes ({len(wrong)} wrong of {len(labels)})", fontsize=10)
    return _save(fig, path)


def batch(images: np.ndarray, captions: Sequence[str], path: Path, title: str = "") -> Path:
    """Images (uint8 NxHxWx3) on a grid, each with its caption above it."""
    cols, cell, pad, above = min(4, len(images)), 160, 4, 24
    rows = int(np.ceil(len(images) / cols))
    fig, ax = plt.subplots(figsize=(cols * 2.4, rows * 2.5))
    ax.imshow(mosaic(list(images), cols, cell=cell, pad=pad, above=above))
    ax.axis("off")
    for n, caption in enumerate(captions):
        r, c = divmod(n, cols)
        x, y = pad + c * (cell + pad) + cell / 2, pad + above + r * (cell + pad + above) - 4
        ax.text(x, y, caption, ha="center", va="bottom", fontsize=8)
    fig.suptitle(title or f"{len(images)} training images as the network sees them (augmented)", fontsize=10)
    return _save(fig, path)


def top_patch_crops(
    images: np.ndarray, peaks: torch.Tensor, positions: torch.Tensor, field: ReceptiveField, channels: int, top_k: int
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The strongest channels (by the mean of their top-k peaks) and, channel by channel, the
    crops of the `top_k` images that excite each most: the channel's receptive field around
    its peak (the whole image when the field is larger than the image)."""
    values, order = peaks.topk(top_k, dim=0)  # (top_k, C)
    strongest = values.mean(dim=0).topk(min(channels, peaks.shape[1])).indices
    height, width = images.shape[1:3]
    crops = []
    for channel in strongest.tolist():
        for c in range(top_k):
            i = int(order[c, channel])
            row, col = positions[i, channel].tolist()
            top, left, bottom, right = (0, 0, height, width) if field.clipped else field.box(row, col, height, width)
            crops.append(images[i][top:bottom, left:right])
    return strongest, crops


def top_patches(
    images: np.ndarray,
    peaks: torch.Tensor,
    positions: torch.Tensor,
    field: ReceptiveField,
    layer: str,
    path: Path,
    channels: int = 8,
    top_k: int = 6,
) -> Path:
    """For the `channels` channels with the strongest top-k responses, the `top_k` image crops
    (each channel's receptive field around its peak) that excite it most.

    peaks: (N, C) each image's maximum activation per channel; positions: (N, C, 2) its (row, col).
    """
    top_k = min(top_k, len(images))
    strongest, tiles = top_patch_crops(images, peaks, positions, field, channels, top_k)
    cell = 48
    fig, ax = plt.subplots(figsize=(top_k * 0.75 + 0.8, len(strongest) * 0.75 + 0.8))
    ax.imshow(mosaic(tiles, top_k, cell=cell))
    ax.set_xticks([])
    ax.set_yticks([2 + (cell + 2) * r + cell / 2 for r in range(len(strongest))])
    ax.set_yticklabels([f"ch {ch}" for ch in strongest.tolist()], fontsize=7)
    size = f"{field.size}+ px (whole image)" if field.clipped else f"{field.size} px"
    ax.set_title(
        f"{layer}: top-{top_k} patches of its {len(strongest)} strongest channels\n"
        f"receptive field {size}, stride {field.stride}",
        fontsize=8,
    )
    return _save(fig, path)
