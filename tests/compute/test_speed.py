"""Fast defaults: precision and memory layout resolved per machine, explicit values win."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import QUICK, TINY

from finetune import fit
from finetune.compute.speed import cpu_has_native_bf16, resolve_precision, resolve_speed
from finetune.errors import ConfigError


def test_auto_precision_is_bf16_only_where_it_is_native():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16-mixed" if cpu_has_native_bf16() else "32-true")
    assert resolve_precision("32-true", cpu) == "32-true"
    assert resolve_precision("bf16-mixed", cpu) == "bf16-mixed"


def test_trainer_group_splits_into_lightning_arguments_and_our_switches():
    conv = timm.create_model("test_resnet", pretrained=False)
    kwargs, speed = resolve_speed(
        {"accelerator": "cpu", "precision": "auto", "max_epochs": 3, "channels_last": "auto", "compile": False}, conv
    )
    assert kwargs["max_epochs"] == 3 and "channels_last" not in kwargs and "compile" not in kwargs
    assert kwargs["precision"] != "auto" and speed.channels_last and not speed.compile
    no_conv = torch.nn.Sequential(torch.nn.Linear(4, 2))
    assert not resolve_speed({"accelerator": "cpu", "channels_last": "auto"}, no_conv)[1].channels_last
    assert not resolve_speed({"accelerator": "cpu", "channels_last": False}, conv)[1].channels_last
    with pytest.raises(ConfigError, match="channels_last"):
        resolve_speed({"accelerator": "cpu", "channels_last": "yes"}, conv)
    with pytest.raises(ConfigError, match="accelerator"):
        resolve_speed({"accelerator": "tpu"}, conv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_accelerator_without_cuda_says_what_to_do():
    with pytest.raises(ConfigError, match="trainer.accelerator=cpu"):
        resolve_speed({"accelerator": "gpu"}, torch.nn.Linear(2, 2))


def test_channels_last_training_matches_the_default_layout(tmp_path, image_folder):
    """Same seed, same data: NHWC and NCHW full fine-tuning agree to float tolerance."""
    runs = {}
    for layout in ("true", "false"):
        runs[layout] = fit(
            "full_finetune",
            TINY
            + QUICK
            + [
                "data=folder",
                f"data.root={image_folder}",
                "augment=none",
                "trainer.max_epochs=1",
                "data.batch_size=8",
                "trainer.precision=32-true",
                f"trainer.channels_last={layout}",
                f"hydra.run.dir={tmp_path / layout}",
            ],
        )
    a, b = runs["true"].model.state_dict(), runs["false"].model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4, msg=f"{name} differs")
    assert all(t.is_contiguous() for t in a.values())  # users get the ordinary layout back


def test_uint8_batches_normalized_on_device_match_the_normalizing_pipeline():
    import numpy as np

    from finetune.data.transforms import build_transforms
    from finetune.model.classifier import Classifier
    from finetune.train.module import ClassifierModule

    config = {
        "input_size": (3, 32, 32),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
    }
    image = np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    _, normalizing = build_transforms(config, {"random_resized_crop": False})
    _, raw = build_transforms(config, {"random_resized_crop": False}, normalize=False)
    expected, as_uint8 = normalizing(image=image)["image"], raw(image=image)["image"]
    assert as_uint8.dtype == torch.uint8
    module = ClassifierModule(
        Classifier(torch.nn.Identity(), torch.nn.Linear(3, 2), []),
        ["a", "b"],
        {"lr": 0.1},
        {"name": "none"},
        pixel_stats=(config["mean"], config["std"]),
    )
    images, labels, failures = module.on_after_batch_transfer((as_uint8[None], torch.tensor([1]), []), 0)
    torch.testing.assert_close(images[0], expected, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [1] and failures == []
    floats = torch.randn(1, 3, 4, 4)  # cached features and float batches pass through untouched
    assert module.on_after_batch_transfer((floats, labels, []), 0)[0] is floats


def test_auto_workers_follow_the_device_and_where_the_images_are(monkeypatch):
    from finetune.compute import speed

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(speed, "usable_cores", lambda: 2)
    assert speed.resolve_num_workers("auto", cpu, in_memory=True) == 0  # augmenting in-process is cheaper
    assert speed.resolve_num_workers("auto", cpu, in_memory=False) == 2  # files still need decoding
    assert speed.resolve_num_workers("auto", gpu, in_memory=True) == 1
    monkeypatch.setattr(speed, "usable_cores", lambda: 16)
    assert speed.resolve_num_workers("auto", gpu, in_memory=False) == 8
    assert speed.resolve_num_workers(3, cpu, in_memory=True) == 3  # an explicit count wins
    for bad in (-1, "many", True):
        with pytest.raises(ConfigError, match="data.num_workers"):
            speed.resolve_num_workers(bad, cpu, in_memory=True)


def test_batch_size_finder_needs_a_gpu(tmp_path, image_folder):
    with pytest.raises(ConfigError, match="find_batch_size=true needs a GPU"):
        fit(
            "full_finetune",
            TINY
            + QUICK
            + [
                "data=folder",
                f"data.root={image_folder}",
                "trainer.accelerator=cpu",
                "data.find_batch_size=true",
                f"hydra.run.dir={tmp_path / 'run'}",
            ],
        )


@pytest.mark.gpu
def test_batch_size_finder_grows_the_batch_on_a_gpu(tmp_path, image_folder, capsys):
    result = fit(
        "full_finetune",
        TINY
        + QUICK
        + [
            "data=folder",
            f"data.root={image_folder}",
            "trainer=gpu",
            "data.batch_size=2",
            "data.find_batch_size=true",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
    )
    found = int(capsys.readouterr().out.split("batch-size finder: data.batch_size=")[1].split()[0])
    assert found > 2 and "val/acc" in result.metrics
