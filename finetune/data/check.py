"""The data check run before every run and by ``finetune check-data``.

It reports images per class and split, skipped files with their reasons, the range of image
sizes, exact duplicates across splits (content hash), identical training files filed under
different classes, and classes missing from a split. ``finetune check-data`` also decodes every
file and lists near-blank images (placeholders). Problems that make training meaningless raise
:class:`DataError` (an empty train or val split, fewer than 2 classes); the rest become warnings,
among them the source's notes (manifest rows listing a file twice, paths leaving ``data.root``)
and a batch larger than the training set (each epoch is then one step of the whole set: the
batch is capped at the training set by the loader).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from html import escape

import numpy as np

from finetune.data import file_memo
from finetune.data.file_memo import file_digest
from finetune.data.labels import cardinality, describe_cardinality
from finetune.data.sources import SPLITS, DataSplits
from finetune.errors import DataError
from finetune.tables import format_table, html_table, pairs_table

COUNTED = ("train", "calibration", "val", "test")  # the calibration split is carved from train

# An image whose most common color covers this share of its pixels is reported as near-blank:
# hymenoptera's "image not found" GIF scores 0.94, its most uniform photo (an ant on white) 0.87.
NEAR_BLANK_SHARE = 0.9


@dataclass
class DataReport:
    description: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    skipped: list[tuple[str, str]]  # (path, reason), found while scanning or while decoding
    size_range: tuple[int, int, int, int] | None  # min width, min height, max width, max height
    duplicates: list[tuple[str, str]]  # (train item, val/test item) with identical content
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # identical train items, different classes
    near_blank: list[str] = field(default_factory=list)  # found by a full decode (check-data)
    warnings: list[str] = field(default_factory=list)
    # multi-label data: per split, number of labels per image -> images (0: no label applies)
    cardinality: dict[str, dict[int, int]] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)  # split -> images (a multi-label image counts once)

    def add_unreadable(self, failures: dict[str, str]) -> None:
        """Record files that passed the header check but failed to decode during the run."""
        known = {path for path, _ in self.skipped}
        self.skipped += [(p, r) for p, r in sorted(failures.items()) if p not in known]

    def add_near_blank(self, names: list[str]) -> None:
        """Record images whose pixels are nearly all one color (see :func:`near_blank_share`)."""
        self.near_blank += [n for n in names if n not in self.near_blank]
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            self.warnings.append(
                f"{len(names)} near-blank images (one color covers >= {NEAR_BLANK_SHARE:.0%} of the pixels): "
                f"{shown}. Placeholders such as 'image not found' pictures train as if they were their "
                f"class; look at them and delete the ones that are not real images"
            )

    def table(self) -> str:
        """Images per class and split (classes across when they fit on a line), image sizes,
        skipped files and why, duplicates, warnings."""
        lines = [f"data: {self.description}", self._counts_table()]
        facts = []
        if self.size_range:
            w0, h0, w1, h1 = self.size_range
            facts.append(f"image sizes: {w0}x{h0} (smallest) to {w1}x{h1} (largest)")
        facts.append(f"skipped files: {len(self.skipped)}; duplicates across splits: {len(self.duplicates)}")
        lines.append("; ".join(facts))
        lines += [
            f"labels per image ({split}): {describe_cardinality(counts)}" for split, counts in self.cardinality.items()
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more (all in summary.json)")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def _counts_table(self, width: int = 100) -> str:
        splits = [s for s in COUNTED if sum(self.counts.get(s, {}).values())]
        totals = [self.images.get(s) or sum(self.counts[s].values()) for s in splits]
        across = [["class", *self.classes, "total"]] + [
            [s, *(self.counts[s][c] for c in self.classes), t] for s, t in zip(splits, totals)
        ]
        widths = [max(len(str(row[i])) for row in across) for i in range(len(across[0]))]
        if sum(widths) + 2 * len(widths) <= width:
            return format_table(across[0], across[1:], "l" + "r" * (len(widths) - 1))
        rows = [[c] + [self.counts[s][c] for s in splits] for c in self.classes]
        if len(rows) > 12:
            rows = rows[:10] + [["..."] + [""] * len(splits)]
        rows.append(["total"] + totals)
        return format_table(["class"] + splits, rows, "l" + "r" * len(splits))

    def to_dict(self) -> dict:
        return asdict(self)

    def _repr_html_(self) -> str:
        """In a notebook: images per class and split, the facts, skipped files and warnings."""
        splits = [s for s in COUNTED if sum(self.counts.get(s, {}).values())]
        rows = [[c, *(self.counts[s][c] for s in splits)] for c in self.classes[:40]]
        if len(self.classes) > 40:
            rows.append([f"... {len(self.classes) - 40} more classes", *[""] * len(splits)])
        rows.append(["total", *(self.images.get(s) or sum(self.counts[s].values()) for s in splits)])
        facts = [("skipped files", len(self.skipped)), ("duplicates across splits", len(self.duplicates))]
        if self.size_range:
            facts.insert(0, ("image sizes", "{}x{} (smallest) to {}x{} (largest)".format(*self.size_range)))
        facts += [(f"labels per image ({s})", describe_cardinality(c)) for s, c in self.cardinality.items()]
        parts = [f"<p><b>data</b>: {escape(self.description)}</p>", html_table(["class", *splits], rows)]
        parts.append(pairs_table(facts))
        if self.skipped:
            parts.append(html_table(["skipped", "why"], self.skipped[:20], f"{len(self.skipped)} skipped files"))
        parts += [f'<p style="color:#a33;margin:2px 0">warning: {escape(w)}</p>' for w in self.warnings]
        return '<div class="finetune-data">' + "".join(parts) + "</div>"


def split_images(report: Mapping, split: str) -> int | None:
    """How many images `split` has in a data report as summary.json stores it
    (:meth:`DataReport.to_dict`): its image count, else the sum of its class counts; None when the
    report lists neither."""
    images = (report.get("images") or {}).get(split)
    if images is not None:
        return int(images)
    counts = (report.get("counts") or {}).get(split)
    return sum(counts.values()) if counts is not None else None


def check_data(splits: DataSplits, batch_size: int | None = None) -> DataReport:
    """Check `splits`; raise DataError for an empty train or val split or fewer than 2 classes.
    Multi-label data also get the number of labels per image, split by split.
    `batch_size` (``data.batch_size``): warn when it exceeds the training set."""
    for split in ("train", "val"):
        if not getattr(splits, split):
            raise DataError(f"The {split} split is empty ({splits.description}). Add images or change data.*.")
    if len(splits.classes) < 2:
        raise DataError(
            f"Classification needs at least 2 classes; {splits.description} has "
            f"{len(splits.classes)}: {splits.classes}. Add a folder (or labels) for each other class."
        )
    counted = [s for s in COUNTED if s != "calibration" or splits.calibration]  # listed only when held out
    counts = {s: splits.counts(s) for s in counted}
    report = DataReport(
        splits.description,
        list(splits.classes),
        counts,
        list(splits.skipped),
        _size_range(splits),
        *_duplicates(splits),
    )
    report.warnings += _class_warnings(splits, counts)
    report.images = {s: len(getattr(splits, s)) for s in counted}
    if splits.multilabel:
        report.cardinality = {
            s: cardinality([label for _, label in getattr(splits, s)]) for s in SPLITS if getattr(splits, s)
        }
        empty = sum(counts.get(0, 0) for counts in report.cardinality.values())
        if empty:
            report.warnings.append(f"{empty} images carry no label (kept: 'no label applies' is learned too)")
    report.warnings += _later_warnings(splits, report, batch_size)
    file_memo.flush()  # the digests and sizes read above, for the next process on these files
    return report


def _class_warnings(splits: DataSplits, counts: dict) -> list[str]:
    """A warning for each class (label) missing from the train or val split."""
    warnings = []
    for c in splits.classes:
        missing = [s for s in ("train", "val") if counts[s][c] == 0]
        if missing and splits.multilabel:
            warnings.append(
                f"label {c!r} is on no {' and no '.join(missing)} image"
                + (
                    ": its AP and threshold cannot be measured (it gets the global threshold)"
                    if missing == ["val"]
                    else ""
                )
            )
        elif missing:
            warnings.append(f"class {c!r} has no {' and no '.join(missing)} images")
    return warnings


def _later_warnings(splits: DataSplits, report: DataReport, batch_size: int | None) -> list[str]:
    """Warnings about duplicates across splits, conflicting labels, the source's notes, a batch
    larger than the training set, and skipped files, in that order."""
    warnings = []
    if report.duplicates:
        warnings.append(
            f"{len(report.duplicates)} images of val/test also appear in train (identical files): "
            f"validation accuracy will be optimistic. First: {report.duplicates[0]}"
        )
    if report.conflicts:
        warnings.append(
            f"{len(report.conflicts)} training images are identical files filed under different classes "
            f"(the same picture with two labels). First: {report.conflicts[0]}"
        )
    warnings += list(splits.notes)
    if batch_size is not None and batch_size > len(splits.train):
        warnings.append(
            f"data.batch_size={batch_size} is larger than the training set ({len(splits.train)} images): "
            f"the batch is capped at {len(splits.train)}, one optimizer step per epoch"
        )
    if splits.skipped:
        warnings.append(f"{len(splits.skipped)} files skipped (listed above and in summary.json)")
    return warnings


def _size_range(splits: DataSplits) -> tuple[int, int, int, int] | None:
    sizes = list(splits.sizes.values())
    sizes += [
        (item.shape[1], item.shape[0]) for s in SPLITS for item, _ in getattr(splits, s) if isinstance(item, np.ndarray)
    ]
    if not sizes:
        return None
    widths, heights = zip(*sizes)
    return min(widths), min(heights), max(widths), max(heights)


def near_blank_share(image: np.ndarray) -> float:
    """The share of `image`'s pixels (HxWx3 uint8) taken by its most common color, colors
    compared at 6 bits per channel so JPEG noise on a flat background still counts as one color.
    Placeholder pictures score about 0.95; photos of an object on white stay below 0.9."""
    coarse = (np.ascontiguousarray(image[..., :3]) >> 2).astype(np.int32).reshape(-1, 3)
    codes = (coarse[:, 0] << 12) | (coarse[:, 1] << 6) | coarse[:, 2]
    return float(np.bincount(codes).max() / len(codes)) if len(codes) else 1.0


def _duplicates(splits: DataSplits) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train item, val/test item) pairs with identical content, and (train item, train item)
    pairs with identical content but different labels."""
    train = defaultdict(list)
    for item, label in splits.train:
        train[_digest(item)].append((item, label))
    conflicts = []
    for twins in train.values():
        first, label = twins[0]
        conflicts += [(_name(first), _name(other)) for other, other_label in twins[1:] if other_label != label]
    across = []
    for split in ("val", "test"):
        for item, _ in getattr(splits, split):
            twins = train.get(_digest(item))
            if twins:
                across.append((_name(twins[0][0]), _name(item)))
    return across, conflicts


def _digest(item) -> str:
    if isinstance(item, np.ndarray):
        return hashlib.blake2b(item.tobytes(), digest_size=16).hexdigest()
    return file_digest(item)  # the same remembered digest the feature cache's key uses


def _name(item) -> str:
    return item if isinstance(item, str) else f"array{item.shape}"
