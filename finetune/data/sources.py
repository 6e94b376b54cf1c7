"""Where samples come from: scikit-learn's digits, folders of class folders, a CSV manifest
(:mod:`finetune.data.manifest`), a Hugging Face dataset (:mod:`finetune.data.hf`) or streamed
shards (:mod:`finetune.data.stream`).

Every source returns :class:`~finetune.data.samples.DataSplits`. Labels are mapped by class
name, never by position, so a validation folder listing classes in another order is safe.
A class folder without one readable training image is a DataError (never a class with nothing
to learn from).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune.data import file_memo
from finetune.data.manifest import load_manifest
from finetune.data.samples import (
    SPLITS,
    DataSplits,
    Sample,
    existing_folder,
    probe_all,
    resolve_path,
    split_samples,
    stratified_split,
)
from finetune.errors import ConfigError, DataError

__all__ = [
    "SPLITS",
    "DataSplits",
    "Sample",
    "load_data",
    "load_digits",
    "load_folder",
    "load_manifest",
    "relabel",
    "scan_class_folders",
    "stratified_split",
]


def load_data(cfg, seed: int, task: str = "multiclass") -> DataSplits:
    """The samples the ``data`` config group describes (``data=digits|folder|csv|hf``) for `task`
    (``multilabel``: a manifest's label sets or a dataset's lists of class labels; folders and
    digits hold one class per image). Per-file work (header probes, content hashes) is remembered
    in ``cfg.cache.dir`` for the next process on the same files."""
    file_memo.keep_in(cfg.cache.dir if cfg.get("cache") and cfg.cache.get("dir") else None)
    if cfg.name == "hf":
        from finetune.data.hf import load_hf  # imports datasets only when asked

        return load_hf(cfg, seed, task)
    if cfg.name == "stream":
        from finetune.data.stream import load_stream  # imports LitData only when asked

        return load_stream(cfg, seed, task)
    if task == "multilabel" and cfg.name != "csv":
        raise ConfigError(
            f"task=multilabel needs a manifest whose rows list several labels (data=csv "
            f"data.label_sep=' ' or data.label_columns=[...]); data={cfg.name} holds one class per image."
        )
    if cfg.name == "digits":
        return load_digits(cfg.val_fraction, seed)
    if cfg.name == "folder":
        return load_folder(cfg.root, cfg.train_dir, cfg.val_dir, cfg.val_fraction, seed, cfg.get("test_dir"))
    if cfg.name == "csv":
        return load_manifest(
            cfg.csv,
            cfg.root,
            cfg.path_column,
            cfg.label_column,
            cfg.split_column,
            cfg.path_template,
            cfg.val_fraction,
            seed,
            task=task,
            label_sep=cfg.get("label_sep"),
            label_columns=cfg.get("label_columns"),
        )
    raise ConfigError(f"data.name={cfg.name!r}; choose data=digits, data=folder, data=csv, data=hf or data=stream.")


def load_digits(val_fraction: float, seed: int) -> DataSplits:
    """scikit-learn's 1,797 handwritten 8x8 digits as uint8 RGB arrays, split stratified."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values are 0..16
    samples = [(np.repeat(img[..., None], 3, axis=2), int(t)) for img, t in zip(images, bunch.target)]
    train, val = split_samples(samples, val_fraction, seed)
    return DataSplits(
        classes=[str(d) for d in range(10)],
        train=train,
        val=val,
        description=f"scikit-learn digits (8x8), stratified {1 - val_fraction:.0%}/{val_fraction:.0%} split, "
        f"seed {seed}",
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
    base = resolve_path(root, "data.root") if root else None
    train_path = resolve_path(train_dir, "data.train_dir", base) if train_dir else None
    val_path = resolve_path(val_dir, "data.val_dir", base) if val_dir else None
    test_path = resolve_path(test_dir, "data.test_dir", base) if test_dir else None
    if base is None and train_path is None:
        raise DataError("data=folder needs data.root=DIR (or data.train_dir=DIR).")
    if base is not None:
        train_path = train_path or existing_folder(base, ("train", "training"))
        if train_path is not None:
            val_path = val_path or existing_folder(base, ("val", "valid", "validation"))
            test_path = test_path or existing_folder(base, ("test",))

    skipped: list[tuple[str, str]] = []
    sizes: dict[str, tuple[int, int]] = {}
    source = train_path or base  # without a train folder, ROOT holds the class folders
    classes, train = scan_class_folders(source, skipped, sizes)
    if val_path is None:
        train, val = split_samples(train, val_fraction, seed)
        description = f"{source}, stratified {1 - val_fraction:.0%}/{val_fraction:.0%} split, seed {seed}"
    else:
        val = _scan_by_name(val_path, classes, "Validation", skipped, sizes)
        description = f"train {train_path}, val {val_path}"
    test = _scan_by_name(test_path, classes, "Test", skipped, sizes) if test_path else []
    if test_path:
        description += f", test {test_path}"
    return DataSplits(classes, train, val, description, skipped, test, sizes)


def scan_class_folders(
    directory: Path, skipped: list, sizes: dict, allow_empty: bool = False
) -> tuple[list[str], list[Sample]]:
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
    samples = probe_all(files, skipped, sizes)
    if not samples and not allow_empty:
        raise DataError(f"No readable images under {directory} ({len(files)} files, all skipped).")
    empty = sorted(set(range(len(classes))) - {label for _, label in samples})
    if empty and not allow_empty:
        names = [str(class_dirs[i]) for i in empty]
        raise DataError(
            f"Class folder {names[0]} has no readable training images"
            + (f" (nor {len(names) - 1} more: {names[1:4]})" if len(names) > 1 else "")
            + ": add images, or move the folder out of the training folder."
        )
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
