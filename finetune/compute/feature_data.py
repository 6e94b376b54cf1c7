"""Cached features served to a training run: the datasets and datamodule of a frozen-backbone run
(:mod:`finetune.compute.features` computes and stores them)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from finetune.compute.feature_file import CachedFeatures
from finetune.data.datamodule import ImageDataModule
from finetune.data.sources import DataSplits


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


__all__ = ["FeatureDataModule", "FeatureViews"]
