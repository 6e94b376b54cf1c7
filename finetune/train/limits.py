"""What a run reads of its data when ``trainer.limit_train_batches`` / ``limit_val_batches`` cap
its epochs: Lightning's own rule, applied ahead of the Trainer so that what is prepared once for
a run (images decoded ahead, the end-of-run calibration pass) is sized to what the run uses."""

from __future__ import annotations

import math
from collections.abc import Mapping


def limited_batches(batches: int, limit) -> int:
    """Batches Lightning runs of a loader of `batches` under a ``limit_*_batches`` value: an int
    is a number of batches, a float a fraction of them, None (or 1.0) all of them — Lightning's
    ``_parse_num_batches``, which raises when a fraction leaves no batch."""
    if limit is None or isinstance(limit, bool):
        return batches
    if isinstance(limit, int):
        return min(batches, limit)
    return int(batches * float(limit))


def images_per_epoch(images: int, batch_size: int, limit) -> int:
    """Images of a split of `images` one epoch reads under `limit` (at most all of them)."""
    return min(images, limited_batches(math.ceil(images / batch_size), limit) * batch_size)


def capped(trainer_cfg: Mapping, key: str) -> bool:
    """Whether ``trainer.<key>`` (``limit_train_batches``, ...) is set to less than everything:
    less than all of a loader longer than any real one, by `limited_batches`' reading."""
    everything = 1 << 40
    return limited_batches(everything, trainer_cfg.get(key)) < everything


def decoding_ahead_pays(trainer_cfg: Mapping, batch_size: int, split_sizes: Mapping[str, int]) -> bool:
    """False when a capped run reads fewer images over all its epochs than decoding every image
    of its splits ahead would decode (a few capped steps on a large set); True otherwise."""
    if not (capped(trainer_cfg, "limit_train_batches") or capped(trainer_cfg, "limit_val_batches")):
        return True
    epochs = trainer_cfg.get("max_epochs") or 1
    reads = epochs * (
        images_per_epoch(split_sizes.get("train", 0), batch_size, trainer_cfg.get("limit_train_batches"))
        + images_per_epoch(split_sizes.get("val", 0), batch_size, trainer_cfg.get("limit_val_batches"))
    )
    return reads >= sum(split_sizes.values())
