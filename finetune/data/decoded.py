"""Decode once: every image of a run decoded to uint8 in memory, shrunk to what the pipelines need.

Decoding a JPEG costs a few milliseconds per megapixel on one core, at every epoch, in every
DataLoader worker. Photos from a camera (2,000 px and more) make that the bottleneck of a CPU
run or of a GPU fed by few cores. Here each file is decoded once (JPEGs at a reduced DCT scale
when they are much larger than needed), resized so its short side is at most twice the
evaluation resize (so random crops down to a quarter of the area keep full resolution), and
kept as a uint8 array; the albumentations pipelines then run on those arrays.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import cv2
import numpy as np
from tqdm.auto import tqdm

from finetune.data.check import DataReport
from finetune.data.images import UnreadableImage, load_rgb
from finetune.data.sources import SPLITS, DataSplits, Sample
from finetune.data.transforms import input_size
from finetune.errors import ConfigError

log = logging.getLogger(__name__)


def stored_short_side(height: int, width: int, crop_pct: float) -> int:
    """The short side images are kept at: twice the evaluation pipeline's resize."""
    return 2 * int(math.floor(min(height, width) / (crop_pct or 1.0)))


def _stored_shape(width: int, height: int, short_side: int) -> tuple[int, int]:
    scale = min(1.0, short_side / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def estimated_bytes(splits: DataSplits, short_side: int) -> int:
    """Memory the decoded splits would take, from the image sizes read at scan time."""
    total = 0
    for split in SPLITS:
        for item, _ in getattr(splits, split):
            if isinstance(item, np.ndarray):
                total += item.nbytes
            elif item in splits.sizes:
                w, h = _stored_shape(*splits.sizes[item], short_side)
                total += w * h * 3
    return total


def _decode(item, short_side: int):
    if isinstance(item, np.ndarray):
        return item
    image = load_rgb(item, min_short_side=short_side)
    height, width = image.shape[:2]
    w, h = _stored_shape(width, height, short_side)
    if (w, h) != (width, height):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def decode_splits(splits: DataSplits, short_side: int, threads: int, failures: dict[str, str]) -> DataSplits:
    """A copy of `splits` whose samples are decoded arrays; unreadable files go to `failures`."""

    def one(sample: Sample):
        item, label = sample
        try:
            return _decode(item, short_side), label
        except UnreadableImage as err:
            failures[item] = str(err)
            return None

    decoded = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # PIL and OpenCV release the GIL
        for split in SPLITS:
            samples: Sequence[Sample] = getattr(splits, split)
            results = list(
                tqdm(
                    pool.map(one, samples),
                    total=len(samples),
                    desc=f"decoding {split} images once",
                    unit="img",
                    leave=False,
                    disable=None if samples else True,
                )
            )
            decoded[split] = [r for r in results if r is not None]
    return replace(splits, **decoded)


def decoded_images(
    cache: Mapping,
    splits: DataSplits,
    data_config: Mapping,
    image_size: int | None,
    report: DataReport,
    threads: int,
    *,
    ahead_pays: bool = True,
) -> DataSplits | None:
    """`splits` decoded once into memory as the ``data.cache`` settings say (``decoded: auto``
    when the files fit in ``memory_gb`` and `ahead_pays`: false when the run reads fewer images
    than it would decode ahead), or None to decode at every epoch. Files that fail to decode are
    added to `report`."""
    setting = cache["decoded"]
    if setting not in ("auto", True, False):
        raise ConfigError(f"data.cache.decoded={setting!r}; use auto, true or false.")
    files = any(
        isinstance(item, str) and not getattr(item, "streamed", False)  # streamed: larger than memory, no sizes
        for split in SPLITS
        for item, _ in getattr(splits, split)
    )
    if setting is False or not files:
        return None
    if setting == "auto" and not ahead_pays:
        log.info("decoded-image cache: off (the capped run reads fewer images than decoding ahead would decode)")
        return None
    height, width = input_size(data_config, image_size)
    short_side = stored_short_side(height, width, data_config.get("crop_pct"))
    memory_gb = cache["memory_gb"]
    needed, budget = estimated_bytes(splits, short_side), float(memory_gb) * 2**30
    if needed > budget:
        message = f"needs {needed / 2**30:.1f} GB, more than data.cache.memory_gb={memory_gb}"
        if setting is True:
            raise ConfigError(f"data.cache.decoded=true {message}: raise the budget or use data.cache.decoded=auto.")
        log.info("decoded-image cache: off (%s)", message)
        return None
    started, failures = time.perf_counter(), {}
    decoded = decode_splits(splits, short_side, threads, failures)
    report.add_unreadable(failures)
    log.info(
        "decoded-image cache: on, %.0f MB of uint8 images (short side <= %d px), decoded in %.1f s",
        needed / 2**20,
        short_side,
        time.perf_counter() - started,
    )
    return decoded
