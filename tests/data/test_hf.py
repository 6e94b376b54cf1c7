"""data=hf: Hugging Face datasets (save_to_disk, Parquet, imagefolder) train like the same images in folders."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from conftest import QUICK, TINY, assert_refused, finetune_cli, write_class_folders

from finetune import fit
from finetune.commands import command
from finetune.data.check import check_data
from finetune.errors import DataError

datasets = pytest.importorskip("datasets")

CLASSES = ["ants", "bees", "wasps"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """load_dataset's Arrow cache goes to the test's folder, never to ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _folder_rows(folder):
    """(image bytes, class index) of a folder of class folders, in the folder source's order."""
    return [
        (path.read_bytes(), label) for label, name in enumerate(CLASSES) for path in sorted((folder / name).iterdir())
    ]


def _dataset(rows, label_feature=None):
    features = datasets.Features(
        {"image": datasets.Image(), "label": label_feature or datasets.ClassLabel(names=CLASSES)}
    )
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": data, "path": None} for data, _ in rows], "label": [label for _, label in rows]},
        features=features,
    )


@pytest.fixture
def images(tmp_path):
    """DIR/folder/<3 classes>/*.jpg (6 each) and the same images as a datasets Dataset."""
    folder = write_class_folders(tmp_path / "folder", CLASSES, per_class=6)
    return folder, _dataset(_folder_rows(folder))


def _fit(tmp_path, name, *overrides):
    return fit(
        "freeze_all_but_head",
        TINY
        + QUICK
        + [
            "augment=none",
            "data.batch_size=8",
            "trainer.precision=32-true",
            f"hydra.run.dir={tmp_path / name}",
            *overrides,
        ],
    )


def test_saved_dataset_and_parquet_train_like_the_same_images_in_folders(tmp_path, images):
    folder, ds = images
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    by_folder = _fit(tmp_path, "folder", "data=folder", f"data.root={folder}")
    saved = _fit(tmp_path, "saved", "data=hf", f"data.path={tmp_path / 'saved'}")
    parquet = _fit(tmp_path, "parquet", "data=hf", f"data.path={tmp_path / 'train.parquet'}")
    for result in (saved, parquet):
        assert result.data_report.classes == CLASSES
        assert result.data_report.counts == by_folder.data_report.counts
        assert result.metrics["val/acc"] == pytest.approx(by_folder.metrics["val/acc"], abs=1e-6)
        assert result.data_report.size_range == by_folder.data_report.size_range
    # finetune evaluate on the dataset's validation split: the run's own val/acc
    out = tmp_path / "evaluation"
    assert (
        command("evaluate")(
            [f"ckpt={saved.best_checkpoint}", f"out={out}", "data=hf", f"data.path={tmp_path / 'saved'}"]
        )
        == 0
    )
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["images"] == sum(saved.data_report.counts["val"].values()) and not evaluation["skipped"]
    assert evaluation["accuracy"] == pytest.approx(saved.metrics["val/acc"], abs=1e-6)


def test_an_imagefolder_with_its_own_splits_trains_like_the_folder_source(tmp_path):
    root = tmp_path / "imagefolder"
    write_class_folders(root / "train", CLASSES, per_class=6)
    write_class_folders(root / "validation", CLASSES, per_class=3, seed=1)
    by_folder = _fit(tmp_path, "folder", "data=folder", f"data.root={root}")
    by_hf = _fit(tmp_path, "hf", "data=hf", f"data.path={root}")
    assert by_hf.data_report.classes == CLASSES
    assert by_hf.data_report.counts == by_folder.data_report.counts
    assert by_hf.metrics["val/acc"] == pytest.approx(by_folder.metrics["val/acc"], abs=1e-6)


def test_a_list_of_class_labels_trains_as_multilabel(tmp_path, images):
    folder, _ = images
    rows = [
        (data, [label, (label + 1) % 3] if i % 2 else [label]) for i, (data, label) in enumerate(_folder_rows(folder))
    ]
    _dataset(rows, datasets.Sequence(datasets.ClassLabel(names=CLASSES))).save_to_disk(str(tmp_path / "multi"))
    result = _fit(tmp_path, "multi", "data=hf", f"data.path={tmp_path / 'multi'}", "task=multilabel")
    assert result.headline == "val/map" and "val/map" in result.metrics
    assert result.data_report.cardinality["train"].get(2)
    with pytest.raises(DataError, match="add task=multilabel"):
        _fit(tmp_path, "multi-as-single", "data=hf", f"data.path={tmp_path / 'multi'}")


def test_rows_are_read_lazily_named_by_fingerprint_and_checked_for_duplicates(tmp_path, images):
    from omegaconf import OmegaConf

    from finetune.data.hf import HFRow, load_hf
    from finetune.data.images import load_rgb

    folder, ds = images
    rows = _folder_rows(folder)
    twin = datasets.DatasetDict(
        {
            "train": _dataset(rows),
            "validation": _dataset(rows[:2]),
            "test": _dataset([(b"not an image", 0)] + rows[2:4]),
        }
    )
    twin.save_to_disk(str(tmp_path / "twin"))
    saved = datasets.load_from_disk(str(tmp_path / "twin"))
    cfg = OmegaConf.create({"path": str(tmp_path / "twin"), "val_fraction": 0.2})
    splits = load_hf(cfg, seed=0)
    row, label = splits.train[0]
    assert isinstance(row, HFRow) and row.startswith(f"hf://{saved['train']._fingerprint}/train/")
    assert row.table.format["type"] == "arrow" and row.table.column_names == ["image"]  # one column, mapped
    assert load_rgb(row).shape == (48, 48, 3) and label == 0
    assert load_rgb(pickle.loads(pickle.dumps(row))).tobytes() == load_rgb(row).tobytes()
    assert [reason for name, reason in splits.skipped if "/test/0" in name] == [
        "not a readable image (UnidentifiedImageError: cannot identify image file data)"
    ]  # a bad image is counted
    report = check_data(splits)
    assert len(report.duplicates) == 4 and report.images == {"train": 18, "val": 2, "test": 2}


