"""Frozen-feature cache: when nothing below the head trains, compute the backbone once per image.

A frozen backbone (no trainable parameter, BatchNorm in eval, no active dropout) is a fixed
function: re-running it every epoch, as a plain training loop does, repeats the same forward
pass. Here each image goes through it once — ``views`` times for the training images when the
training pipeline is random: view 0 through the evaluation pipeline (what a prediction sees), the
others a fresh augmentation each — and the head trains on the stored pooled features (SGD: epoch
``e`` on view ``e % views``; L-BFGS: on all of them at once).

Cache files live in ``data.cache.dir`` (shared by every run and sweep trial) and are named by a
key over everything that determines the features: the backbone's architecture and weights
(hashed tensor by tensor), the data files (path, size, mtime and a hash of their bytes, so a file
swapped for another with its mtime restored is noticed) or arrays (hashed), the pipelines, the
seed, the number of views, precision and memory layout. Changing any of them makes a new file.
The training views are computed under the run's precision (autocast); the evaluation splits
(val, test, calibration) at full precision, as ``finetune.load`` predicts: every end-of-run score
of a frozen-backbone run (calibration, thresholds, metrics) comes from them, not from another pass.

An entry is trusted only after checks on load: a SHA-256 of every stored tensor (kept in the
file's metadata), the shapes, and the labels, which must be exactly those of the run's samples.
An entry failing any check is recomputed, with a one-line warning: never a wrong number.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune.compute.feature_file import SPLITS, CachedFeatures, cache_key, load, save
from finetune.compute.speed import Speed, to_channels_last
from finetune.data.datamodule import ImageDataset, collate_skipping_unreadable, worker_init
from finetune.data.sources import DataSplits, Sample
from finetune.data.transforms import augmentation_is_random
from finetune.errors import ConfigError
from finetune.model.classifier import Classifier
from finetune.model.freeze import batchnorm_layers
from finetune.model.modes import evaluating

log = logging.getLogger(__name__)

_save, _load = save, load  # the names tests and older callers import


@dataclass(frozen=True)
class FeatureCacheSettings:
    """How the features of a run are computed and where they are kept: ``data.cache`` (folder,
    views) with the run's batch size, seed and loader workers.

    `architecture` labels the backbone in the cache key: its name with the head's pooling (which
    changes the pooled features). `augmented`: whether the training pipeline is random; when it is
    not, one view is all there is and the training images go through the evaluation pipeline.
    `num_labels`: multi-label samples, whose label sets are stored as multi-hot rows of that length.
    """

    architecture: str
    dir: Path
    views: int
    augmented: bool
    batch_size: int
    num_workers: int
    seed: int
    num_labels: int | None = None

    @classmethod
    def from_config(
        cls, cfg, backbone_name: str, num_workers: int, *, augmented: bool | None = None, num_labels: int | None = None
    ) -> FeatureCacheSettings:
        """The settings of run config `cfg` (``data.cache``, ``data.batch_size``, ``seed``, the head's
        pooling); `augmented` defaults to whether ``cfg.augment`` is random."""
        return cls(
            architecture=f"{backbone_name}|pool={cfg.head.get('pool')}",
            dir=Path(cfg.data.cache.dir),
            views=cfg.data.cache.views,
            augmented=augmentation_is_random(cfg.augment) if augmented is None else augmented,
            batch_size=cfg.data.batch_size,
            num_workers=num_workers,
            seed=cfg.seed,
            num_labels=num_labels,
        )


def not_cacheable_reason(model: Classifier) -> str | None:
    """Why `model`'s backbone output can change during training (None: it cannot, cache it)."""
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    if trainable:
        return f"{len(trainable)} backbone tensors train (e.g. {trainable[0]})"
    plan = model.freeze_plan
    in_eval = set(plan.norms_in_eval(0)) if plan is not None else set(model.frozen_norms)
    for name in batchnorm_layers(model.backbone):
        if f"backbone.{name}" not in in_eval:
            return f"BatchNorm {name} updates its statistics in training (freeze.batchnorm=train)"
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return f"dropout {name} is active in training"
        if getattr(module, "drop_prob", 0) and type(module).__name__ == "DropPath":
            return f"drop-path {name} is active in training"
    if getattr(model.backbone, "drop_rate", 0):
        return "backbone.drop_rate > 0 applies dropout inside the backbone"
    return None


