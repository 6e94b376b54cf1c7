"""Samples + pipelines -> a LightningDataModule."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from finetune.data.images import load_rgb
from finetune.data.sources import DataSplits, Sample
from finetune.errors import DataError


class ImageDataset(Dataset):
    """``(path_or_array, label)`` samples through an albumentations pipeline -> (tensor, label)."""

    def __init__(self, samples: list[Sample], transform: Callable):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        item, label = self.samples[index]
        if isinstance(item, np.ndarray):
            image = item
        else:
            try:
                image = load_rgb(item)
            except Exception as err:
                raise DataError(f"Cannot decode {item}: {type(err).__name__}: {err}. Remove or replace the file.") from err
        return self.transform(image=image)["image"], label


def _worker_init(_: int) -> None:
    cv2.setNumThreads(0)  # OpenCV's own thread pool in every worker oversubscribes the CPU


class ImageDataModule(L.LightningDataModule):
    def __init__(self, splits: DataSplits, train_transform: Callable, eval_transform: Callable,
                 batch_size: int = 32, num_workers: int = 2):
        super().__init__()
        self.splits = splits
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.num_workers = num_workers

    @property
    def classes(self) -> list[str]:
        return self.splits.classes

    def train_dataloader(self) -> DataLoader:
        return self._loader(ImageDataset(self.splits.train, self.train_transform), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(ImageDataset(self.splits.val, self.eval_transform), shuffle=False)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_worker_init,
        )
