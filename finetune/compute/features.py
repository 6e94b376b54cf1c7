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

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from finetune.compute.speed import Speed, to_channels_last
from finetune.data.datamodule import ImageDataModule, ImageDataset, collate_skipping_unreadable, worker_init
from finetune.data.file_memo import file_digest
from finetune.data.labels import multi_hot
from finetune.data.sources import DataSplits, Sample
from finetune.data.transforms import augmentation_is_random
from finetune.errors import ConfigError
from finetune.files import follow_umask
from finetune.model.classifier import Classifier
from finetune.model.freeze import batchnorm_layers

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: content hashes in the key, checksums in the file; 3: evaluation views at full precision
SPLITS = ("train", "val", "test", "calibration")


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


@dataclass
class CachedFeatures:
    """Pooled features per split: ``train`` is (views, N, D), ``val``/``test`` (N, D)."""

    features: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable path -> reason
    path: Path | None = None
    hit: bool = False
    seconds: float = 0.0

    @property
    def views(self) -> int:
        return int(self.features["train"].shape[0])


def cache_key(
    backbone: nn.Module,
    architecture: str,
    splits: dict[str, Sequence[Sample]],
    pipelines: dict[str, A.Compose],
    seed: int,
    views: int,
    speed: Speed,
    num_labels: int | None = None,
) -> str:
    """A hex digest over everything that determines the cached features."""
    digest = hashlib.sha256()

    def add(value) -> None:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())

    add(
        {
            "format": FORMAT_VERSION,
            "architecture": architecture,
            "seed": seed,
            "views": views,
            "autocast": str(speed.autocast_dtype),
            "channels_last": speed.channels_last,
        }
        | ({"multi_hot": num_labels} if num_labels is not None else {})
    )
    for name, tensor in backbone.state_dict().items():
        add([name, list(tensor.shape), str(tensor.dtype)])
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for split, samples in splits.items():
        add(split)
        for item, label in samples:
            if isinstance(item, np.ndarray):
                add([list(item.shape), str(item.dtype), label])
                digest.update(np.ascontiguousarray(item).tobytes())
            else:
                stat = os.stat(item)
                add([str(item), stat.st_size, stat.st_mtime_ns, file_digest(item), label])
    for name, pipeline in pipelines.items():
        add([name, A.to_dict(pipeline)])
    return digest.hexdigest()[:40]


