"""The audit's pictures: the top suspects (likely label errors, then outliers) titled with the
given and the suggested label, and the near-duplicate pairs side by side; and the
:class:`AuditReport` that ``finetune audit`` writes and a notebook shows."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from finetune.data.images import UnreadableImage, load_rgb  # noqa: E402
from finetune.tables import html_table  # noqa: E402
from finetune.use.audit import Audit, summary_lines  # noqa: E402

THUMBNAIL = 160  # px, longest side: a grid of a few dozen photos stays small in memory


def _thumbnail(path: str) -> np.ndarray | None:
    """The image at `path` shrunk to THUMBNAIL px (None: not a readable file, e.g. an in-memory array)."""
    from PIL import Image

    if not Path(path).is_file():
        return None
    try:
        image = Image.fromarray(load_rgb(path))
    except UnreadableImage:
        return None
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(image)


def _show(ax, path: str, title: str, color: str = "black") -> None:
    image = _thumbnail(path)
    if image is None:
        ax.text(0.5, 0.5, Path(path).name, ha="center", va="center", fontsize=7, wrap=True)
    else:
        ax.imshow(image)
    ax.set_title(title, fontsize=7, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def suspects(audit: Audit, path: Path, top: int = 24, cols: int = 6) -> Path | None:
    """Up to `top` flagged images, likely label errors (most suspect first), then outliers, each
    titled "given -> suggested" with the label quality or the outlier score. None: nothing flagged."""
    rows = ([(i, "label") for i in audit.suspects()] + [(i, "outlier") for i in audit.outliers()])[:top]
    if not rows:
        return None
    cols = min(cols, len(rows))
    grid_rows = -(-len(rows) // cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(1.9 * cols, 2.2 * grid_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (i, kind) in zip(axes.flat, rows):
        ax.axis("on")
        given, suggested = audit.classes[audit.labels[i]], audit.classes[audit.suggested[i]]
        if kind == "label":
            title = f"{given} -> {suggested}\nquality {audit.label_quality[i]:.3f} ({audit.splits[i]})"
            _show(ax, str(audit.paths[i]), title, "firebrick")
        else:
            title = f"outlier, given {given}\nscore {audit.outlier_score[i]:.3f} ({audit.splits[i]})"
            _show(ax, str(audit.paths[i]), title, "darkorange")
    fig.suptitle(
        f"Top suspects: given -> suggested label ({int(audit.label_issue.sum())} likely label errors, "
        f"{int(audit.outlier.sum())} outliers)",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, path)


def duplicates(audit: Audit, path: Path, top: int = 8) -> Path | None:
    """Up to `top` near-duplicate pairs, most similar first, one pair per row (None: no pair)."""
    pairs = audit.pairs[:top]
    if not pairs:
        return None
    fig, axes = plt.subplots(len(pairs), 2, figsize=(4.2, 2.2 * len(pairs)), squeeze=False)
    for (left, right), pair in zip(axes, pairs):
        color = "firebrick" if pair.leak else "black"
        for ax, i in ((left, pair.first), (right, pair.second)):
            name = Path(str(audit.paths[i])).name
            _show(ax, str(audit.paths[i]), f"{audit.splits[i]}, {audit.classes[audit.labels[i]]}\n{name[:28]}", color)
        score = f"pixels {pair.similarity:.3f}" if pair.similarity is not None else f"features {pair.cosine:.3f}"
        left.set_ylabel(score + ("\nLEAK" if pair.leak else ""), fontsize=7, color=color)
    fig.suptitle(
        f"Near-duplicates ({len(audit.pairs)} pairs, {sum(p.leak for p in audit.pairs)} across train and val/test)",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, path)


@dataclass
class AuditReport:
    """What ``finetune audit`` (and :func:`finetune.audit`) found: the :class:`Audit`, the files
    `skipped` as unreadable (path -> reason), the `top` suspects its picture shows. ``save(out)``
    writes audit.csv, audit.json, suspects.png and duplicates.png; in a notebook it renders as its
    facts, the suspects picture and the first suspects' rows."""

    audit: Audit
    skipped: dict[str, str] = field(default_factory=dict)
    top: int = 24
    folder: Path | None = None  # where save() wrote, once it has
    files: list[Path] = field(default_factory=list)  # what it wrote there

    def __repr__(self) -> str:
        return f"AuditReport({'; '.join(self.lines()[1:4])})"

    def rows(self) -> list[dict]:
        """One dict per image, the columns of audit.csv (most suspect first)."""
        return self.audit.rows()

    def lines(self) -> list[str]:
        """One line per fact, as the command prints them."""
        return summary_lines(self.audit.summary(), self.skipped)

    def summary(self) -> dict:
        return {**self.audit.summary(), "skipped": self.skipped}

    def save(self, out: Path) -> list[Path]:
        """The audit's files in `out` (made when missing); the paths written."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rows = self.audit.rows()
        with (out / "audit.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / "audit.json").write_text(json.dumps(self.summary(), indent=2))
        pictures = [
            suspects(self.audit, out / "suspects.png", self.top),
            duplicates(self.audit, out / "duplicates.png"),
        ]
        self.folder = out
        self.files = [out / "audit.csv", out / "audit.json"] + [p for p in pictures if p is not None]
        return self.files

    def show_suspects(self, k: int | None = None):
        """The first `k` (default: `top`) suspects as a picture for a notebook cell (None: none flagged)."""
        from finetune.viz.notebook import drawn

        return drawn(lambda path: suspects(self.audit, path, k or self.top), "given -> suggested label")

    def show_duplicates(self, k: int = 8):
        """The `k` most similar near-duplicate pairs, side by side (None: no pair)."""
        from finetune.viz.notebook import drawn

        return drawn(lambda path: duplicates(self.audit, path, k), "near-duplicates")

    def _repr_html_(self) -> str:
        facts = "".join(f"<li>{escape(line)}</li>" for line in self.lines())
        parts = [f'<div class="finetune-audit"><b>AuditReport</b><ul style="margin:2px 0">{facts}</ul>']
        for picture in (self.show_suspects(), self.show_duplicates()):
            if picture is not None:
                parts.append(picture._repr_html_())
        flagged = [r for r in self.audit.rows() if r["is_label_issue"] or r["is_outlier"]][:10]
        if flagged:
            columns = ["path", "split", "given", "suggested", "label_quality", "is_outlier"]
            parts.append(html_table(columns, [[r[c] for c in columns] for r in flagged], "the first suspects"))
        where = f"<p>files: {escape(str(self.folder))}</p>" if self.folder else ""
        return "".join(parts) + where + "</div>"
