"""The feature cache's files: their key, and writing and checking them.

A cache file is named by :func:`cache_key`, a digest over everything that determines the
features (see :mod:`finetune.compute.features`). :func:`save` writes it atomically with a SHA-256
of every tensor in its metadata; :func:`load` trusts it only when those checksums, the shapes and
the labels (exactly those of the run's samples) all match, and says why not otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from finetune.compute.speed import Speed
from finetune.data.file_memo import StoredImage, file_digest
from finetune.data.labels import multi_hot
from finetune.data.sources import Sample
from finetune.files import follow_umask

FORMAT_VERSION = 3  # 2: content hashes in the key, checksums in the file; 3: evaluation views at full precision
SPLITS = ("train", "val", "test", "calibration")


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
            elif isinstance(item, StoredImage):  # named by its dataset's fingerprint, split and row
                add([str(item), label])
            else:
                stat = os.stat(item)
                add([str(item), stat.st_size, stat.st_mtime_ns, file_digest(item), label])
    for name, pipeline in pipelines.items():
        add([name, A.to_dict(pipeline)])
    return digest.hexdigest()[:40]


def save(cached: CachedFeatures, path: Path) -> None:
    """Write atomically: a concurrent sweep trial sees the whole file or none of it. The metadata
    holds a SHA-256 of every tensor and of the skipped list, checked by :func:`load`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"features.{k}": v.contiguous() for k, v in cached.features.items()}
    tensors |= {f"labels.{k}": v.contiguous() for k, v in cached.labels.items()}
    skipped = json.dumps(cached.skipped)
    metadata = {"skipped": skipped, "format": str(FORMAT_VERSION), "sha256": json.dumps(checksums(tensors, skipped))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        follow_umask(tmp)  # a cache shared by a team's runs
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def checksums(tensors: dict[str, torch.Tensor], skipped: str) -> dict[str, str]:
    sums = {
        name: hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        for name, t in tensors.items()
    }
    return sums | {"metadata.skipped": hashlib.sha256(skipped.encode()).hexdigest()}


def load(path: Path, splits: dict[str, Sequence[Sample]], views: int, num_labels: int | None = None) -> CachedFeatures:
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
    actual = checksums(tensors, skipped_json)
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