def extract(
    backbone: nn.Module,
    samples: Sequence[Sample],
    transform: Callable,
    batch_size: int,
    num_workers: int,
    speed: Speed,
    seed: int,
    desc: str,
    num_labels: int | None = None,
    full_precision: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(features (N, D) float32, labels (N,), unreadable path -> reason) of one pass over `samples`.

    The pass draws its randomness from `seed` only: the global RNG state is left untouched, so a
    run that fills the cache continues exactly like one that finds it.
    """
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
    loader = DataLoader(
        ImageDataset(list(samples), transform, num_labels=num_labels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=worker_init,
        collate_fn=collate_skipping_unreadable,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=speed.device.type == "cuda",
    )
    features, labels, skipped = [], [], {}
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
            features.append(backbone(images).float().cpu())
            labels.append(batch_labels)
    if not features:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    return torch.cat(features), torch.cat(labels), skipped


def cache_settings(cfg, backbone_name: str) -> tuple[str, Path]:
    """(architecture label, cache folder) of a run config: the backbone's name with the head's
    pooling (it changes the pooled features), and ``data.cache.dir``."""
    return f"{backbone_name}|pool={cfg.head.get('pool')}", Path(cfg.data.cache.dir)


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
    cache = cfg.data.cache
    setting = cache["features"]
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
    augmented = augmentation_is_random(cfg.augment)
    architecture, cache_dir = cache_settings(cfg, backbone_name)
    cached = cached_features(
        model.backbone,
        architecture,
        {split: getattr(splits, split) for split in SPLITS},
        train_transform,
        eval_transform,
        augmented,
        cache["views"],
        cache_dir,
        cfg.data.batch_size,
        num_workers,
        speed,
        cfg.seed,
        len(splits.classes) if splits.multilabel else None,
    )
    how = "loaded" if cached.hit else "computed"
    views = (
        f"{cached.views} views per training image (the evaluation view, {cached.views - 1} augmented)"
        if augmented
        else "no augmentation: one view"
    )
    log.info("feature cache: on, backbone frozen; %s; %s in %.1f s: %s", views, how, cached.seconds, cached.path)
    return cached


def cached_features(
    backbone: nn.Module,
    architecture: str,
    splits: dict[str, Sequence[Sample]],
    train_transform: A.Compose,
    eval_transform: A.Compose,
    augmented: bool,
    views: int,
    cache_dir: Path,
    batch_size: int,
    num_workers: int,
    speed: Speed,
    seed: int,
    num_labels: int | None = None,
) -> CachedFeatures:
    """`backbone`'s pooled outputs for every sample: loaded from `cache_dir` when this exact setup
    was computed before, else computed (progress bars) and stored.

    `augmented`: whether the training pipeline is random; when it is not, one view is all there
    is and the training images go through the evaluation pipeline. `num_labels`: multi-label
    samples, whose label sets are stored as multi-hot rows of that length.
    """
    views = max(1, int(views)) if augmented else 1
    pipelines = {"train": train_transform if augmented else eval_transform, "eval": eval_transform}
    key = cache_key(backbone, architecture, splits, pipelines, seed, views, speed, num_labels)
    path = Path(cache_dir).expanduser().resolve() / "features" / f"{key}.safetensors"
    started = time.perf_counter()
    if path.exists():
        try:
            loaded = _load(path, splits, views, num_labels)
        except ValueError as problem:
            log.warning("feature cache: %s failed its check (%s); computing it again", path.name, problem)
        else:
            loaded.seconds = time.perf_counter() - started
            return loaded

    was_training, device_before = backbone.training, next(backbone.parameters()).device
    backbone.eval().to(speed.device)
    if speed.channels_last:
        backbone.to(memory_format=torch.channels_last)
    features, labels, skipped = {}, {}, {}
    try:
        train_views = []
        for view in range(views):
            desc = f"caching features: train view {view + 1}/{views}" if views > 1 else "caching features: train"
            # View 0 is the evaluation view (the center crop a prediction sees), the others augmented.
            f, y, bad = extract(
                backbone,
                splits["train"],
                pipelines["train"] if view else eval_transform,
                batch_size,
                num_workers,
                speed,
                seed * 1_000 + view,
                desc,
                num_labels,
                full_precision=not view,
            )
            train_views.append(f)
            labels["train"], skipped = y, {**skipped, **bad}
        features["train"] = torch.stack(train_views)
        for split in SPLITS[1:]:
            if splits.get(split):
                features[split], labels[split], bad = extract(
                    backbone,
                    splits[split],
                    eval_transform,
                    batch_size,
                    num_workers,
                    speed,
                    seed,
                    f"caching features: {split}",
                    num_labels,
                    full_precision=True,
                )
                skipped.update(bad)
    finally:
        backbone.train(was_training).to(device_before)
        if speed.channels_last:
            backbone.to(memory_format=torch.contiguous_format)
    result = CachedFeatures(features, labels, skipped, path, hit=False)
    try:
        _save(result, path)
    except OSError as err:  # a read-only or full cache folder: the cache is only a speed-up
        log.warning(
            "feature cache: could not write %s (%s); going on with the features in memory", path, err.strerror or err
        )
    result.seconds = time.perf_counter() - started
    return result


def _save(cached: CachedFeatures, path: Path) -> None:
    """Write atomically: a concurrent sweep trial sees the whole file or none of it. The metadata
    holds a SHA-256 of every tensor and of the skipped list, checked by :func:`_load`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"features.{k}": v.contiguous() for k, v in cached.features.items()}
    tensors |= {f"labels.{k}": v.contiguous() for k, v in cached.labels.items()}
    skipped = json.dumps(cached.skipped)
    metadata = {"skipped": skipped, "format": str(FORMAT_VERSION), "sha256": json.dumps(_checksums(tensors, skipped))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        follow_umask(tmp)  # a cache shared by a team's runs
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _checksums(tensors: dict[str, torch.Tensor], skipped: str) -> dict[str, str]:
    sums = {
        name: hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        for name, t in tensors.items()
    }
    return sums | {"metadata.skipped": hashlib.sha256(skipped.encode()).hexdigest()}


def _load(path: Path, splits: dict[str, Sequence[Sample]], views: int, num_labels: int | None = None) -> CachedFeatures:
    """The cached features of `splits`, or ValueError saying why the file cannot be trusted:
    unreadable, a checksum that does not match its tensor, or shapes and labels that are not
    those of `splits` (its samples' labels in order, less the files it records as unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        skipped_json = metadata["skipped"]
        expected_sums = json.loads(metadata["sha256"])
        skipped = json.loads(skipped_json)
    except Exception as err:  # a damaged file is a cache miss, never a failed run
        raise ValueError(f"unreadable: {type(err).__name__}") from None
    actual = _checksums(tensors, skipped_json)
    wrong = sorted(name for name in actual.keys() | expected_sums.keys() if actual.get(name) != expected_sums.get(name))
    if wrong:
        raise ValueError(f"checksum mismatch in {', '.join(wrong)}")
    if not isinstance(skipped, dict):
        raise ValueError("malformed list of unreadable files")
    features = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("features.")}
    labels = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("labels.")}
    stored = {split for split in SPLITS if split == "train" or splits.get(split)}
    if set(features) != stored or set(labels) != stored:
        raise ValueError(f"holds splits {sorted(features)}, the run has {sorted(stored)}")
    for split in stored:
        want = [label for item, label in splits[split] if isinstance(item, np.ndarray) or str(item) not in skipped]
        if num_labels is not None:
            want = [multi_hot(label, num_labels).tolist() for label in want]
        if (
            labels[split].dtype != (torch.long if num_labels is None else torch.float32)
            or labels[split].tolist() != want
        ):
            raise ValueError(f"the {split} labels are not the data's")
        rows = features[split].shape[:2] if split == "train" else features[split].shape[:1]
        if tuple(rows) != ((views, len(want)) if split == "train" else (len(want),)):
            raise ValueError(f"the {split} features have shape {tuple(features[split].shape)}")
    return CachedFeatures(features, labels, skipped, path, hit=True)


class FeatureViews(Dataset):
    """(feature, label) pairs of one split; a training split holds several augmented views."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features = features if features.ndim == 3 else features[None]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | tuple[int, int]):
        view = 0
        if isinstance(index, tuple):  # (epoch, index) from EpochSampler: epoch e uses view e % views
            epoch, index = index
            view = epoch % len(self.features)
        return self.features[view, index], self.labels[index]


class FeatureDataModule(ImageDataModule):
    """The datamodule of a run, serving cached features instead of decoded images.

    Loading is in-process (``num_workers=0``): the features are already in memory. Order and
    views follow the training sampler's (epoch, index) pairs, as for images.
    """

    def __init__(self, cached: CachedFeatures, splits: DataSplits, batch_size: int, balance: str, seed: int):
        super().__init__(splits, None, None, batch_size, num_workers=0, balance=balance, seed=seed)
        self.cached = cached

    def dataset(self, split: str) -> Dataset:
        return FeatureViews(self.cached.features[split], self.cached.labels[split])

    def train_labels(self) -> list[int]:
        return self.cached.labels["train"].tolist()
