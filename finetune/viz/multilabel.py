"""Pictures of a multi-label model: each function writes a PNG and returns its path.

The multi-label counterparts of ``pictures.confusion`` and ``pictures.mistakes``: every image
carries any number of labels (targets are (N, C) 0/1), and a label is predicted when its sigmoid
probability reaches its own threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from finetune.data.labels import cardinality, describe_cardinality
from finetune.viz.pictures import _save, mosaic  # pictures selects the Agg backend


def ap_bars(report: dict, path: Path) -> Path:
    """Per-label average precision as horizontal bars, best at the top.

    Labels without a positive example (AP None: undefined) sit at the bottom as empty hatched
    bars marked "no positives"; the dashed line is the macro mAP over the other labels.
    """
    per_label = report["per_label"]
    defined = sorted(
        (c for c in report["classes"] if per_label[c]["ap"] is not None), key=lambda c: -per_label[c]["ap"]
    )  # stable: ties keep the report's order
    names = defined + [c for c in report["classes"] if per_label[c]["ap"] is None]
    fig, ax = plt.subplots(figsize=(7, max(2.2, 0.22 * len(names) + 1.2)))
    for y, name in enumerate(names):
        ap = per_label[name]["ap"]
        if ap is None:
            ax.barh(y, 1, color="none", edgecolor="0.6", hatch="//", linewidth=0.6)
            ax.text(0.02, y, "no positives", va="center", fontsize=7, color="0.3")
        else:
            ax.barh(y, ap, color="tab:blue")
            inside = ap > 0.85  # no room right of the bar: the value goes inside it, in white
            ax.text(
                ap - 0.01 if inside else ap + 0.01,
                y,
                f"{ap:.3f}",
                va="center",
                fontsize=7,
                ha="right" if inside else "left",
                color="white" if inside else "black",
            )
    mean_ap = report.get("map")
    if mean_ap is not None and np.isfinite(mean_ap):
        ax.axvline(mean_ap, color="tab:red", linestyle="--", linewidth=1, label=f"mAP {mean_ap:.3f}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: bars fill the axes
    ax.set(xlim=(0, 1), ylim=(len(names) - 0.5, -0.5), yticks=range(len(names)), xlabel="average precision")
    ax.set_yticklabels([f"{name} (n={per_label[name]['support']})" for name in names], fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"average precision per label on {report['images']} images", fontsize=10)
    return _save(fig, path)


def _present(targets) -> np.ndarray:
    """(N, C) bool from 0/1 ints, floats or bools."""
    return np.asarray(targets, dtype=np.float64) > 0.5


def cooccurrence_counts(targets: np.ndarray) -> np.ndarray:
    """(C, C) int: [i, j] images carrying both labels i and j; [i, i] images carrying label i."""
    present = _present(targets).astype(np.int64)
    return present.T @ present


def cooccurrence(
    targets: np.ndarray, classes: Sequence[str], path: Path, title: str = "label co-occurrence"
) -> Path | None:
    """Counts of images carrying both labels (diagonal: each label's count), and the same rows
    normalized by the row label's count (P(column | row)). None when there are no images."""
    targets = np.asarray(targets)
    if len(targets) == 0:
        return None
    counts = cooccurrence_counts(targets)
    normalized = counts / np.maximum(np.diag(counts), 1)[:, None]
    n = len(classes)
    size = max(3.0, (0.45 if n <= 20 else 0.16) * n)  # of a matrix, in inches
    names = 0.07 * max((len(c) for c in classes), default=0) + 0.2  # inches of 7 pt tick labels
    # Room for the names beside and below each matrix, so both matrices are square in their slots
    # (no gap between them); constrained layout places the labels and titles without overlap.
    fig, axes = plt.subplots(1, 2, figsize=(2 * (size + names), size + names + 1.0), layout="constrained")
    panels = (
        (axes[0], counts, "images with both labels\n(diagonal: images with the label)", "d"),
        (axes[1], normalized, "P(column | row)", ".2f"),
    )
    for ax, matrix, panel_title, fmt in panels:
        ax.imshow(matrix, cmap="Blues")
        ax.set(title=panel_title, xticks=range(n), yticks=range(n))
        ax.set_xticklabels(classes, rotation=90, fontsize=7)
        ax.set_yticklabels(classes, fontsize=7)
        if n <= 20:
            top = matrix.max() or 1
            for (i, j), v in np.ndenumerate(matrix):
                if v:
                    ax.text(
                        j,
                        i,
                        format(v, fmt),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if v > top / 2 else "black",
                    )
    spread = describe_cardinality(cardinality([tuple(np.flatnonzero(row)) for row in _present(targets)]))
    fig.suptitle(f"{title}\n{len(targets)} images: {spread}", fontsize=10)
    return _save(fig, path)


def _worst_per_image(errors: torch.Tensor, probabilities: torch.Tensor, lowest: bool, count: int) -> list[tuple]:
    """Each image's worst error (lowest or highest probability among its `errors`), images
    ordered worst first (ties: lower image index first), at most `count`."""
    sign = 1.0 if lowest else -1.0
    score = torch.where(errors, sign * probabilities, torch.full_like(probabilities, float("inf")))
    worst, label = score.min(dim=1)  # ties within an image: the lower label index
    images = torch.nonzero(errors.any(dim=1)).flatten()
    images = images[torch.sort(worst[images], stable=True).indices][:count]
    return [(int(i), int(label[i]), float(probabilities[i, label[i]])) for i in images]


def rank_mistakes(
    targets: torch.Tensor, probabilities: torch.Tensor, thresholds: torch.Tensor, count: int
) -> tuple[list[tuple[int, int, float]], list[tuple[int, int, float]]]:
    """The `count` most confident misses and false alarms as (image, label, probability).

    A miss is a true label with probability < its threshold, lowest probability first; a false
    alarm an absent label with probability >= its threshold, highest first. Each image appears at
    most once per list, with its worst error; ties keep image order.
    """
    probabilities = probabilities.detach().float().cpu()
    present = targets.detach().cpu() > 0.5
    predicted = probabilities >= thresholds.detach().float().cpu()
    return (
        _worst_per_image(present & ~predicted, probabilities, True, count),
        _worst_per_image(~present & predicted, probabilities, False, count),
    )


def _names(names: Sequence[str], width: int = 26) -> str:
    """Names joined by spaces, cut with "…" past `width` characters; "(none)" when empty."""
    text = " ".join(names) or "(none)"
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def label_mistakes(
    images: np.ndarray,
    targets: torch.Tensor,
    probabilities: torch.Tensor,
    thresholds: torch.Tensor,
    classes: Sequence[str],
    path: Path,
    count: int = 8,
) -> Path | None:
    """The most confident misses (a true label whose probability is furthest below its threshold)
    and false alarms (an absent label furthest above its threshold): the multi-label mistakes.png.

    Misses fill the first row(s), false alarms the next; each tile is captioned with its error,
    the image's true labels and its predicted labels. None when there is no error at all.
    """
    probabilities = probabilities.detach().float().cpu()
    present = targets.detach().cpu() > 0.5
    predicted = probabilities >= thresholds.detach().float().cpu()
    missed, alarms = rank_mistakes(targets, probabilities, thresholds, count)
    if not missed and not alarms:
        return None
    cols, cell, pad, above = min(4, max(len(missed), len(alarms))), 160, 4, 58
    blank = np.ones((1, 1, 3), np.float32)  # pads the misses to whole rows: each group starts a row
    miss_rows = int(np.ceil(len(missed) / cols))
    tiles = [images[i] for i, _, _ in missed] + [blank] * (miss_rows * cols - len(missed))
    tiles += [images[i] for i, _, _ in alarms]
    grid = mosaic(tiles, cols, cell=cell, pad=pad, above=above)
    # The axes fill the figure below the title: any slack around the mosaic would shrink the
    # tiles (crowding the captions) or push the title far above them.
    width = cols * 2.4
    height = width * grid.shape[0] / grid.shape[1]
    fig = plt.figure(figsize=(width, height + 0.4))
    ax = fig.add_axes((0, 0, 1, height / (height + 0.4)))
    ax.imshow(grid)
    ax.axis("off")
    entries = [(n, "missed", e) for n, e in enumerate(missed)]
    entries += [(miss_rows * cols + n, "false alarm", e) for n, e in enumerate(alarms)]
    for slot, kind, (i, label, probability) in entries:
        r, c = divmod(slot, cols)
        true = [classes[j] for j in torch.nonzero(present[i]).flatten().tolist()]
        pred = [classes[j] for j in torch.nonzero(predicted[i]).flatten().tolist()]
        ax.text(
            pad + c * (cell + pad) + cell / 2,
            pad + above + r * (cell + pad + above) - 4,
            f"{kind}: {_names([classes[label]], 20)} {probability:.2f}\ntrue: {_names(true)}\npred: {_names(pred)}",
            ha="center",
            va="bottom",
            fontsize=7.5,
            color="tab:red" if kind == "missed" else "black",
        )
    n_missed = int((present & ~predicted).sum())
    n_alarms = int((~present & predicted).sum())
    fig.suptitle(
        f"most confident mistakes: {n_missed} missed labels, {n_alarms} false alarms on {len(probabilities)} images",
        fontsize=10,
    )
    return _save(fig, path)
