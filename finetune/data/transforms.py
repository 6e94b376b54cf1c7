"""albumentations pipelines built from the backbone's data config (timm's resolution rules)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from finetune.config import with_defaults
from finetune.data.policies import AutoAugmentPolicy

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
    "area": cv2.INTER_AREA,
}


def input_size(data_config: Mapping, image_size: int | None = None) -> tuple[int, int]:
    """(height, width): `image_size` when given, else the backbone's."""
    if image_size:
        return int(image_size), int(image_size)
    _, height, width = data_config["input_size"]
    return int(height), int(width)


def with_input_size(data_config: Mapping, image_size: int | None = None) -> dict:
    """A copy of `data_config` whose ``input_size`` is the one the run actually uses."""
    height, width = input_size(data_config, image_size)
    return {**data_config, "input_size": (3, height, width)}


def augmentation_is_random(augment: Mapping) -> bool:
    """Whether the training pipeline build_transforms makes from `augment` draws random numbers."""
    augment = with_defaults("augment", "standard", augment)
    return (
        bool(augment["random_resized_crop"])
        or float(augment["hflip"]) > 0
        or augment["policy"] != "none"
        or float(augment["color_jitter"]) > 0
        or float(augment["random_erasing"]) > 0
    )


def appearance_steps(augment: Mapping) -> list:
    """The training pipeline's steps after the geometry: the automatic policy (``augment.policy``
    with ``magnitude`` and ``num_ops``), color jitter (``color_jitter``: brightness, contrast and
    saturation factors drawn from [1 - s, 1 + s], as timm's ``--color-jitter``) and random erasing
    (``random_erasing``: the probability of erasing one rectangle of 2-33% of the image with random
    pixels, as timm's ``--reprob`` with ``--remode pixel``). All on uint8 images, before normalization."""
    steps = []
    if augment["policy"] != "none":
        steps.append(AutoAugmentPolicy(augment["policy"], augment["magnitude"], augment["num_ops"]))
    strength = float(augment["color_jitter"])
    if strength > 0:
        steps.append(A.ColorJitter(brightness=strength, contrast=strength, saturation=strength, hue=0.0, p=1.0))
    erasing = float(augment["random_erasing"])
    if erasing > 0:
        steps.append(A.Erasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), fill="random", p=erasing))
    return steps


def build_transforms(
    data_config: Mapping,
    augment: Mapping,
    image_size: int | None = None,
    seed: int | None = None,
    normalize: bool = True,
) -> tuple[A.Compose, A.Compose]:
    """(train, eval) pipelines taking HxWx3 uint8 RGB arrays to normalized CHW float tensors, or
    with ``normalize=False`` to CHW uint8 tensors (a quarter of the bytes through the DataLoader)
    that :func:`normalize_on_device` finishes where the model runs.

    eval: resize the short side to size / crop_pct, center crop (timm's evaluation transform).
    Shrinking uses pixel-area averaging (like PIL's antialiased resize): bicubic alone aliases
    when a 2,000 px photo becomes 224 px.
    train: random resized crop (scale, ratio) and horizontal flip with probability hflip, or
    the eval geometry when augment.random_resized_crop is false; then :func:`appearance_steps`. albumentations draws
    from its
    own generator, which global seeds do not touch: `seed` makes the training pipeline
    reproducible (DataLoader workers re-seed their copy, see the datamodule).
    """
    augment = with_defaults("augment", "standard", augment)  # keys a caller leaves out: conf/augment/standard.yaml
    height, width = input_size(data_config, image_size)
    interpolation = INTERPOLATIONS.get(data_config.get("interpolation", "bilinear"), cv2.INTER_LINEAR)
    crop_pct = data_config.get("crop_pct") or 1.0
    finish = (
        [
            A.Normalize(mean=tuple(data_config["mean"]), std=tuple(data_config["std"]), max_pixel_value=255.0),
            ToTensorV2(),
        ]
        if normalize
        else [ToTensorV2()]
    )
    eval_geometry = [
        A.SmallestMaxSize(
            max_size=int(math.floor(min(height, width) / crop_pct)),
            interpolation=interpolation,
            area_for_downscale="image",
        ),
        A.CenterCrop(height=height, width=width),
    ]
    if augment["random_resized_crop"]:
        train_geometry = [
            A.RandomResizedCrop(
                size=(height, width),
                scale=tuple(augment["scale"]),
                ratio=tuple(augment["ratio"]),
                interpolation=interpolation,
                area_for_downscale="image",
            )
        ]
    else:
        train_geometry = list(eval_geometry)
    hflip = float(augment["hflip"])
    if hflip > 0:
        train_geometry.append(A.HorizontalFlip(p=hflip))
    return A.Compose(train_geometry + appearance_steps(augment) + finish, seed=seed), A.Compose(
        eval_geometry + finish, seed=seed
    )


def normalize_on_device(images, mean, std):
    """uint8 NCHW `images` -> float32 ``(x / 255 - mean) / std``, computed where they already are.
    `mean` and `std` are per-channel tensors scaled to 0..255 and shaped (1, C, 1, 1)."""
    return (images.float() - mean) / std
