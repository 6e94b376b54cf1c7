"""CSV / Parquet manifests: one row per image with its path, its label(s) and optionally its split.

Manifests are UTF-8 (else a DataError naming the byte offset), delimited by ``,``, ``;``, tab or
``|`` (whichever the header line uses); rows listing a file twice and paths leaving ``data.root``
become ``notes`` that the data check reports as warnings. With ``task=multilabel`` the label
column holds label sets (``data.label_sep``) or ``data.label_columns`` name one 0/1 column per
label; a single-label manifest whose cells are really sets is refused with the fix.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from finetune.data.labels import indicator_sets, looks_multilabel, split_cells
from finetune.data.samples import SPLITS, DataSplits, probe_all, resolve_path, split_samples
from finetune.errors import DataError


def load_manifest(
    manifest: str,
    root: str | None,
    path_column: str,
    label_column: str,
    split_column: str | None,
    path_template: str,
    val_fraction: float,
    seed: int,
    *,
    task: str = "multiclass",
    label_sep: str | None = None,
    label_columns: Sequence[str] | None = None,
) -> DataSplits:
    """Rows of a CSV (or Parquet) file: an image path (relative to `root`, else to the file's
    folder) formatted through `path_template` (``{}.jpg`` for ids without extension), a label
    (multi-label: a set, see the module docstring), and optionally a split (train /
    val|valid|validation / test). Without a split column, a seeded stratified split."""
    path = resolve_path(manifest, "data.csv")
    base = resolve_path(root, "data.root") if root else path.parent
    rows = _read_table(path)
    if not rows:
        raise DataError(f"{path} has no rows.")
    label_columns = list(label_columns or [])
    _check_columns(path, rows, task, [path_column] + (label_columns or [label_column]), split_column, label_columns)
    labels = _row_labels(rows, path, label_column, task, label_sep, label_columns)
    by_split, listed, outside = _group_rows(rows, labels, path, base, path_column, split_column, path_template)
    classes, encode = _label_codes(by_split, path, task, label_columns)
    skipped: list[tuple[str, str]] = []
    sizes: dict[str, tuple[int, int]] = {}
    splits = {
        split: probe_all([(file, encode(label)) for file, label in by_split[split]], skipped, sizes) for split in SPLITS
    }
    description = f"{path} ({len(rows)} rows), images under {base}"
    notes = _manifest_notes(path, base, listed, outside)
    if not split_column:
        splits["train"], splits["val"] = split_samples(splits["train"], val_fraction, seed)
        description += f", stratified {1 - val_fraction:.0%}/{val_fraction:.0%} split, seed {seed}"
    if not splits["val"]:
        raise DataError(f"{path}: no readable images in the val split.")
    return DataSplits(classes, splits["train"], splits["val"], description, skipped, splits["test"], sizes, notes, task)


def _check_columns(
    path: Path, rows: list[dict], task: str, columns: list[str], split_column: str | None, label_columns: list[str]
) -> None:
    """DataError for label columns without task=multilabel, or a column the manifest lacks."""
    if label_columns and task != "multilabel":
        raise DataError(
            f"data.label_columns={label_columns} names one 0/1 column per label: that is multi-label "
            f"data; add task=multilabel."
        )
    needed = columns + ([split_column] if split_column else [])
    for column in needed:
        if column not in rows[0]:
            raise DataError(f"{path} has no column {column!r}; its columns: {list(rows[0])}. Set data.*_column.")


def _group_rows(
    rows: list[dict],
    labels: list,
    path: Path,
    base: Path,
    path_column: str,
    split_column: str | None,
    path_template: str,
) -> tuple[dict[str, list[tuple[Path, object]]], dict[Path, int], list[str]]:
    """(split -> (file, label) rows, how often each resolved file is listed, the paths that lead
    outside `base`); DataError when the train split has no row."""
    by_split: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    listed: dict[Path, int] = defaultdict(int)
    outside = []
    for row, label in zip(rows, labels):
        split = split_name(row[split_column], path) if split_column else "train"
        file = base / path_template.format(str(row[path_column]).strip())
        resolved = file.resolve()
        listed[resolved] += 1
        if not resolved.is_relative_to(base):
            outside.append(str(row[path_column]))
        by_split[split].append((file, label))
    if not by_split["train"]:
        raise DataError(f"{path}: no rows in the train split.")
    return by_split, listed, outside


def _label_codes(by_split: dict, path: Path, task: str, label_columns: list[str]) -> tuple[list[str], Callable]:
    """(class names, label -> class index or sorted tuple of indices); DataError for a label seen
    in val/test but never in train."""

    def names(split):
        return {n for _, label in by_split[split] for n in (label if task == "multilabel" else (label,))}

    classes = label_columns or sorted(names("train"))
    unknown = sorted((names("val") | names("test")) - set(classes))
    if unknown:
        raise DataError(
            f"{path}: labels {unknown} appear in val/test but never in train. Fix the labels or add training rows."
        )
    index = {c: i for i, c in enumerate(classes)}

    def encode(label):
        return tuple(sorted(index[n] for n in label)) if task == "multilabel" else index[label]

    return classes, encode


def _row_labels(
    rows: list[dict], path: Path, label_column: str, task: str, label_sep: str | None, label_columns: list[str]
) -> list:
    """Each row's label (multiclass: the stripped cell) or label set (multilabel: a tuple of names)."""
    where = f"{path.name} column {label_column!r}"
    if task == "multilabel":
        sets = (
            indicator_sets(rows, label_columns, path.name)
            if label_columns
            else split_cells([row[label_column] for row in rows], label_sep, where)
        )
        if not any(sets):
            what = f"columns {label_columns}" if label_columns else f"column {label_column!r}"
            raise DataError(f"{path}: the label {what} is empty in every row: there is nothing to learn.")
        return sets
    cells = [str(row[label_column]).strip() for row in rows]
    found = looks_multilabel(cells, label_sep)
    if found:
        why, sep = found
        raise DataError(f"{where}: {why}: this is multi-label data; add task=multilabel data.label_sep={sep!r}.")
    return cells


def _manifest_notes(path: Path, base: Path, listed: dict[Path, int], outside: list[str]) -> list[str]:
    notes = []
    twice = {f: n for f, n in listed.items() if n > 1}
    if twice:
        first, n = next(iter(twice.items()))
        notes.append(
            f"{path.name}: {len(twice)} files are listed on more than one row ({sum(twice.values()) - len(twice)} "
            f"extra rows; they count as often as they are listed). First: {first} ({n} rows)"
        )
    if outside:
        notes.append(f"{path.name}: {len(outside)} paths lead outside data.root={base} (e.g. {outside[0]!r})")
    return notes


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            import pandas as pd

            return pd.read_parquet(path).to_dict("records")
        except ImportError as err:
            raise DataError(
                f"Reading {path.name} needs pandas and pyarrow: pip install 'finetune[parquet]' ({err})."
            ) from None
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}; Latin-1 or "
            f"Windows-1252?): re-save it as UTF-8."
        ) from None
    header = text.partition("\n")[0]
    delimiter = max(",;\t|", key=header.count) if any(d in header for d in ",;\t|") else ","
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


def split_name(value, path: Path) -> str:
    name = str(value).strip().lower()
    aliases = {
        "train": "train",
        "training": "train",
        "val": "val",
        "valid": "val",
        "validation": "val",
        "dev": "val",
        "test": "test",
    }
    if name not in aliases:
        raise DataError(f"{path}: unknown split value {value!r}; use train, val (valid, validation) or test.")
    return aliases[name]
