"""Samples + pipelines -> a LightningDataModule whose batches survive undecodable files.

Batches are ``(images, labels, failures)``: a file that passed the header check but cannot be
decoded (a truncated JPEG) is left out of its batch and reported in ``failures`` as
``(path, reason)``, so one bad file never ends a run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from finetune.data.epochs import ChunkOrder, EpochSampler, RankShare, ShardShare, derived_seed
from finetune.data.images import UnreadableImage, load_rgb
from finetune.data.labels import multi_hot
from finetune.data.sources import DataSplits, Sample
from finetune.errors import ConfigError, DataError

BALANCE_MODES = ("none", "weighted_loss", "sampler")


@dataclass(frozen=True)
class Unreadable:
    path: str
    reason: str


class ImageDataset(Dataset):
    """``(path_or_array, label)`` samples through an albumentations pipeline -> (tensor, label),
    or :class:`Unreadable` for a file that cannot be decoded.

    `num_labels` (multi-label data): labels are tuples of class indices, returned as multi-hot
    float vectors of that length.

    With a `seed`, an index may be an ``(epoch, index)`` pair (from :class:`EpochSampler`): the
    pipeline is then re-seeded with (seed, epoch, index), so a sample's augmentation depends on
    nothing else (not the worker, not the samples drawn before it).
    """

    def __init__(
        self, samples: list[Sample], transform: Callable, seed: int | None = None, num_labels: int | None = None
    ):
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.num_labels = num_labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, int]):
        if isinstance(index, tuple):
            epoch, index = index
            if self.seed is not None and hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(derived_seed(self.seed, epoch, index))
        item, label = self.samples[index]
        if self.num_labels is not None:
            label = multi_hot(label, self.num_labels)
        if isinstance(item, np.ndarray):
            image = item
        else:
            try:
                image = load_rgb(item)
            except UnreadableImage as err:
                return Unreadable(item, str(err))
        return self.transform(image=image)["image"], label


def collate_skipping_unreadable(batch: list):
    """default_collate over the readable items; the unreadable ones as a list of (path, reason)."""
    failures = [(b.path, b.reason) for b in batch if isinstance(b, Unreadable)]
    good = [b for b in batch if not isinstance(b, Unreadable)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), failures
    images, labels = default_collate(good)
    return images, labels, failures


def class_weights(splits: DataSplits) -> torch.Tensor:
    """Inverse-frequency weights over the training split, averaging 1 per sample. Multi-label
    data: each label's positive-class weight for BCE, negatives / positives (rare labels weigh more)."""
    counts = torch.tensor(list(splits.counts("train").values()), dtype=torch.float)
    if splits.multilabel:
        return (len(splits.train) - counts) / counts.clamp(min=1)
    weights = counts.sum() / (len(counts) * counts.clamp(min=1))
    return weights


def explain_worker_failure(err: RuntimeError) -> Exception:
    """A DataError with the usual cause and fixes when `err` says a DataLoader worker died;
    `err` itself otherwise."""
    if "DataLoader worker" not in str(err):
        return err
    return DataError(
        f"A data loading worker died ({err}). This is usually shared memory (/dev/shm) running out. "
        f"Try data.num_workers=0 or a smaller data.batch_size, or give the container more shared "
        f"memory (docker run --shm-size=8g)."
    )


def worker_init(_: int) -> None:
    cv2.setNumThreads(0)  # OpenCV's own thread pool in every worker oversubscribes the CPU
    # Every worker holds a copy of the same albumentations generator: give each its own stream,
    # derived from the worker's torch seed (itself determined by the run's seed).
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


class ImageDataModule(L.LightningDataModule):
    def __init__(
        self,
        splits: DataSplits,
        train_transform: Callable,
        eval_transform: Callable,
        batch_size: int = 32,
        num_workers: int = 2,
        balance: str = "none",
        seed: int = 0,
    ):
        super().__init__()
        if balance not in BALANCE_MODES:
            raise ConfigError(f"data.balance={balance!r}; choose one of {', '.join(BALANCE_MODES)}.")
        if balance == "sampler" and splits.multilabel:
            raise ConfigError(
                "data.balance=sampler draws one class per image; multi-label images carry several. "
                "Use data.balance=weighted_loss (a positive-class weight per label)."
            )
        self.splits = splits
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.balance = balance
        self.seed = seed
        # The trainer's count of epochs begun, read when the training iterator is made (the run
        # sets it: it knows where a resumed run restarts); None: epoch 0.
        self.starting_epoch: Callable[[], int] | None = None

    @property
    def classes(self) -> list[str]:
        return self.splits.classes

    @property
    def num_labels(self) -> int | None:
        """The multi-hot length of multi-label data's targets; None for class indices."""
        return len(self.splits.classes) if self.splits.multilabel else None

    def dataset(self, split: str) -> Dataset:
        """The split's dataset: decoded images through the split's pipeline."""
        if split == "train":  # re-seeded per (epoch, index) that EpochSampler yields
            return ImageDataset(self.splits.train, self.train_transform, self.seed, self.num_labels)
        return ImageDataset(getattr(self.splits, split), self.eval_transform, num_labels=self.num_labels)

    def train_labels(self) -> list[int]:
        return [label for _, label in self.splits.train]

    def train_dataloader(self) -> DataLoader:
        weights = None
        if self.balance == "sampler":
            # Each draw picks a class uniformly (in expectation), then an image of it.
            weights = class_weights(self.splits)[self.train_labels()]
        # Order and augmentation are functions of (seed, epoch): a resumed run redoes an epoch exactly.
        # Streamed shards (chunks: the rows each chunk stores) are read a chunk at a time, unless
        # weighted; not when a calibration split was carved out of train (its rows are renumbered).
        chunks = self.splits.chunks if sum(map(len, self.splits.chunks)) == len(self.splits.train) else []
        chunked = bool(chunks) and weights is None
        sampler = ChunkOrder(chunks, self.seed) if chunked else EpochSampler(len(self.splits.train), self.seed, weights)
        # Worker processes fetch their first indices as soon as the epoch's iterator exists, which a
        # resumed run creates before Lightning's set_epoch: start at the epoch the run is in.
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:  # DDP: this rank's share of that order
            share = ShardShare if chunked else RankShare
            sampler = share(sampler, trainer.world_size, trainer.global_rank)
        sampler.set_epoch(self.starting_epoch() if self.starting_epoch is not None else 0)
        return self._loader(self.dataset("train"), shuffle=False, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)

    def _loader(self, dataset: Dataset, shuffle: bool, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=worker_init,
            collate_fn=collate_skipping_unreadable,
        )
