"""CSV manifests, test splits, class imbalance options and the data check's fatal errors."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import QUICK, TINY, write_class_folders

from finetune import fit
from finetune.data.check import check_data
from finetune.data.datamodule import ImageDataModule, class_weights
from finetune.data.sources import DataSplits, load_manifest
from finetune.errors import DataError


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    return write_class_folders(tmp_path / "images", classes=("cat", "dog"), per_class=6)


def rows_for(images: Path, with_split: bool = True, strip_extension: bool = False) -> list[dict]:
    rows = []
    for path in sorted(images.rglob("*.jpg")):
        rel = str(path.relative_to(images))
        row = {"file": rel[:-4] if strip_extension else rel, "species": path.parent.name}
        if with_split:
            row["subset"] = "validation" if path.stem.endswith(("_0", "_1")) else "train"
        rows.append(row)
    return rows


def test_manifest_with_split_column_and_custom_columns(images, tmp_path):
    manifest = write_manifest(tmp_path / "labels.csv", rows_for(images))
    splits = load_manifest(str(manifest), str(images), "file", "species", "subset", "{}", 0.2, seed=0)
    assert splits.classes == ["cat", "dog"]
    assert (len(splits.train), len(splits.val)) == (8, 4)
    assert all(splits.classes[label] in path for path, label in splits.train + splits.val)


def test_manifest_without_split_column_gets_a_stratified_split_and_ids_get_a_template(images, tmp_path):
    manifest = write_manifest(tmp_path / "ids.csv", rows_for(images, with_split=False, strip_extension=True))
    splits = load_manifest(str(manifest), str(images), "file", "species", None, "{}.jpg", 0.5, seed=3)
    assert Counter(label for _, label in splits.val) == {0: 3, 1: 3}
    assert not splits.skipped


def test_manifest_paths_default_to_the_manifest_folder_and_missing_files_are_counted(images):
    rows = rows_for(images) + [{"file": "cat/gone.jpg", "species": "cat", "subset": "train"}]
    manifest = write_manifest(images / "labels.csv", rows)
    splits = load_manifest(str(manifest), None, "file", "species", "subset", "{}", 0.2, seed=0)
    assert splits.skipped == [(str(images / "cat" / "gone.jpg"), "file not found")]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda rows: [{**r, "subset": "holdout"} for r in rows], "unknown split value"),
        (lambda rows: rows + [{"file": "cat/cat_0.jpg", "species": "fox", "subset": "val"}], "never in train"),
        (lambda rows: [{k: v for k, v in r.items() if k != "species"} for r in rows], "no column 'species'"),
    ],
)
def test_manifest_mistakes_say_what_to_fix(images, tmp_path, change, message):
    manifest = write_manifest(tmp_path / "labels.csv", change(rows_for(images)))
    with pytest.raises(DataError, match=message):
        load_manifest(str(manifest), str(images), "file", "species", "subset", "{}", 0.2, seed=0)


def test_fit_from_a_manifest_and_scores_its_test_split(images, tmp_path):
    rows = rows_for(images)
    for row in rows:
        if row["file"].endswith("_5.jpg"):
            row["subset"] = "test"
    manifest = write_manifest(tmp_path / "labels.csv", rows)
    result = fit(
        "freeze_all_but_head",
        TINY
        + QUICK
        + [
            "data=csv",
            f"data.csv={manifest}",
            f"data.root={images}",
            "data.path_column=file",
            "data.label_column=species",
            "data.split_column=subset",
            f"hydra.run.dir={tmp_path}/run",
        ],
    )
    assert result.classes == ["cat", "dog"]
    assert result.data_report.counts["test"] == {"cat": 1, "dog": 1}
    assert "test/acc" in result.metrics and "test/loss" in result.metrics


def test_folder_with_a_test_split(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        write_class_folders(root / split, classes=("a", "b"), per_class=n, seed=n)
    result = fit(None, TINY + QUICK + ["data=folder", f"data.root={root}", f"hydra.run.dir={tmp_path}/run"])
    assert result.data_report.counts["test"] == {"a": 2, "b": 2}
    assert 0.0 <= result.metrics["test/acc"] <= 1.0


def imbalanced() -> DataSplits:
    train = [("a.jpg", 0)] * 90 + [("b.jpg", 1)] * 10
    return DataSplits(["a", "b"], train, [("c.jpg", 0), ("d.jpg", 1)], "imbalanced")


def test_class_weights_are_inverse_frequency():
    weights = class_weights(imbalanced())
    assert weights.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])


def test_balanced_sampler_draws_classes_equally_often():
    data = ImageDataModule(
        imbalanced(), lambda image: image, lambda image: image, batch_size=10, num_workers=0, balance="sampler", seed=0
    )
    sampler = data.train_dataloader().sampler
    drawn = Counter()
    for epoch in range(20):  # an epoch's draws are a function of (seed, epoch): a new epoch, new draws
        sampler.set_epoch(epoch)
        drawn.update(imbalanced().train[i][1] for _, i in sampler)
    assert 0.4 < drawn[1] / sum(drawn.values()) < 0.6


def test_weighted_loss_reaches_the_training_loss(image_folder, tmp_path):
    result = fit(
        "freeze_all_but_head",
        TINY
        + QUICK
        + ["data=folder", f"data.root={image_folder}", "data.balance=weighted_loss", f"hydra.run.dir={tmp_path}"],
    )
    assert "val/acc" in result.metrics
    with pytest.raises(Exception, match="data.balance"):
        fit(
            "freeze_all_but_head",
            TINY
            + QUICK
            + ["data=folder", f"data.root={image_folder}", "data.balance=sometimes", f"hydra.run.dir={tmp_path}/2"],
        )


def test_empty_split_is_fatal_and_missing_class_is_a_warning():
    with pytest.raises(DataError, match="val split is empty"):
        check_data(DataSplits(["a", "b"], [("x", 0)], [], "no val"))
    zeros, ones = np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8)
    splits = DataSplits(["a", "b"], [(zeros, 0), (ones, 1)], [(zeros.copy(), 0)], "b has no val")
    report = check_data(splits)
    assert any("'b' has no val" in w for w in report.warnings)
    assert report.duplicates  # the identical zero arrays