def _refused(tmp_path, ds_or_path, *overrides):
    path = ds_or_path
    if not isinstance(ds_or_path, str):
        path = str(tmp_path / "bad")
        ds_or_path.save_to_disk(path)
    return finetune_cli(*TINY, *QUICK, "data=hf", f"data.path={path}", f"hydra.run.dir={tmp_path / 'run'}", *overrides)


def test_bad_inputs_are_refused_in_one_line(tmp_path, images):
    from omegaconf import OmegaConf

    from finetune.data.hf import load_hf

    _, ds = images
    assert_refused(_refused(tmp_path, str(tmp_path / "nowhere")), "does not exist")
    assert_refused(_refused(tmp_path, ds, "data.label_column=species"), "has no column 'species' (data.label_column)")
    floats = ds.cast_column("label", datasets.Value("float32"))
    assert_refused(_refused(tmp_path / "f", floats), "not class labels")
    offline = finetune_cli(
        *TINY, *QUICK, "data=hf", "data.path=someone/no-such-dataset", env=os.environ | {"HF_HUB_OFFLINE": "1"}
    )
    assert_refused(offline, "is not a local path, and the Hub could not give the dataset 'someone/no-such-dataset'")

    def load(path, **keys):
        return load_hf(OmegaConf.create({"path": str(path), "val_fraction": 0.2, **keys}), seed=0)

    with pytest.raises(DataError, match="has no column 'photo' \\(data.image_column\\)"):
        load(tmp_path / "bad", image_column="photo")
    datasets.Dataset.from_dict({"image": ["a.jpg", "b.jpg"], "label": [0, 1]}).save_to_disk(str(tmp_path / "paths"))
    with pytest.raises(DataError, match="not images; cast it"):
        load(tmp_path / "paths")
    with pytest.raises(DataError, match="no splits named 'holdout'"):
        load(tmp_path / "bad", val_split="holdout")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="must be .parquet or .arrow"):
        load(tmp_path / "notes.txt")


def test_without_the_hf_extra_the_preflight_names_it(tmp_path):
    import subprocess
    import sys

    hidden = "import sys; sys.modules['datasets'] = None; sys.argv = ['finetune', *sys.argv[1:]]; "
    result = subprocess.run(
        [sys.executable, "-c", hidden + "from finetune.cli import main; main()", "data=hf", "data.path=x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_refused(result, "data=hf needs finetune's 'hf' extra: pip install 'finetune[hf]'")


def test_a_full_finetune_reads_rows_at_every_epoch_like_files(tmp_path, images):
    folder, ds = images
    ds.save_to_disk(str(tmp_path / "saved"))
    full = ("data.cache.decoded=false", "data.cache.features=false", "trainer.max_epochs=2")
    by_folder = _fit(tmp_path, "folder", "data=folder", f"data.root={folder}", "freeze=none", *full)
    by_hf = _fit(tmp_path, "hf", "data=hf", f"data.path={tmp_path / 'saved'}", "freeze=none", *full)
    for name, tensor in by_folder.model.state_dict().items():
        torch.testing.assert_close(tensor, by_hf.model.state_dict()[name], msg=f"{name} differs")


def test_plain_str_and_int_label_columns_name_their_classes(tmp_path, images):
    from omegaconf import OmegaConf

    from finetune.data.hf import load_hf

    folder, ds = images
    rows = _folder_rows(folder)
    as_str = ds.cast_column("label", datasets.Value("string")).map(lambda r: {"label": CLASSES[int(r["label"])]})
    as_str.to_parquet(str(tmp_path / "str.parquet"))
    splits = load_hf(OmegaConf.create({"path": str(tmp_path / "str.parquet"), "val_fraction": 0.2}), seed=0)
    assert splits.classes == CLASSES and len(splits.train) + len(splits.val) == len(rows)
    numbers = _dataset([(data, [10, 2, 7][label]) for data, label in rows], datasets.Value("int64"))
    numbers.save_to_disk(str(tmp_path / "int"))
    splits = load_hf(OmegaConf.create({"path": str(tmp_path / "int"), "val_fraction": 0.2}), seed=0)
    assert splits.classes == ["2", "7", "10"] and sorted({label for _, label in splits.train}) == [0, 1, 2]
    unseen = datasets.DatasetDict({"train": numbers, "validation": _dataset(rows[:1], datasets.Value("int64"))})
    unseen["validation"] = unseen["validation"].map(lambda r: {"label": 99})
    unseen.save_to_disk(str(tmp_path / "unseen"))
    with pytest.raises(DataError, match=r"labels \['99'\] appear in val/test but never in train"):
        load_hf(OmegaConf.create({"path": str(tmp_path / "unseen"), "val_fraction": 0.2}), seed=0)
    edited = _dataset(rows[1:])
    edited.save_to_disk(str(tmp_path / "edited"))
    ds.save_to_disk(str(tmp_path / "original"))
    names = [
        {str(row) for row, _ in load_hf(OmegaConf.create({"path": str(tmp_path / n), "val_fraction": 0.2}), 0).val}
        for n in ("original", "edited")
    ]
    assert not names[0] & names[1]  # another fingerprint: the feature cache and memo never mix them up
