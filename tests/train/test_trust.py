"""The feature cache is verified, not trusted: swapped images, flipped bytes and wrong labels in
an entry make the run compute it again (with a warning) and report the true accuracy."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from conftest import QUICK, TINY, class_image

from finetune import fit

CLASSES = ("ants", "bees", "wasps")


def _bmp_folders(root: Path) -> Path:
    """train/ and val/ class folders of BMPs: every file has the same size, so swapping two
    keeps path, size and (restored) mtime, all the old cache key looked at."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("val", 4)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                class_image(label, rng).save(root / split / name / f"{name}_{i}.bmp")
    return root


@pytest.fixture
def bmp_folder(tmp_path: Path) -> Path:
    return _bmp_folders(tmp_path / "data")


def _fit(tmp_path: Path, data: Path, name: str, *extra: str):
    return fit(
        "freeze_all_but_head",
        TINY
        + QUICK
        + [
            "data=folder",
            f"data.root={data}",
            "data.batch_size=8",
            "trainer.max_epochs=2",
            "augment=none",
            f"data.cache.dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / name}",
            *extra,
        ],
    )


def _accuracies(result) -> list[float]:
    return [epoch["val/acc"] for epoch in result.history]


def _cache_file(tmp_path: Path) -> Path:
    (path,) = (tmp_path / "cache" / "features").glob("*.safetensors")
    return path


def _tensor_bytes(path: Path, name: str) -> tuple[int, int]:
    """(start, end) of tensor `name`'s data in the safetensors file."""
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + header_size])[name]["data_offsets"]
    return 8 + header_size + start, 8 + header_size + end


@pytest.mark.slow  # three runs; the fast subset keeps the corrupted-entry tests
def test_images_swapped_with_their_mtimes_restored_are_not_served_from_the_cache(tmp_path, bmp_folder, capsys):
    _fit(tmp_path, bmp_folder, "before")
    assert "computed in" in capsys.readouterr().out
    ants, bees = (sorted((bmp_folder / "val" / name).glob("*.bmp")) for name in ("ants", "bees"))
    for a, b in zip(ants, bees):
        stats = a.stat(), b.stat()
        assert stats[0].st_size == stats[1].st_size
        data_a, data_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(data_b)
        b.write_bytes(data_a)
        for path, stat in zip((a, b), stats):
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert (a.stat().st_size, a.stat().st_mtime_ns) == (stats[0].st_size, stats[0].st_mtime_ns)

    cached = _fit(tmp_path, bmp_folder, "after")
    out = capsys.readouterr().out
    assert "computed in" in out and "loaded in" not in out
    fresh = _fit(tmp_path, bmp_folder, "fresh", "data.cache.features=false")
    assert _accuracies(cached) == pytest.approx(_accuracies(fresh), abs=1e-6)


def test_flipped_bytes_in_cached_features_are_noticed_and_recomputed(tmp_path, bmp_folder, capsys):
    first = _fit(tmp_path, bmp_folder, "first")
    path = _cache_file(tmp_path)
    start, end = _tensor_bytes(path, "features.val")
    raw = bytearray(path.read_bytes())
    for i in range(start + 3, end, 16):  # the high byte of every fourth float32: huge or NaN values
        raw[i] ^= 0x7F
    path.write_bytes(bytes(raw))
    capsys.readouterr()

    second = _fit(tmp_path, bmp_folder, "second")
    captured = capsys.readouterr()
    notices = [line for line in (captured.out + captured.err).splitlines() if "failed its check" in line]
    assert len(notices) == 1 and "checksum mismatch in features.val" in notices[0]
    assert "computed in" in captured.out
    assert _accuracies(second) == pytest.approx(_accuracies(first), abs=1e-6)
    third = _fit(tmp_path, bmp_folder, "third")  # the entry was rewritten whole
    assert "loaded in" in capsys.readouterr().out and _accuracies(third) == pytest.approx(_accuracies(first), abs=1e-6)


@pytest.mark.parametrize("how", ["bytes", "rewritten with fresh checksums"])
def test_corrupt_cached_labels_are_recomputed_not_an_index_error(tmp_path, bmp_folder, capsys, how):
    from finetune.compute.features import CachedFeatures, _save

    first = _fit(tmp_path, bmp_folder, "first")
    path = _cache_file(tmp_path)
    if how == "bytes":
        start, end = _tensor_bytes(path, "labels.val")
        raw = bytearray(path.read_bytes())
        raw[start:end] = b"\x7f" * (end - start)  # int64 labels far out of range
        path.write_bytes(bytes(raw))
    else:  # checksums cannot vouch for labels written wrong in the first place: they must be the data's
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        features = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("features.")}
        labels = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("labels.")}
        labels["val"] = (labels["val"] + 1) % len(CLASSES)
        _save(CachedFeatures(features, labels), path)
    capsys.readouterr()

    second = _fit(tmp_path, bmp_folder, "second")
    captured = capsys.readouterr()
    notices = [line for line in (captured.out + captured.err).splitlines() if "failed its check" in line]
    assert len(notices) == 1, captured.out + captured.err
    assert ("checksum mismatch in labels.val" if how == "bytes" else "val labels") in notices[0]
    assert "Traceback" not in captured.out + captured.err and "computed in" in captured.out
    assert _accuracies(second) == pytest.approx(_accuracies(first), abs=1e-6)
