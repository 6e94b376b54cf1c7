"""Test-time augmentation (TTA): several views of each image through the model, their predicted
probabilities averaged.

Modes (views per image in :data:`TTA_MODES`; cost = that many forward passes per image):

- ``none``: the evaluation view alone (resize the short side to size / crop_pct, center crop);
  exactly the plain prediction.
- ``flip``: the evaluation view and its horizontal mirror.
- ``crops``: the image resized as for evaluation but not center-cropped, then torchvision's
  ``five_crop``: the center crop, which is the evaluation view itself, and the four corners.
- ``crops_flip``: the five crops and their mirrors (the ten views of torchvision's ``ten_crop``).

Each view gets its own softmax and the probabilities of an image's views are averaged: a
confident view does not outvote the others the way its large logits would in a logit average.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch import nn
from torchvision.transforms.v2 import functional as TF

from finetune.data.images import UnreadableImage, as_rgb_array, load_rgb
from finetune.data.transforms import build_transforms, input_size
from finetune.errors import ConfigError
from finetune.use.metrics import classification_report

TTA_MODES = {"none": 1, "flip": 2, "crops": 5, "crops_flip": 10}  # mode -> views per image


def check_tta(mode: str) -> int:
    """The number of views `mode` runs per image; a ConfigError naming the choices if it is none."""
    if mode not in TTA_MODES:
        *first, last = TTA_MODES
        counts = [str(v) for v in TTA_MODES.values()]
        raise ConfigError(
            f"tta={mode!r}: choose {', '.join(first)} or {last} "
            f"({', '.join(counts[:-1])} or {counts[-1]} views per image)."
        )
    return TTA_MODES[mode]


class TestTimeAugmentation:
    """The views of one image for `mode`, made from the model's timm data config (input_size,
    mean, std, interpolation, crop_pct; ``input_size`` the one the run used), with the same
    resize rules as the evaluation pipeline of :func:`finetune.data.transforms.build_transforms`."""

    __test__ = False  # a library class whose name starts with "Test": not a pytest test class

    def __init__(self, data_config: Mapping, mode: str = "none"):
        self.views_per_image = check_tta(mode)
        self.mode = mode
        height, width = input_size(data_config)
        self.size = [height, width]
        _, self.eval_transform = build_transforms(data_config, {"random_resized_crop": False})
        steps = list(self.eval_transform.transforms)
        self.center_crop = A.Compose([t for t in steps if isinstance(t, A.CenterCrop)] + [ToTensorV2()])
        # The evaluation pipeline without its center crop. Normalizing before cropping gives the
        # same numbers (albumentations normalizes uint8 pixels through a per-value lookup table).
        self.resize = A.Compose([t for t in steps if not isinstance(t, (A.CenterCrop, ToTensorV2))])

    def views(self, image) -> torch.Tensor:
        """(V, 3, H, W) normalized float views of `image` (an HxWx3 uint8 RGB array, or anything
        :func:`finetune.data.images.as_rgb_array` takes); view 0 is always the evaluation view."""
        image = as_rgb_array(image)
        if self.mode in ("none", "flip"):
            view = self.eval_transform(image=image)["image"]
            return torch.stack([view, TF.horizontal_flip(view)] if self.mode == "flip" else [view])
        resized = self.resize(image=image)["image"]  # HxWx3 float32, normalized
        # The center comes from the evaluation pipeline's own crop, not five_crop's: for an odd
        # margin torchvision rounds margin / 2 half to even (3 px: 2 on the left), albumentations
        # down (1), and the center view must be the plain prediction's input exactly.
        center = self.center_crop(image=resized)["image"]
        corners = TF.five_crop(torch.from_numpy(resized).permute(2, 0, 1), self.size)[:4]
        five = [center, *corners]
        return torch.stack(five + [TF.horizontal_flip(v) for v in five] if self.mode == "crops_flip" else five)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _view_logits(
    model: nn.Module, images: Sequence, tta: TestTimeAugmentation, batch_size: int, device: torch.device | None
) -> Iterator[torch.Tensor]:
    """(n, V, C) float32 CPU logits, chunk by chunk: each forward pass holds at most
    max(batch_size, V) views, and images are converted only when their chunk runs."""
    device = device or _device_of(model)
    per_pass = max(1, batch_size // tta.views_per_image)
    for start in range(0, len(images), per_pass):
        chunk = [tta.views(image) for image in images[start : start + per_pass]]
        logits = model(torch.cat(chunk).to(device)).float().cpu()
        yield logits.view(len(chunk), tta.views_per_image, -1)


def tta_probabilities(
    model: nn.Module,
    images: Sequence,
    data_config: Mapping,
    mode: str = "none",
    batch_size: int = 32,
    device: torch.device | str | None = None,
    multilabel: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(N, C) class probabilities: softmax of each view's logits, averaged over the views of
    each image (probabilities are averaged, not logits). `model` returns logits and is in eval
    mode; `images` are HxWx3 uint8 arrays (or what ``as_rgb_array`` takes: paths, PIL images);
    `batch_size` caps the views per forward pass; `device`: the model's when None.
    With ``mode="none"`` the result is exactly the softmax of the plain evaluation logits (same
    batches). No images: an empty (0, 0) tensor. `multilabel`: each label's sigmoid, averaged.
    `temperature`: each view's softmax is of its logits / temperature (calibration)."""
    tta = TestTimeAugmentation(data_config, mode)
    chunks = [
        (logits.sigmoid() if multilabel else (logits / temperature).softmax(dim=2)).mean(dim=1)
        for logits in _view_logits(model, images, tta, batch_size, device)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def tta_log_probabilities(
    model: nn.Module,
    images: Sequence,
    data_config: Mapping,
    mode: str = "none",
    batch_size: int = 32,
    device: torch.device | str | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(N, C) log of the averaged probabilities of :func:`tta_probabilities`, computed in log
    space (logsumexp of the views' log-softmax, minus log V), so a probability that underflows
    to 0 in float32 still has a finite log. Usable as logits: their softmax gives back the
    averaged probabilities, so argmax and cross-entropy are those of the averaged prediction."""
    tta = TestTimeAugmentation(data_config, mode)
    chunks = [
        (logits / temperature).log_softmax(dim=2).logsumexp(dim=1) - math.log(tta.views_per_image)
        for logits in _view_logits(model, images, tta, batch_size, device)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def readable(samples: Iterable, skipped: dict[str, str]) -> Iterator[tuple[np.ndarray, object]]:
    """(image, label) for each sample whose file decodes; the others go to `skipped` (path -> reason)."""
    for item, label in samples:
        if isinstance(item, (str, os.PathLike)):
            try:
                item = load_rgb(item)
            except UnreadableImage as err:
                skipped[str(item)] = str(err)
                continue
        yield item, label


def evaluate_with_tta(
    model: nn.Module,
    data_config: Mapping,
    samples: Sequence,
    classes: list[str],
    mode: str = "none",
    batch_size: int = 32,
) -> dict:
    """Accuracy and mean cross-entropy of the averaged prediction (:func:`tta_probabilities`) on
    labelled `samples` ((path or HxWx3 uint8 array, label index) pairs), e.g. the end-of-run test
    split: ``{"acc", "loss", "views", "skipped": {path: reason}}``. Files that do not decode are
    skipped, not fatal; with no image left, acc and loss are 0. Files are decoded a chunk at a
    time, so memory holds one chunk of images."""
    log_probs, labels, skipped = labelled_log_probabilities(model, data_config, samples, len(classes), mode, batch_size)
    # classification_report takes logits: argmax and F.cross_entropy (a log-softmax inside).
    # The log of averaged probabilities is its own log-softmax, so accuracy and loss are exactly
    # those of the averaged prediction.
    report = classification_report(log_probs, labels, list(classes))
    return {"acc": report["accuracy"], "loss": report["loss"], "views": check_tta(mode), "skipped": skipped}


def labelled_log_probabilities(
    model: nn.Module,
    data_config: Mapping,
    samples: Sequence,
    num_classes: int,
    mode: str = "none",
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(:func:`tta_log_probabilities` (N, C), labels (N,), skipped: path -> reason) of labelled
    `samples`, decoded a chunk at a time; files that do not decode are skipped. With mode
    ``none`` the rows are the log-softmax of the plain logits: usable as logits (softmax,
    argmax, temperature scaling give the same results)."""
    skipped: dict[str, str] = {}
    per_chunk = max(1, batch_size // check_tta(mode))
    decoded = readable(samples, skipped)
    log_probs, labels = [torch.empty(0, num_classes)], [torch.empty(0, dtype=torch.long)]
    while chunk := list(islice(decoded, per_chunk)):
        log_probs.append(tta_log_probabilities(model, [image for image, _ in chunk], data_config, mode, batch_size))
        labels.append(torch.tensor([label for _, label in chunk], dtype=torch.long))
    return torch.cat(log_probs), torch.cat(labels), skipped


__all__ = [
    "TTA_MODES",
    "TestTimeAugmentation",
    "check_tta",
    "evaluate_with_tta",
    "labelled_log_probabilities",
    "tta_log_probabilities",
    "tta_probabilities",
]
