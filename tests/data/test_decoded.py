"""Decode once: large photos shrunk at decode time, the same training on the decoded copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import QUICK, TINY
from PIL import Image

from finetune import fit
from finetune.data.decoded import _decode, stored_short_side
from finetune.data.images import load_rgb
from finetune.errors import ConfigError


def test_large_jpegs_are_decoded_small_and_close_to_a_full_decode_then_resize(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    smooth = cv2.resize(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), (1600, 1200), interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "big.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    small = _decode(str(path), short_side=150)
    assert small.shape == (150, 200, 3) and small.dtype == np.uint8
    reference = cv2.resize(load_rgb(path), (200, 150), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - reference.astype(int)).mean() < 3
    assert _decode(str(path), short_side=5000).shape == (1200, 1600, 3)  # never upscaled
    assert stored_short_side(224, 224, 0.875) == 512


def _full(tmp_path, image_folder, name, *extra):
    return fit(
        "full_finetune",
        TINY
        + QUICK
        + [
            "data=folder",
            f"data.root={image_folder}",
            "augment=none",
            "data.batch_size=8",
            "trainer.precision=32-true",
            f"hydra.run.dir={tmp_path / name}",
            *extra,
        ],
    )


def test_decoded_images_train_exactly_like_files(tmp_path, image_folder, capsys):
    bad = image_folder / "train" / "ants" / "truncated.jpg"
    bad.write_bytes((image_folder / "train" / "ants" / "ants_0.jpg").read_bytes()[:300])
    files = _full(tmp_path, image_folder, "files", "data.cache.decoded=false")
    assert "decoded-image cache" not in capsys.readouterr().out
    decoded = _full(tmp_path, image_folder, "decoded", "data.cache.decoded=true")
    assert "decoded-image cache: on" in capsys.readouterr().out
    for name, tensor in files.model.state_dict().items():
        torch.testing.assert_close(tensor, decoded.model.state_dict()[name], msg=f"{name} differs")
    assert str(bad) in {p for p, _ in decoded.data_report.skipped}


def test_memory_budget_is_respected(tmp_path, image_folder, capsys):
    _full(tmp_path, image_folder, "auto", "data.cache.memory_gb=0.00001")
    assert "decoded-image cache: off (needs" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="data.cache.memory_gb"):
        _full(tmp_path, image_folder, "forced", "data.cache.decoded=true", "data.cache.memory_gb=0.00001")
    with pytest.raises(ConfigError, match="data.cache.decoded='maybe'"):
        _full(tmp_path, image_folder, "typo", "data.cache.decoded=maybe")


def test_a_capped_run_decodes_nothing_ahead_and_calibrates_on_what_validation_read(tmp_path, image_folder, capsys):
    """24 train + 12 val images; one batch of 8 of each: 16 images read, 36 decoded ahead."""
    capped = ["+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1"]
    result = _full(tmp_path, image_folder, "capped", *capped)
    assert "decoded-image cache: off (the capped run reads fewer images" in capsys.readouterr().out
    trust = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["finetune"]["trust"]
    assert trust["temperature_split"] == "val (8 images)" and len(trust["val"]["confidence"]) == 8
    _full(tmp_path, image_folder, "forced", *capped, "data.cache.decoded=true")
    assert "decoded-image cache: on" in capsys.readouterr().out  # true is obeyed
    _full(tmp_path, image_folder, "many", "+trainer.limit_train_batches=1", "trainer.max_epochs=3")
    assert "decoded-image cache: on" in capsys.readouterr().out  # 3 x (8 + 12) reads >= 36 images
