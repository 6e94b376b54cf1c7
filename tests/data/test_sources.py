"""Data sources, splits, the image loader and the pipelines."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_class_folders
from PIL import Image

from finetune.data.check import check_data
from finetune.data.images import load_rgb, probe
from finetune.data.sources import load_digits, load_folder, stratified_split
from finetune.data.transforms import build_transforms
from finetune.errors import DataError


def test_train_and_val_folders(image_folder):
    splits = load_folder(str(image_folder), None, None, 0.2, seed=0)
    assert splits.classes == ["ants", "bees", "wasps"]
    assert len(splits.train) == 24 and len(splits.val) == 12
    assert all("/val/" in path for path, _ in splits.val)


def test_explicit_train_and_val_dirs_relative_to_root(tmp_path):
    write_class_folders(tmp_path / "training_set", per_class=3)
    write_class_folders(tmp_path / "test_set", per_class=2)
    splits = load_folder(str(tmp_path), "training_set", "test_set", 0.2, seed=0)
    assert (len(splits.train), len(splits.val)) == (9, 6)


def test_single_folder_gets_a_seeded_stratified_split(tmp_path):
    write_class_folders(tmp_path, classes=("a", "b"), per_class=10)
    first = load_folder(str(tmp_path), None, None, 0.3, seed=7)
    again = load_folder(str(tmp_path), None, None, 0.3, seed=7)
    other = load_folder(str(tmp_path), None, None, 0.3, seed=8)
    assert first.val == again.val and first.val != other.val
    assert Counter(label for _, label in first.val) == {0: 3, 1: 3}
    assert not {p for p, _ in first.train} & {p for p, _ in first.val}


def test_stratified_split_keeps_every_class_in_both_splits_when_it_can():
    labels = [0] * 2 + [1] * 50 + [2]
    train, val = stratified_split(labels, 0.1, seed=0)
    assert sorted(train + val) == list(range(len(labels)))
    assert {labels[i] for i in val} == {0, 1} and {labels[i] for i in train} == {0, 1, 2}
    with pytest.raises(DataError, match="val_fraction"):
        stratified_split(labels, 1.0, seed=0)


def test_hidden_folders_are_not_classes_and_bad_files_are_skipped_and_counted(image_folder):
    train = image_folder / "train"
    (train / ".ipynb_checkpoints").mkdir()
    (train / "__MACOSX").mkdir()
    (train / "ants" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (train / "ants" / "notes.txt").write_text("not an image")
    (train / "ants" / "empty.jpg").write_bytes(b"")
    (train / "bees" / "fake.jpg").write_text("<html>404</html>")
    splits = load_folder(str(image_folder), None, None, 0.2, seed=0)
    assert splits.classes == ["ants", "bees", "wasps"]
    skipped = {path.split("/")[-1]: reason for path, reason in splits.skipped}
    assert set(skipped) == {".DS_Store", "notes.txt", "empty.jpg", "fake.jpg"}
    assert skipped[".DS_Store"] == "hidden file"
    assert skipped["empty.jpg"] == "empty file" and "not a readable image" in skipped["fake.jpg"]
    assert len(splits.train) == 24


def test_validation_classes_map_by_name_not_position(tmp_path):
    write_class_folders(tmp_path / "train", classes=("ants", "bees", "wasps"), per_class=2)
    write_class_folders(tmp_path / "val", classes=("bees", "wasps"), per_class=2)  # no ants
    splits = load_folder(str(tmp_path), None, None, 0.2, seed=0)
    for path, label in splits.val:
        assert f"/{splits.classes[label]}/" in path


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: (root / "train").mkdir(parents=True), "no class folders"),
        (
            lambda root: (
                write_class_folders(root / "train", per_class=1)
                and write_class_folders(root / "val", classes=("moths",), per_class=1)
            ),
            "classes that training lacks",
        ),
    ],
)
def test_fatal_data_problems_stop_with_a_message(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        load_folder(str(root), None, None, 0.2, seed=0)


def test_digits_are_real_and_split_stratified():
    splits = load_digits(0.2, seed=0)
    assert splits.classes == [str(d) for d in range(10)]
    assert len(splits.train) + len(splits.val) == 1797
    image, _ = splits.train[0]
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and image.max() > 200
    assert min(splits.counts("val").values()) >= 30


def test_loader_converts_every_mode_to_upright_rgb(tmp_path):
    gray = Image.fromarray(np.full((4, 6), 128, np.uint8), "L")
    gray.save(tmp_path / "gray.png")
    wide = Image.fromarray(np.full((4, 6), 65535, np.uint16))
    wide.save(tmp_path / "wide.png")
    rgba = Image.new("RGBA", (6, 4), (255, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    rotated = Image.new("RGB", (6, 4), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)

    assert load_rgb(tmp_path / "gray.png").shape == (4, 6, 3)
    assert load_rgb(tmp_path / "wide.png").min() == 255  # 16-bit white stays white, not clipped noise
    assert (load_rgb(tmp_path / "rgba.png") == 255).all()  # transparent composited on white
    cmyk = load_rgb(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (4, 6, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60
    assert load_rgb(tmp_path / "rotated.jpg").shape == (6, 4, 3)


def test_pipelines_follow_the_backbone_data_config():
    data_config = {
        "input_size": (3, 40, 40),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "interpolation": "bicubic",
        "crop_pct": 0.8,
    }
    train_tf, eval_tf = build_transforms(data_config, {"random_resized_crop": True, "hflip": 0.5})
    image = np.full((100, 60, 3), 255, np.uint8)
    for tf in (train_tf, eval_tf):
        out = tf(image=image)["image"]
        assert out.shape == (3, 40, 40) and out.dtype == torch.float32
        assert torch.allclose(out, torch.full_like(out, (1.0 - 0.5) / 0.25))
    _, small = build_transforms(data_config, {}, image_size=16)
    assert small(image=image)["image"].shape == (3, 16, 16)


def test_augmentation_is_reproducible_and_differs_between_workers():
    from finetune.data.datamodule import ImageDataModule
    from finetune.data.sources import DataSplits

    data_config = {
        "input_size": (3, 16, 16),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    splits = DataSplits(["a"], [(image, 0)] * 4, [(image, 0)], "same image four times")

    def first_epoch():
        torch.manual_seed(123)
        train_tf, eval_tf = build_transforms(data_config, {"random_resized_crop": True, "hflip": 0.5}, seed=7)
        loader = ImageDataModule(splits, train_tf, eval_tf, batch_size=1, num_workers=2).train_dataloader()
        return [batch[0] for batch in loader]

    first, again = first_epoch(), first_epoch()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # Batches 0 and 1 are the first draws of workers 0 and 1: copies of one generator would match.
    assert not torch.equal(first[0], first[1])


def test_per_file_memory_rereads_a_file_that_changed(tmp_path):
    """Probes and content hashes are remembered within a process (a sweep's trials re-check the same
    folder), keyed by path, size and mtime: replacing a file is seen at once."""
    path = tmp_path / "a.png"
    Image.new("RGB", (10, 20)).save(path)
    assert probe(path) == (10, 20)
    stat = path.stat()
    Image.new("RGB", (30, 40), "white").save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert probe(path) == (30, 40)

    write_class_folders(tmp_path / "data" / "train", ("a", "b"), per_class=2, seed=0)
    write_class_folders(tmp_path / "data" / "val", ("a", "b"), per_class=1, seed=1)
    splits = load_folder(tmp_path / "data", "train", "val", 0.2, 0)
    assert check_data(splits).duplicates == []
    val_file, train_file = Path(splits.val[0][0]), Path(splits.train[0][0])
    val_file.write_bytes(train_file.read_bytes())  # now a copy of a training image
    assert len(check_data(splits).duplicates) == 1