def extract(
    backbone: nn.Module,
    samples: Sequence[Sample],
    transform: Callable,
    speed: Speed,
    settings: FeatureCacheSettings,
    *,
    seed: int,
    desc: str,
    full_precision: bool = False,
    into: Callable[[int, int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(features (N, D) float32, labels (N,), unreadable path -> reason) of one pass over `samples`
    (batch size, workers and label kind from `settings`). The features are written in order into
    ``into(len(samples), D)`` (default: a new tensor), and are its first N rows (fewer than
    `samples` when files were unreadable): never a list of batches joined by a copy, which at
    80,000 images of 1,280 floats held 410 MB twice.

    The pass draws its randomness from `seed` only: the global RNG state is left untouched, so a
    run that fills the cache continues exactly like one that finds it.
    """
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
    loader = DataLoader(
        ImageDataset(list(samples), transform, num_labels=settings.num_labels),
        batch_size=settings.batch_size,
        shuffle=False,
        num_workers=settings.num_workers,
        worker_init_fn=worker_init,
        collate_fn=collate_skipping_unreadable,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=speed.device.type == "cuda",
    )
    features, filled, labels, skipped = None, 0, [], {}
    dtype = None if full_precision else speed.autocast_dtype
    autocast = torch.autocast(speed.device.type, dtype=dtype) if dtype is not None else nullcontext()
    with torch.inference_mode(), autocast:
        for images, batch_labels, failures in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
            skipped.update(failures)
            if not len(batch_labels):
                continue
            images = images.to(speed.device, non_blocking=True)
            if speed.channels_last:
                images = to_channels_last(images)
            rows = backbone(images).float()
            if features is None:
                with torch.inference_mode(False):  # a normal tensor: the head trains on it
                    features = (into or torch.empty)(len(samples), rows.shape[1])
            features[filled : filled + len(rows)] = rows  # from the device, too
            filled += len(rows)
            labels.append(batch_labels)
    if features is None:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    return features[:filled], torch.cat(labels), skipped


def features_for_run(
    cfg,
    model: Classifier,
    backbone_name: str,
    splits: DataSplits,
    train_transform: A.Compose,
    eval_transform: A.Compose,
    speed: Speed,
    num_workers: int,
) -> CachedFeatures | None:
    """The frozen backbone's features for every image of a run, as ``data.cache.features`` says
    (``auto``: whenever :func:`not_cacheable_reason` finds nothing), or None to train on images."""
    setting = cfg.data.cache["features"]
    if setting not in ("auto", True, False):
        raise ConfigError(f"data.cache.features={setting!r}; use auto, true or false.")
    if setting is False:
        return None
    reason = not_cacheable_reason(model)
    if reason is not None:
        if setting is True:
            raise ConfigError(
                f"data.cache.features=true needs a frozen backbone, but {reason}. "
                f"Use +recipe=freeze_all_but_head, or data.cache.features=auto."
            )
        log.info("feature cache: off (%s)", reason)
        return None
    settings = FeatureCacheSettings.from_config(
        cfg, backbone_name, num_workers, num_labels=len(splits.classes) if splits.multilabel else None
    )
    by_split = {split: getattr(splits, split) for split in SPLITS}
    cached = cached_features(model.backbone, by_split, train_transform, eval_transform, speed, settings)
    how = "loaded" if cached.hit else "computed"
    views = (
        f"{cached.views} views per training image (the evaluation view, {cached.views - 1} augmented)"
        if settings.augmented
        else "no augmentation: one view"
    )
    log.info("feature cache: on, backbone frozen; %s; %s in %.1f s: %s", views, how, cached.seconds, cached.path)
    return cached


def cached_features(
    backbone: nn.Module,
    splits: dict[str, Sequence[Sample]],
    train_transform: A.Compose,
    eval_transform: A.Compose,
    speed: Speed,
    settings: FeatureCacheSettings,
) -> CachedFeatures:
    """`backbone`'s pooled outputs for every sample: loaded from ``settings.dir`` when this exact
    setup was computed before, else computed (progress bars) and stored."""
    views = max(1, int(settings.views)) if settings.augmented else 1
    pipelines = {"train": train_transform if settings.augmented else eval_transform, "eval": eval_transform}
    key = cache_key(
        backbone, settings.architecture, splits, pipelines, settings.seed, views, speed, settings.num_labels
    )
    path = Path(settings.dir).expanduser().resolve() / "features" / f"{key}.safetensors"
    started = time.perf_counter()
    if path.exists():
        try:
            loaded = load(path, splits, views, settings.num_labels)
        except ValueError as problem:
            log.warning("feature cache: %s failed its check (%s); computing it again", path.name, problem)
        else:
            loaded.seconds = time.perf_counter() - started
            return loaded
    with _on_device(backbone, speed):
        result = _compute(backbone, splits, pipelines, views, speed, settings)
    result.path = path
    try:
        save(result, path)
    except OSError as err:  # a read-only or full cache folder: the cache is only a speed-up
        log.warning(
            "feature cache: could not write %s (%s); going on with the features in memory", path, err.strerror or err
        )
    result.seconds = time.perf_counter() - started
    return result


@contextmanager
def _on_device(backbone: nn.Module, speed: Speed) -> Iterator[None]:
    """`backbone` in eval mode on the run's device and memory layout; afterwards each module's own
    mode, device and layout back (see `evaluating`)."""
    device_before = next(backbone.parameters()).device
    backbone.to(speed.device)
    if speed.channels_last:
        backbone.to(memory_format=torch.channels_last)
    try:
        with evaluating(backbone):
            yield
    finally:
        backbone.to(device_before)
        if speed.channels_last:
            backbone.to(memory_format=torch.contiguous_format)


def _compute(
    backbone: nn.Module,
    splits: dict[str, Sequence[Sample]],
    pipelines: dict[str, A.Compose],
    views: int,
    speed: Speed,
    settings: FeatureCacheSettings,
) -> CachedFeatures:
    """One pass per training view (view 0 through the evaluation pipeline at full precision: the
    center crop a prediction sees; the others augmented), one per evaluation split."""
    labels, skipped, kept = {}, {}, 0
    stacked: torch.Tensor | None = None  # every view is written into one (V, N, D) tensor

    def into_view(view: int) -> Callable[[int, int], torch.Tensor]:
        def into(rows: int, width: int) -> torch.Tensor:
            nonlocal stacked
            if stacked is None:
                stacked = torch.empty(views, rows, width)
            return stacked[view]

        return into

    for view in range(views):
        desc = f"caching features: train view {view + 1}/{views}" if views > 1 else "caching features: train"
        f, y, bad = extract(
            backbone,
            splits["train"],
            pipelines["train"] if view else pipelines["eval"],
            speed,
            settings,
            seed=settings.seed * 1_000 + view,
            desc=desc,
            full_precision=not view,
            into=into_view(view),
        )
        kept = len(f)  # the same in every view: an unreadable file is left out of each
        labels["train"], skipped = y, {**skipped, **bad}
    # Copied only when files were unreadable (.contiguous() of the whole tensor is the tensor itself).
    features = {"train": stacked[:, :kept].contiguous() if stacked is not None else torch.empty(views, 0)}
    for split in SPLITS[1:]:
        if splits.get(split):
            features[split], labels[split], bad = extract(
                backbone,
                splits[split],
                pipelines["eval"],
                speed,
                settings,
                seed=settings.seed,
                desc=f"caching features: {split}",
                full_precision=True,
            )
            skipped.update(bad)
    return CachedFeatures(features, labels, skipped, None, hit=False)


__all__ = [
    "SPLITS",
    "CachedFeatures",
    "FeatureCacheSettings",
    "cached_features",
    "extract",
    "features_for_run",
    "not_cacheable_reason",
]
