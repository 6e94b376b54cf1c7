"""finetune audit: likely label errors, near-duplicates, outliers and a k-fold accuracy, found in
data where we planted them; the data are read, never changed."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_multilabel_manifest
from PIL import Image

from finetune.commands import audit_command
from finetune.errors import ConfigError
from finetune.use.audit import audit, wilson
from finetune.use.duplicates import pixel_similarity, thumbnails
from finetune.use.embed import Embeddings

TINY = ["backbone.name=test_resnet", "backbone.weights=random", "data.image_size=32", "data.num_workers=0"]
# lite0 with its embedded ImageNet weights (offline), at a small size: real features in seconds.
LITE0 = ["data.image_size=128", "data.num_workers=0", "trainer.precision=32-true"]
COLUMNS = [
    "path",
    "split",
    "given",
    "suggested",
    "label_quality",
    "is_label_issue",
    "outlier_score",
    "is_outlier",
    "duplicate_of",
]


def clusters(seed: int = 0, per_class: int = 40, dim: int = 32):
    """Embeddings of 3 well-separated Gaussian classes over train/val (no files behind the paths)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 2
    labels = np.repeat(np.arange(3), per_class)
    features = (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32)
    splits = np.array(["train", "train", "train", "val"] * (len(labels) // 4))
    paths = np.array([f"mem/{i}" for i in range(len(labels))])
    return features, labels, splits, paths


def test_audit_finds_flipped_labels_a_copied_row_and_a_far_point_on_features():
    features, labels, splits, paths = clusters()
    given = labels.copy()
    flipped = [3, 50, 81]
    given[flipped] = (labels[flipped] + 1) % 3
    # row 7 (val) copied into train; a point far from every class, labelled "a" (row 121)
    features = np.vstack([features, features[7] + 0.01, np.full((1, features.shape[1]), 40.0, np.float32)])
    given = np.append(given, [given[7], 0])
    splits = np.append(splits, ["train", "train"])
    paths = np.append(paths, ["mem/copy", "mem/far"])
    result = audit(Embeddings(features, given, paths, splits, ["a", "b", "c"], "synthetic"), folds=5, seed=0)

    assert set(flipped) <= set(result.suspects()) <= {*flipped, 121}
    assert list(result.suggested[flipped]) == list(labels[flipped])  # the suggestion is the true class
    assert result.label_quality[flipped].max() < np.delete(result.label_quality, [*flipped, 121]).min()
    assert [(p.first, p.second, p.leak) for p in result.pairs] == [(7, 120, True)]
    assert result.pairs[0].similarity is None  # no file to compare: features alone, at a strict cosine
    assert list(np.flatnonzero(result.outlier)) == [121]
    assert result.duplicate_of[7] == 120 and result.duplicate_of[120] == 7 and (result.duplicate_of[:7] == -1).all()
    correct = int((result.suggested == given).sum())
    assert result.accuracy == correct / 122 and result.interval == wilson(correct, 122)
    rows = result.rows()
    assert [r["path"] for r in rows[: len(result.suspects())]] == list(paths[result.suspects()])  # most suspect first
    assert set(rows[0]) == set(COLUMNS)


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson(8, 10)  # Wilson (1927); e.g. Agresti & Coull (1998), table 1
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)


def photo_copies(source: Path, folder: Path) -> dict[str, Path]:
    """A JPEG re-encode at quality 60, a 0.6x resize and a 90% centre crop of `source`."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.open(source).convert("RGB")
    w, h = image.size
    copies = {"jpeg60": folder / "jpeg60.jpg", "resize": folder / "resize.png", "crop": folder / "crop.png"}
    image.save(copies["jpeg60"], quality=60)
    image.resize((round(w * 0.6), round(h * 0.6)), Image.Resampling.BICUBIC).save(copies["resize"])
    image.crop((round(w * 0.05), round(h * 0.05), w - round(w * 0.05), h - round(h * 0.05))).save(copies["crop"])
    return copies


def test_thumbnails_match_reencoded_resized_and_cropped_copies_not_other_photos(tmp_path, hymenoptera):
    ants = sorted((hymenoptera / "train" / "ants").glob("*.jpg"))[:6]
    original = thumbnails(str(ants[0]))
    for kind, copy in photo_copies(ants[0], tmp_path).items():
        assert pixel_similarity(original, thumbnails(str(copy))) >= 0.95, kind
    assert max(pixel_similarity(original, thumbnails(str(other))) for other in ants[1:]) < 0.9
    assert thumbnails(str(tmp_path / "missing.jpg")) is None


def files_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path).encode() + path.read_bytes() + str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def planted_photos(root: Path, hymenoptera: Path) -> dict:
    """ROOT/{train,val}/{ants,bees} from real photos, with 2 ants filed as bees and 2 bees as ants
    in train, a resized JPEG copy of a training bee in val, and a checkerboard among the ants."""
    source = {c: sorted((hymenoptera / "train" / c).glob("*.jpg")) for c in ("ants", "bees")}
    planted = {"mislabelled": [], "copy": None}
    for split in ("train", "val"):
        for c in ("ants", "bees"):
            (root / split / c).mkdir(parents=True)
    for c in ("ants", "bees"):
        for split, chosen in (("train", source[c][:20]), ("val", source[c][20:28])):
            for path in chosen:
                shutil.copy(path, root / split / c / path.name)
        for path in source[c][30:32]:
            wrong = "bees" if c == "ants" else "ants"
            shutil.copy(path, root / "train" / wrong / path.name)
            planted["mislabelled"].append(str(root / "train" / wrong / path.name))
    bee = root / "train" / "bees" / source["bees"][3].name
    image = Image.open(bee).convert("RGB")
    image.resize((round(image.width * 0.7), round(image.height * 0.7))).save(
        root / "val" / "bees" / "copy.jpg", quality=60
    )
    planted["copy"] = {str(bee), str(root / "val" / "bees" / "copy.jpg")}
    squares = ((np.indices((240, 320)).sum(axis=0) // 40) % 2 * 255).astype(np.uint8)
    Image.fromarray(squares).convert("RGB").save(root / "train" / "ants" / "checkerboard.png")
    planted["outlier"] = str(root / "train" / "ants" / "checkerboard.png")
    return planted


def test_audit_command_finds_planted_problems_in_real_photos_and_changes_nothing(tmp_path, hymenoptera, capsys):
    data = tmp_path / "data"
    planted = planted_photos(data, hymenoptera)
    before = files_digest(data)
    out = tmp_path / "audit"
    assert audit_command([*LITE0, "data=folder", f"data.root={data}", f"out={out}", "top=8"]) == 0
    printed = capsys.readouterr().out
    assert files_digest(data) == before and files_digest(data) == files_digest(data)  # not a byte, not an mtime

    with (out / "audit.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS and len(rows) == 2 * (20 + 8) + 4 + 1 + 1
    flagged = {r["path"] for r in rows if r["is_label_issue"] == "True"}
    found = flagged & set(planted["mislabelled"])
    # all four planted; the rest are real photos a 128 px probe on 60 images finds ambiguous
    assert len(found) == 4 and len(flagged) <= 8
    for r in rows:
        if r["path"] in found:  # the suggestion is the class the photo was taken from
            assert r["suggested"] != r["given"]
    summary = json.loads((out / "audit.json").read_text())
    assert [{p["first"], p["second"]} for p in summary["pairs"]] == [planted["copy"]]
    assert summary["pairs"][0]["leak"] and summary["leaks"] == 1 and summary["pairs"][0]["similarity"] >= 0.95
    # the checkerboard is the most atypical image (the far-out fence is strict: on 63 images it stays inside)
    assert min(rows, key=lambda r: float(r["outlier_score"]))["path"] == planted["outlier"]
    assert summary["outliers"] <= 3
    low, high = summary["kfold_accuracy_95ci"]
    assert low < summary["kfold_accuracy"] < high and summary["images"] == len(rows)
    assert (out / "suspects.png").stat().st_size > 0 and (out / "duplicates.png").stat().st_size > 0
    assert f"{len(flagged)} likely label errors" in printed and "1 of them train <-> val/test leaks" in printed
    assert "no data file was changed" in printed


def test_audit_cli_end_to_end_counts_an_unreadable_file(tmp_path, image_folder):
    bad = image_folder / "train" / "bees" / "truncated.jpg"
    bad.write_bytes(next((image_folder / "train" / "bees").glob("*.jpg")).read_bytes()[:200])
    out = tmp_path / "audit"
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "finetune"),
            "audit",
            *TINY,
            "data=folder",
            f"data.root={image_folder}",
            f"data.cache.dir={tmp_path / 'cache'}",
            f"out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "audited 36 images (train 24, val 12), 3 classes" in done.stdout
    assert "skipped 1 unreadable files" in done.stdout and "k-fold accuracy" in done.stdout
    with (out / "audit.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36 and str(bad) not in {r["path"] for r in rows}
    assert str(bad) in json.loads((out / "audit.json").read_text())["skipped"]


@pytest.mark.parametrize(
    "option, message",
    [
        ("folds=1", "at least 2 folds"),
        ("folds=two", "folds='two' must be an integer"),
        ("folds=13", "classes 'ants' \\(12\\), 'bees' \\(12\\), 'wasps' \\(12\\) have fewer images than folds"),
        ("top=many", "top='many' must be an integer"),
        ("similarity=2", "a correlation lies between -1 and 1"),
    ],
)
def test_audit_refuses_bad_options_with_one_line(tmp_path, image_folder, option, message):
    with pytest.raises(ConfigError, match=message):
        audit_command([*TINY, "data=folder", f"data.root={image_folder}", f"out={tmp_path / 'a'}", option])


def test_audit_refuses_a_class_smaller_than_the_folds_before_computing_features(tmp_path, image_folder, monkeypatch):
    for path in (
        sorted((image_folder / "val" / "wasps").glob("*.jpg"))
        + sorted((image_folder / "train" / "wasps").glob("*.jpg"))[3:]
    ):
        path.unlink()

    def embed(*args, **kwargs):
        raise AssertionError("features computed before the folds were checked")

    monkeypatch.setattr("finetune.use.embed.embed", embed)
    with pytest.raises(ConfigError, match=r"'wasps' \(3\) have fewer images than folds.*folds= to 3"):
        audit_command([*TINY, "data=folder", f"data.root={image_folder}", f"out={tmp_path / 'a'}"])


def test_audit_refuses_multilabel_data(tmp_path):
    manifest = write_multilabel_manifest(tmp_path / "ml")
    with pytest.raises(ConfigError, match="multi-label data"):
        audit_command(
            [*TINY, "data=csv", f"data.csv={manifest}", "data.label_sep= ", "task=multilabel", f"out={tmp_path / 'a'}"]
        )
