"""What every data source returns, and the helpers sources share.

:class:`DataSplits` holds the class names (label order, taken from the training split), train /
validation (/ test) samples as ``(path_or_array, label)``, the image sizes read from file headers,
and the files that were skipped with the reason. A label is a class index (``task="multiclass"``)
or a sorted tuple of class indices, possibly empty (``task="multilabel"``, see
:mod:`finetune.data.labels`).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.data.images import IMAGE_EXTENSIONS, UnreadableImage, probe
from finetune.data.labels import rarest_label_keys
from finetune.errors import DataError

Sample = tuple["str | np.ndarray", "int | tuple[int, ...]"]
SPLITS = ("train", "val", "test")


@dataclass
class DataSplits:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    description: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    test: list[Sample] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (width, height)
    notes: list[str] = field(default_factory=list)  # the source's warnings (for the data check)
    task: str = "multiclass"  # or "multilabel": labels are tuples of class indices
    # held out of train for conformal prediction sets (trust.calibration_fraction): neither trained
    # nor used to pick the checkpoint
    calibration: list[Sample] = field(default_factory=list)
    # the rows of train stored in each chunk (streamed shards): the order reads a chunk at a time
    chunks: list[list[int]] = field(default_factory=list)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def counts(self, split: str) -> dict[str, int]:
        """Images per class (multi-label: images carrying each label) in `split`."""
        per_class = defaultdict(int)
        for _, label in getattr(self, split):
            for index in label if isinstance(label, tuple) else (label,):
                per_class[self.classes[index]] += 1
        return {c: per_class[c] for c in self.classes}


def probe_all(files: Iterable[tuple[Path, object]], skipped: list, sizes: dict) -> list[Sample]:
    """Keep the files that are images with a readable header; record sizes and skip reasons."""
    samples = []
    for path, label in files:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            reason = "file not found" if not path.exists() else f"not an image file ({path.suffix or 'no extension'})"
            skipped.append((str(path), reason))
            continue
        try:
            sizes[str(path)] = probe(path)
        except UnreadableImage as err:
            skipped.append((str(path), str(err)))
            continue
        samples.append((str(path), label))
    return samples


def split_samples(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded split stratified by class; label sets are stratified by their rarest label."""
    labels = [label for _, label in samples]
    keys = rarest_label_keys(labels) if labels and isinstance(labels[0], tuple) else labels
    train_idx, val_idx = stratified_split(keys, val_fraction, seed)
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def hold_out_calibration(splits: DataSplits, fraction: float, seed: int) -> None:
    """Move a seeded, class-stratified `fraction` of `splits.train` into `splits.calibration`
    (nothing when `fraction` is 0). A different seed stream from the validation split's, so the
    two never mirror each other."""
    if not fraction:
        return
    if splits.multilabel:
        raise DataError(
            "trust.calibration_fraction holds out images for conformal prediction sets of multi-class "
            "models; a multi-label model decides each label at its own threshold: leave it at 0."
        )
    splits.train, splits.calibration = split_samples(splits.train, fraction, seed + 7919)


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for train and validation: per class, a seeded shuffle and ``round(n * fraction)``
    held out (at least one when the class has two or more samples)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be between 0 and 1, got {val_fraction}.")
    by_class = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        indices = by_class[label]
        rng.shuffle(indices)
        n_val = round(len(indices) * val_fraction)
        if len(indices) >= 2:
            n_val = min(max(n_val, 1), len(indices) - 1)
        val += indices[:n_val]
        train += indices[n_val:]
    return sorted(train), sorted(val)


def existing_folder(base: Path, names: tuple[str, ...]) -> Path | None:
    return next((base / n for n in names if (base / n).is_dir()), None)


def resolve_path(path: str, key: str, base: Path | None = None) -> Path:
    """`path` as given (relative to the working directory), or under `base` when it is there."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None and (base / p).exists():
        p = base / p
    if not p.exists():
        raise DataError(f"{key}={path!r}: {p.resolve()} does not exist.")
    return p.resolve()
