"""The frozen-feature cache: same head as the slow path, reuse, invalidation, views, refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import QUICK, TINY

from finetune import fit
from finetune.errors import ConfigError


def _head_fit(tmp_path: Path, image_folder: Path, name: str, *extra: str):
    return fit(
        "freeze_all_but_head",
        TINY
        + QUICK
        + [
            "data=folder",
            f"data.root={image_folder}",
            "data.batch_size=8",
            "trainer.max_epochs=3",
            f"data.cache.dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / name}",
            *extra,
        ],
    )


def _cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "features").glob("*.safetensors"))


def test_cached_path_trains_the_same_head_as_the_slow_path(tmp_path, image_folder, capsys):
    # fp32 both ways: on a CPU with bf16 (trainer.precision=auto picks bf16-mixed there) the slow
    # path runs the backbone under autocast, while the cache's first view is computed at full
    # precision, as finetune.load predicts (failed on such a host: head weights 1e-5 apart).
    fp32 = "trainer.precision=32-true"
    slow = _head_fit(tmp_path, image_folder, "slow", "augment=none", "data.cache.features=false", fp32)
    assert "feature cache" not in capsys.readouterr().out
    # The same SGD epochs on cached features (head-only runs fit the head by L-BFGS by default).
    fast = _head_fit(
        tmp_path, image_folder, "fast", "augment=none", "data.cache.features=true", "head.fit.solver=sgd", fp32
    )
    assert "feature cache: on" in capsys.readouterr().out
    for (name, a), b in zip(slow.model.head.state_dict().items(), fast.model.head.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"head tensor {name} differs")
    assert [h["val/acc"] for h in slow.history] == pytest.approx([h["val/acc"] for h in fast.history], abs=1e-6)
    # The backbone was never touched: the returned model is whole and predicts like the slow one.
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(slow.model(x), fast.model(x), atol=1e-5, rtol=1e-5)


def test_cache_is_reused_and_invalidated_by_what_changes_the_features(tmp_path, image_folder, capsys):
    _head_fit(tmp_path, image_folder, "a", "augment=none", "trainer.max_epochs=1")
    assert "computed in" in capsys.readouterr().out
    first = _cache_files(tmp_path)
    assert len(first) == 1
    stamp = first[0].stat().st_mtime_ns

    _head_fit(tmp_path, image_folder, "b", "augment=none", "trainer.max_epochs=1", "optimizer.lr=0.1")
    assert "loaded in" in capsys.readouterr().out  # a head hyperparameter does not change features
    assert _cache_files(tmp_path) == first and first[0].stat().st_mtime_ns == stamp

    _head_fit(tmp_path, image_folder, "c", "augment=none", "trainer.max_epochs=1", "data.image_size=40")
    assert len(_cache_files(tmp_path)) == 2  # another input size: new features

    image = next((image_folder / "train" / "ants").glob("*.jpg"))
    os.utime(image, ns=(stamp + 10**9, stamp + 10**9))
    _head_fit(tmp_path, image_folder, "d", "augment=none", "trainer.max_epochs=1")
    assert "computed in" in capsys.readouterr().out and len(_cache_files(tmp_path)) == 3  # a data file changed

    first[0].write_bytes(b"damaged")  # a broken cache file is recomputed, never fatal
    _head_fit(tmp_path, image_folder, "e", "augment=none", "trainer.max_epochs=1", "data.image_size=40")
    _head_fit(tmp_path, image_folder, "f", "augment=none", "trainer.max_epochs=1")
    assert "computed in" in capsys.readouterr().out


def test_augmented_views_are_distinct_and_cycle_per_epoch(tmp_path, image_folder, capsys):
    from safetensors.torch import load_file

    result = _head_fit(tmp_path, image_folder, "views", "augment=standard", "data.cache.views=3")
    assert "3 views per training image (the evaluation view, 2 augmented)" in capsys.readouterr().out
    (path,) = _cache_files(tmp_path)
    tensors = load_file(str(path))
    train = tensors["features.train"]
    assert train.shape[:2] == (3, 24) and tensors["features.val"].shape[0] == 12
    assert not torch.allclose(train[0], train[1]) and not torch.allclose(train[1], train[2])
    assert len(result.history) == 3
    # View 0 is the evaluation view: what a run without augmentation caches as its only view.
    _head_fit(tmp_path, image_folder, "plain", "augment=none")
    (plain,) = [p for p in _cache_files(tmp_path) if p != path]
    torch.testing.assert_close(load_file(str(plain))["features.train"][0], train[0])


def test_unreadable_files_are_counted_with_the_cache(tmp_path, image_folder):
    bad = image_folder / "train" / "bees" / "truncated.jpg"
    good = next((image_folder / "train" / "bees").glob("*.jpg")).read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    result = _head_fit(
        tmp_path, image_folder, "bad", "augment=none", "trainer.max_epochs=1", "data.cache.features=true"
    )
    assert str(bad) in {path for path, _ in result.data_report.skipped}


def test_cache_refuses_a_backbone_that_trains(tmp_path, image_folder):
    with pytest.raises(ConfigError, match="needs a frozen backbone.*train"):
        fit(
            "full_finetune",
            TINY
            + QUICK
            + [
                "data=folder",
                f"data.root={image_folder}",
                "data.cache.features=true",
                f"hydra.run.dir={tmp_path / 'run'}",
            ],
        )
    with pytest.raises(ConfigError, match="BatchNorm"):
        _head_fit(tmp_path, image_folder, "bn", "freeze.batchnorm=train", "data.cache.features=true")
    with pytest.raises(ConfigError, match="data.cache.features='sometimes'"):
        _head_fit(tmp_path, image_folder, "typo", "data.cache.features=sometimes")


def test_auto_falls_back_to_images_when_the_backbone_trains(tmp_path, image_folder, capsys):
    fit(
        "full_finetune",
        TINY + QUICK + ["data=folder", f"data.root={image_folder}", f"hydra.run.dir={tmp_path / 'run'}"],
    )
    assert "feature cache: off (" in capsys.readouterr().out


def test_every_view_is_written_in_place_and_unreadable_files_leave_no_rows(tmp_path, image_folder):
    """The pass writes each batch into one (views, images, width) tensor (no list of batches
    joined by a copy: at 80,000 images that held the features twice), and it equals a pass per
    view; an unreadable file leaves its row out of every view."""
    from finetune.compute.features import FeatureCacheSettings, _compute, extract
    from finetune.compute.speed import Speed
    from finetune.data.sources import load_folder
    from finetune.data.transforms import build_transforms
    from finetune.model.backbone import build_backbone

    backbone = build_backbone("test_resnet", "random").model.eval()
    train_tf, eval_tf = build_transforms(
        {
            "input_size": (3, 32, 32),
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        },
        {"random_resized_crop": True},
        seed=0,
    )
    speed = Speed("32-true", False, False, torch.device("cpu"))
    settings = FeatureCacheSettings("test_resnet", tmp_path, 2, True, 5, 0, 3)
    pipelines = {"train": train_tf, "eval": eval_tf}

    def computed():
        splits = load_folder(image_folder, "train", "val", 0.2, 0)
        return splits, _compute(backbone, {"train": splits.train, "val": splits.val}, pipelines, 2, speed, settings)

    splits, cached = computed()
    train = cached.features["train"]
    assert train.shape[:2] == (2, 24) and train.is_contiguous()
    assert train[1].data_ptr() == train.data_ptr() + train[0].numel() * train.element_size()  # one allocation
    buffers = {}
    alone, labels, _ = extract(
        backbone,
        splits.train,
        eval_tf,
        speed,
        settings,
        seed=0,
        desc="view 0",
        full_precision=True,
        into=lambda rows, width: buffers.setdefault("given", torch.empty(rows, width)),
    )
    assert alone.data_ptr() == buffers["given"].data_ptr() and alone.shape == buffers["given"].shape  # no copy
    torch.testing.assert_close(train[0], alone)
    assert torch.equal(labels, cached.labels["train"])
    bad = Path(splits.train[3][0])
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])  # its header reads, its pixels do not
    _, without = computed()
    assert without.features["train"].shape[:2] == (2, 23) and str(bad) in without.skipped
    torch.testing.assert_close(without.features["train"][0, 3:], train[0, 4:])
