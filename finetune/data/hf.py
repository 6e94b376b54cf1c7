"""Hugging Face ``datasets`` as a source (``data=hf``): a dataset saved with ``save_to_disk``,
Parquet / Arrow files or a folder of them, an ``imagefolder`` folder, or a Hub id.

Nothing is copied into memory: a sample is an :class:`HFRow`, a string naming the row
(``hf://FINGERPRINT/SPLIT/INDEX``; the dataset's fingerprint changes with its content, so the name
keys the data check's and the feature cache's memory) that reads its encoded image from the
memory-mapped table when it is decoded, by the one image loader (:mod:`finetune.data.images`).
Labels: a ``ClassLabel`` column (its names are the classes), a list of ``ClassLabel``
(multi-label: ``task=multilabel``), or plain int / str values (classes named by the sorted values).
"""

from __future__ import annotations

import re
from pathlib import Path

from finetune.data.file_memo import StoredImage
from finetune.data.images import UnreadableImage, probe
from finetune.data.samples import DataSplits, Sample, split_samples
from finetune.errors import DataError

VAL_NAMES = ("validation", "valid", "val", "dev")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


class HFRow(StoredImage):
    """Row `index` of `table` (a dataset of one image column in Arrow format), named `name`."""

    def __new__(cls, name: str, table, index: int):
        row = super().__new__(cls, name)
        row.table, row.index = table, index
        return row

    def __reduce__(self):  # DataLoader workers get the memory-mapped table, not a copy of its rows
        return HFRow, (str(self), self.table, self.index)

    def encoded(self) -> bytes:
        cell = self.table[self.index].column(0)[0].as_py()
        if not cell:
            return b""
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            return Path(cell["path"]).read_bytes()  # a missing file: "file not found"
        return b""


def load_hf(cfg, seed: int, task: str = "multiclass") -> DataSplits:
    """The samples of ``data=hf``: `cfg` has path, image_column, label_column, train_split,
    val_split, test_split and val_fraction."""
    if not cfg.get("path"):
        raise DataError("data=hf needs data.path=DIR, FILE or a Hub dataset id.")
    found, where = open_dataset(str(cfg.path))
    chosen = _choose_splits(
        found, where, cfg.get("train_split") or "train", cfg.get("val_split"), cfg.get("test_split")
    )
    image_column, label_column = cfg.get("image_column", "image"), cfg.get("label_column", "label")
    for name, ds in chosen.values():
        _check_columns(ds, f"{where} split {name!r}", image_column, label_column)
    classes, encoded, multilabel = _labels({ours: ds for ours, (_, ds) in chosen.items()}, where, label_column)
    if multilabel != (task == "multilabel"):
        raise DataError(
            f"{where} column {label_column!r} is a list of class labels: multi-label data; add task=multilabel."
            if multilabel
            else f"task=multilabel needs a column of label lists; {where} column {label_column!r} holds one class "
            f"per image (a list of ClassLabel makes multi-label data)."
        )
    skipped: list[tuple[str, str]] = []
    sizes: dict[str, tuple[int, int]] = {}
    samples = {
        ours: _rows(ds, image_column, name, encoded[ours], skipped, sizes) for ours, (name, ds) in chosen.items()
    }
    description = f"{where}, splits " + ", ".join(f"{ours}={name}" for ours, (name, _) in chosen.items())
    if "val" not in samples:
        fraction = cfg.val_fraction
        samples["train"], samples["val"] = split_samples(samples["train"], fraction, seed)
        description += f", stratified {1 - fraction:.0%}/{fraction:.0%} split, seed {seed}"
    if not samples["train"]:
        raise DataError(f"{where}: no readable images in the train split.")
    return DataSplits(
        classes,
        samples["train"],
        samples["val"],
        description,
        skipped,
        samples.get("test", []),
        sizes,
        task="multilabel" if multilabel else "multiclass",
    )


def open_dataset(path: str):
    """(a Dataset or DatasetDict, how to name it in messages) for `path`: a local dataset or
    files, else a Hub id. A DataError says what is wrong, in one line."""
    try:
        import datasets
    except ImportError:
        raise DataError("data=hf needs the 'datasets' package: pip install 'finetune[hf]'.") from None
    local = Path(path).expanduser()
    where = f"data.path={path!r}"
    if local.exists():
        local = local.resolve()
        try:
            return _open_local(datasets, local), where
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"{where}: {local} is not a dataset datasets can read ({_first_line(err)}).") from None
    if not _HUB_ID.match(path) or Path(path).suffix in _FILE_BUILDERS:
        raise DataError(f"{where}: {local.absolute()} does not exist (and it is not a Hub dataset id).")
    try:
        return datasets.load_dataset(path), where
    except Exception as err:
        raise DataError(
            f"{where} is not a local path, and the Hub could not give the dataset {path!r}: {_first_line(err)}"
        ) from None


