"""Where samples come from: scikit-learn's digits, folders of class folders, or a CSV manifest.

Every source returns :class:`DataSplits`: the class names (label order, taken from the training
split), train / validation (/ test) samples as ``(path_or_array, label)``, the image sizes read
from file headers, and the files that were skipped with the reason. Labels are mapped by class
name, never by position, so a validation folder listing classes in another order is safe.
A class folder without one readable training image is a DataError (never a class with nothing
to learn from). Manifests are UTF-8 (else a DataError naming the byte offset), delimited by
``,``, ``;``, tab or ``|`` (whichever the header line uses); rows listing a file twice and paths
leaving ``data.root`` become ``notes`` that the data check reports as warnings.
"""

from __future__ import annotations

import codecs
import csv
import io
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.data.images import IMAGE_EXTENSIONS, UnreadableImage, probe
from finetune.errors import ConfigError, DataError

Sample = tuple["str | np.ndarray", int]
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

    def counts(self, split: str) -> dict[str, int]:
        per_class = defaultdict(int)
        for _, label in getattr(self, split):
            per_class[self.classes[label]] += 1
        return {c: per_class[c] for c in self.classes}


def load_data(cfg, seed: int) -> DataSplits:
    """The samples the ``data`` config group describes (``data=digits|folder|csv``)."""
    if cfg.name == "digits":
        return load_digits(cfg.val_fraction, seed)
    if cfg.name == "folder":
        return load_folder(cfg.root, cfg.train_dir, cfg.val_dir, cfg.val_fraction, seed, cfg.get("test_dir"))
    if cfg.name == "csv":
        return load_manifest(cfg.csv, cfg.root, cfg.path_column, cfg.label_column, cfg.split_column,
                             cfg.path_template, cfg.val_fraction, seed)
    raise ConfigError(f"data.name={cfg.name!r}; choose data=digits, data=folder or data=csv.")


