"""Where samples come from: scikit-learn's digits, or folders of class folders.

Every source returns :class:`DataSplits`: the class names (label order), train and validation
samples as ``(path_or_array, label)``, and the files that were skipped with the reason.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.images import IMAGE_EXTENSIONS
from finetune.errors import DataError

Sample = tuple["str | np.ndarray", int]


@dataclass
class DataSplits:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    description: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def counts(self, split: str) -> dict[str, int]:
        per_class = defaultdict(int)
        for _, label in getattr(self, split):
            per_class[self.classes[label]] += 1
        return {c: per_class[c] for c in self.classes}


def load_digits(val_fraction: float, seed: int) -> DataSplits:
    """scikit-learn's 1,797 handwritten 8x8 digits as uint8 RGB arrays, split stratified."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values are 0..16
    samples = [(np.repeat(img[..., None], 3, axis=2), int(t)) for img, t in zip(images, bunch.target)]
    train_idx, val_idx = stratified_split([t for _, t in samples], val_fraction, seed)
    return DataSplits(
        classes=[str(d) for d in range(10)],
        train=[samples[i] for i in train_idx],
        val=[samples[i] for i in val_idx],
        description=f"scikit-learn digits (8x8), stratified {1 - val_fraction:.0%}/{val_fraction:.0%} split, seed {seed}",
    )


def load_folder(
    root: str | None, train_dir: str | None, val_dir: str | None, val_fraction: float, seed: int
) -> DataSplits:
    """Class folders: ROOT/train + ROOT/val, explicit train_dir/val_dir (absolute or under ROOT),
    or a single folder of class folders split stratified by `val_fraction` with `seed`."""
    base = _resolve(root, "data.root") if root else None
    train_path = _resolve(train_dir, "data.train_dir", base) if train_dir else None
    val_path = _resolve(val_dir, "data.val_dir", base) if val_dir else None
    if base is None and train_path is None:
        raise DataError("data=folder needs data.root=DIR (or data.train_dir=DIR).")
    if train_path is None and (base / "train").is_dir():
        train_path = base / "train"
    if val_path is None and train_path is not None and base is not None:
        for name in ("val", "valid", "validation"):
            if (base / name).is_dir() and base / name != train_path:
                val_path = base / name
                break

    if train_path is None:  # ROOT holds the class folders themselves
        classes, samples, skipped = scan_class_folders(base)
        train_idx, val_idx = stratified_split([label for _, label in samples], val_fraction, seed)
        return DataSplits(
            classes,
            [samples[i] for i in train_idx],
            [samples[i] for i in val_idx],
            f"{base}, stratified {1 - val_fraction:.0%}/{val_fraction:.0%} split, seed {seed}",
            skipped,
        )

    classes, train, skipped = scan_class_folders(train_path)
    if val_path is None:
        train_idx, val_idx = stratified_split([label for _, label in train], val_fraction, seed)
        return DataSplits(
            classes,
            [train[i] for i in train_idx],
            [train[i] for i in val_idx],
            f"{train_path}, no validation folder: stratified {val_fraction:.0%} held out, seed {seed}",
            skipped,
        )
    val_classes, val, val_skipped = scan_class_folders(val_path, allow_empty=True)
    unknown = [c for c in val_classes if c not in classes]
    if unknown:
        raise DataError(
            f"Validation folder {val_path} has classes that training lacks: {unknown}. "
            f"Training classes: {classes}. Rename or remove those folders."
        )
    index = {c: i for i, c in enumerate(classes)}
    val = [(path, index[val_classes[label]]) for path, label in val]  # map by name, not position
    if not val:
        raise DataError(f"Validation folder {val_path} holds no images.")
    return DataSplits(classes, train, val, f"train {train_path}, val {val_path}", skipped + val_skipped)


def scan_class_folders(directory: Path, allow_empty: bool = False) -> tuple[list[str], list[Sample], list]:
    """Classes are the non-hidden subfolders of `directory` (sorted); samples the image files in
    them (recursively). Files that are not images or whose header cannot be read are skipped."""
    if not directory.is_dir():
        raise DataError(f"{directory} is not a folder.")
    class_dirs = sorted(
        d for d in directory.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))
    )
    if not class_dirs:
        raise DataError(
            f"{directory} has no class folders. Expected {directory}/<class name>/<image files>."
        )
    classes = [d.name for d in class_dirs]
    samples, skipped = [], []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(class_dir).parts):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append((str(path), f"not an image file ({path.suffix or 'no extension'})"))
                continue
            reason = _unreadable(path)
            if reason:
                skipped.append((str(path), reason))
                continue
            samples.append((str(path), label))
    if not samples and not allow_empty:
        raise DataError(f"No readable images under {directory} (skipped {len(skipped)} files).")
    return classes, samples, skipped


def _unreadable(path: Path) -> str | None:
    """Why the file's header cannot be read as an image, or None (a cheap check: no decode)."""
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - reading the header is the check
    except Exception as err:
        return f"unreadable image: {type(err).__name__}: {err}"
    return None


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


def _resolve(path: str, key: str, base: Path | None = None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = (base / p) if base is not None and (base / p).exists() else p.resolve()
    if not p.exists():
        raise DataError(f"{key}={path!r}: {p} does not exist.")
    return p.resolve()