def _open_local(datasets, local: Path):
    if local.is_file():
        builder = _FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise DataError(
                f"data.path={str(local)!r}: a file must be .parquet or .arrow; for images give their folder."
            )
        return datasets.load_dataset(builder, data_files=str(local))
    if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(local))  # written by save_to_disk
    return datasets.load_dataset(str(local))  # Parquet / Arrow files, or an imagefolder


def _first_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _choose_splits(found, where: str, train: str, val: str | None, test: str | None) -> dict:
    """Our split name (train / val / test) -> (the dataset's name for it, the split); DataError
    for a named split the dataset lacks. Without a val split, the caller splits train."""
    if not hasattr(found, "keys"):  # a single Dataset: it is the train split
        if val or test:
            raise DataError(f"{where} holds one split (no splits named {val or test!r}); leave data.*_split unset.")
        return {"train": ("train", found)}
    names = list(found.keys())

    def named(name: str, key: str):
        if name not in found:
            raise DataError(f"{where} has no split {name!r} ({key}); its splits: {names}.")
        return name, found[name]

    chosen = {"train": named(train, "data.train_split")}
    val = val or next((n for n in VAL_NAMES if n in found), None)
    if val:
        chosen["val"] = named(val, "data.val_split")
    test = test or ("test" if "test" in found else None)
    if test:
        chosen["test"] = named(test, "data.test_split")
    return chosen


def _check_columns(ds, where: str, image_column: str, label_column: str) -> None:
    import datasets

    for column, key in ((image_column, "data.image_column"), (label_column, "data.label_column")):
        if column not in ds.column_names:
            raise DataError(f"{where} has no column {column!r} ({key}); its columns: {ds.column_names}.")
    feature = ds.features[image_column]
    if not isinstance(feature, datasets.Image):
        raise DataError(
            f"{where} column {image_column!r} holds {feature}, not images; cast it: "
            f"ds.cast_column({image_column!r}, datasets.Image()), or set data.image_column."
        )


def _label_kind(feature, where: str, column: str) -> tuple[str, list[str] | None]:
    """('class' | 'list' | 'value', ClassLabel names or None) of a label column's feature."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return "class", list(feature.names)
    inner = getattr(feature, "feature", None)
    if isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)) and isinstance(
        inner, datasets.ClassLabel
    ):
        return "list", list(inner.names)
    if isinstance(feature, datasets.Value) and (
        feature.dtype.startswith(("int", "uint")) or feature.dtype in ("string", "large_string")
    ):
        return "value", None
    raise DataError(
        f"{where} column {column!r} holds {feature}, not class labels (ClassLabel, a list of ClassLabel, int or "
        f"str); set data.label_column."
    )


def _labels(chosen: dict, where: str, column: str) -> tuple[list[str], dict[str, list], bool]:
    """(class names, split -> each row's label (index or sorted tuple; None: unlabelled), multi-label?)."""
    kinds = {
        split: _label_kind(ds.features[column], f"{where} split {split!r}", column) for split, ds in chosen.items()
    }
    kind, names = kinds["train"]
    # One Arrow column per split: `ds[column]` formats the rows one by one (2.6 s for 100,000 here).
    values = {split: ds.with_format("arrow")[column].to_pylist() for split, ds in chosen.items()}
    if kind == "value":
        seen = sorted({v for v in values["train"] if v is not None}, key=lambda v: (isinstance(v, str), v))
        names = [str(v) for v in seen]
    index = {n: i for i, n in enumerate(names)}
    encoded, unknown = {}, set()
    for split, cells in values.items():
        own = kinds[split][1]

        def name(value, own=own):
            return own[value] if own is not None else str(value)

        rows = []
        for cell in cells:
            if cell is None or (kind != "list" and isinstance(cell, int) and own is not None and cell < 0):
                rows.append(None)  # ClassLabel's -1: no label
            elif kind == "list":
                unknown |= {name(v) for v in cell} - index.keys()
                rows.append(tuple(sorted({index.get(name(v), -1) for v in cell})))
            else:
                unknown |= {name(cell)} - index.keys()
                rows.append(index.get(name(cell)))
        encoded[split] = rows
    if unknown:
        raise DataError(f"{where}: labels {sorted(unknown)} appear in val/test but never in train. Fix the labels.")
    return names, encoded, kind == "list"


def _rows(ds, image_column: str, split: str, labels: list, skipped: list, sizes: dict) -> list[Sample]:
    """The split's rows as (HFRow, label); rows without a label or a readable image header go to
    `skipped` (name, reason), header sizes to `sizes`."""
    table = ds.select_columns([image_column]).with_format("arrow")
    fingerprint = ds._fingerprint
    samples = []
    for index, label in enumerate(labels):
        row = HFRow(f"hf://{fingerprint}/{split}/{index}", table, index)
        if label is None:
            skipped.append((str(row), "no label"))
            continue
        try:
            sizes[str(row)] = probe(row)
        except UnreadableImage as err:
            skipped.append((str(row), str(err)))
            continue
        samples.append((row, label))
    return samples