def load_digits(val_fraction: float, seed: int) -> DataSplits:
    """scikit-learn's 1,797 handwritten 8x8 digits as uint8 RGB arrays, split stratified."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values are 0..16
    samples = [(np.repeat(img[..., None], 3, axis=2), int(t)) for img, t in zip(images, bunch.target)]
    train, val = _split(samples, val_fraction, seed)
    return DataSplits(
        classes=[str(d) for d in range(10)],
        train=train,
        val=val,
        description=f"scikit-learn digits (8x8), stratified {1 - val_fraction:.0%}/{val_fraction:.0%} split, seed {seed}",
    )


# ---------------------------------------------------------------------------------------------
# Folders


def load_folder(
    root: str | None,
    train_dir: str | None,
    val_dir: str | None,
    val_fraction: float,
    seed: int,
    test_dir: str | None = None,
) -> DataSplits:
    """Class folders: ROOT/train + ROOT/val (+ ROOT/test), explicit train_dir/val_dir/test_dir
    (absolute or under ROOT), or a single folder of class folders split stratified by
    `val_fraction` with `seed`."""
    base = _resolve(root, "data.root") if root else None
    train_path = _resolve(train_dir, "data.train_dir", base) if train_dir else None
    val_path = _resolve(val_dir, "data.val_dir", base) if val_dir else None
    test_path = _resolve(test_dir, "data.test_dir", base) if test_dir else None
    if base is None and train_path is None:
        raise DataError("data=folder needs data.root=DIR (or data.train_dir=DIR).")
    if base is not None:
        train_path = train_path or _existing(base, ("train", "training"))
        if train_path is not None:
            val_path = val_path or _existing(base, ("val", "valid", "validation"))
            test_path = test_path or _existing(base, ("test",))

    skipped: list[tuple[str, str]] = []
    sizes: dict[str, tuple[int, int]] = {}
    source = train_path or base  # without a train folder, ROOT holds the class folders
    classes, train = scan_class_folders(source, skipped, sizes)
    if val_path is None:
        train, val = _split(train, val_fraction, seed)
        description = f"{source}, stratified {1 - val_fraction:.0%}/{val_fraction:.0%} split, seed {seed}"
    else:
        val = _scan_by_name(val_path, classes, "Validation", skipped, sizes)
        description = f"train {train_path}, val {val_path}"
    test = _scan_by_name(test_path, classes, "Test", skipped, sizes) if test_path else []
    if test_path:
        description += f", test {test_path}"
    return DataSplits(classes, train, val, description, skipped, test, sizes)


def scan_class_folders(directory: Path, skipped: list, sizes: dict, allow_empty: bool = False) -> tuple[list[str], list[Sample]]:
    """Classes are the non-hidden subfolders of `directory` (sorted); samples the image files in
    them (recursively). Non-images and files whose header cannot be read go to `skipped`."""
    if not directory.is_dir():
        raise DataError(f"{directory} is not a folder.")
    class_dirs = sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))
    if not class_dirs:
        raise DataError(f"{directory} has no class folders. Expected {directory}/<class name>/<image files>.")
    classes = [d.name for d in class_dirs]
    files = []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file():
                continue
            if any(part.startswith(".") for part in path.relative_to(class_dir).parts):
                skipped.append((str(path), "hidden file"))  # .DS_Store, .ipynb_checkpoints/...
            else:
                files.append((path, label))
    samples = _probe_all(files, skipped, sizes)
    if not samples and not allow_empty:
        raise DataError(f"No readable images under {directory} ({len(files)} files, all skipped).")
    empty = sorted(set(range(len(classes))) - {label for _, label in samples})
    if empty and not allow_empty:
        names = [str(class_dirs[i]) for i in empty]
        raise DataError(f"Class folder {names[0]} has no readable training images"
                        + (f" (nor {len(names) - 1} more: {names[1:4]})" if len(names) > 1 else "")
                        + ": add images, or move the folder out of the training folder.")
    return classes, samples


def _scan_by_name(directory: Path, classes: list[str], what: str, skipped: list, sizes: dict) -> list[Sample]:
    """Samples of another split, labelled by the training class of the same folder name."""
    found, samples = scan_class_folders(directory, skipped, sizes, allow_empty=True)
    samples = relabel(samples, found, classes, f"{what} folder {directory}", "training")
    if not samples:
        raise DataError(f"{what} folder {directory} holds no readable images.")
    return samples


def relabel(samples: list[Sample], found: list[str], classes: list[str], where: str, owner: str) -> list[Sample]:
    """Samples labelled by position in `found` -> labelled by the class of the same name in
    `classes` (of `owner`: training, the model). A class `owner` lacks is a DataError."""
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(
            f"{where} has classes that {owner} lacks: {unknown}. {owner.capitalize()} classes: {classes}. "
            f"Rename or remove those folders."
        )
    index = {c: i for i, c in enumerate(classes)}
    return [(item, index[found[label]]) for item, label in samples]


# ---------------------------------------------------------------------------------------------
# CSV / Parquet manifests


def load_manifest(
    manifest: str,
    root: str | None,
    path_column: str,
    label_column: str,
    split_column: str | None,
    path_template: str,
    val_fraction: float,
    seed: int,
) -> DataSplits:
    """Rows of a CSV (or Parquet) file: an image path (relative to `root`, else to the file's
    folder) formatted through `path_template` (``{}.jpg`` for ids without extension), a label,
    and optionally a split (train / val|valid|validation / test). Without a split column, a
    seeded stratified split."""
    path = _resolve(manifest, "data.csv")
    base = _resolve(root, "data.root") if root else path.parent
    rows = _read_table(path)
    if not rows:
        raise DataError(f"{path} has no rows.")
    for column in (path_column, label_column) + ((split_column,) if split_column else ()):
        if column not in rows[0]:
            raise DataError(f"{path} has no column {column!r}; its columns: {list(rows[0])}. Set data.*_column.")
    by_split: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    listed: dict[Path, int] = defaultdict(int)
    outside = []
    for row in rows:
        split = _split_name(row[split_column], path) if split_column else "train"
        file = base / path_template.format(str(row[path_column]).strip())
        resolved = file.resolve()
        listed[resolved] += 1
        if not resolved.is_relative_to(base):
            outside.append(str(row[path_column]))
        by_split[split].append((file, str(row[label_column]).strip()))
    if not by_split["train"]:
        raise DataError(f"{path}: no rows in the train split.")

    classes = sorted({label for _, label in by_split["train"]})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({label for split in ("val", "test") for _, label in by_split[split]} - set(classes))
    if unknown:
        raise DataError(f"{path}: labels {unknown} appear in val/test but never in train. Fix the labels or add training rows.")
    skipped: list[tuple[str, str]] = []
    sizes: dict[str, tuple[int, int]] = {}
    splits = {
        split: _probe_all([(file, index[label]) for file, label in by_split[split]], skipped, sizes)
        for split in SPLITS
    }
    description = f"{path} ({len(rows)} rows), images under {base}"
    notes = _manifest_notes(path, base, listed, outside)
    if not split_column:
        splits["train"], splits["val"] = _split(splits["train"], val_fraction, seed)
        description += f", stratified {1 - val_fraction:.0%}/{val_fraction:.0%} split, seed {seed}"
    if not splits["val"]:
        raise DataError(f"{path}: no readable images in the val split.")
    return DataSplits(classes, splits["train"], splits["val"], description, skipped, splits["test"], sizes, notes)


def _manifest_notes(path: Path, base: Path, listed: dict[Path, int], outside: list[str]) -> list[str]:
    notes = []
    twice = {f: n for f, n in listed.items() if n > 1}
    if twice:
        first, n = next(iter(twice.items()))
        notes.append(f"{path.name}: {len(twice)} files are listed on more than one row ({sum(twice.values()) - len(twice)} "
                     f"extra rows; they count as often as they are listed). First: {first} ({n} rows)")
    if outside:
        notes.append(f"{path.name}: {len(outside)} paths lead outside data.root={base} (e.g. {outside[0]!r})")
    return notes


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            import pandas as pd

            return pd.read_parquet(path).to_dict("records")
        except ImportError as err:
            raise DataError(f"Reading {path.name} needs pandas and pyarrow: pip install 'finetune[parquet]' ({err}).") from None
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start
        raise DataError(f"{path} is not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}; Latin-1 or "
                        f"Windows-1252?): re-save it as UTF-8.") from None
    header = text.partition("\n")[0]
    delimiter = max(",;\t|", key=header.count) if any(d in header for d in ",;\t|") else ","
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


def _split_name(value, path: Path) -> str:
    name = str(value).strip().lower()
    aliases = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test"}
    if name not in aliases:
        raise DataError(f"{path}: unknown split value {value!r}; use train, val (valid, validation) or test.")
    return aliases[name]


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _probe_all(files: Iterable[tuple[Path, int]], skipped: list, sizes: dict) -> list[Sample]:
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


def _split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    train_idx, val_idx = stratified_split([label for _, label in samples], val_fraction, seed)
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


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


def _existing(base: Path, names: tuple[str, ...]) -> Path | None:
    return next((base / n for n in names if (base / n).is_dir()), None)


def _resolve(path: str, key: str, base: Path | None = None) -> Path:
    """`path` as given (relative to the working directory), or under `base` when it is there."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None and (base / p).exists():
        p = base / p
    if not p.exists():
        raise DataError(f"{key}={path!r}: {p.resolve()} does not exist.")
    return p.resolve()
