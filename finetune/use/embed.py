"""Transferable features: pooled backbone outputs for every image, and the quickest probes on them.

``embed`` runs a backbone (pretrained, or a fine-tuned checkpoint's) over every split with the
evaluation pipeline, through the frozen-feature cache (a second call, or a head-only run
without augmentation on the same data, reuses it). ``probe`` fits a logistic regression and a
k-nearest-neighbour classifier on the training features and scores the other splits: the
linear-probe baseline of transfer learning, in seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch import nn

from finetune.compute.features import FeatureCacheSettings, cached_features
from finetune.compute.speed import resolve_num_workers, resolve_speed
from finetune.data.sources import DataSplits
from finetune.data.transforms import build_transforms
from finetune.errors import ConfigError

FORMATS = ("npz", "parquet")


@dataclass
class Embeddings:
    """Features (N, D) float32, labels (N,), paths (N,) and split names (N,) of every readable image."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    splits: np.ndarray
    classes: list[str]
    backbone: str

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.splits == name
        return self.features[mask], self.labels[mask]


def embed(
    backbone: nn.Module, data_config: dict, backbone_name: str, cfg: DictConfig, splits: DataSplits
) -> tuple[Embeddings, dict[str, str]]:
    """(embeddings, unreadable path -> reason) of `splits` under `backbone` (returning pooled
    features) with the evaluation pipeline of `data_config`, and `cfg`'s data and trainer settings."""
    _, eval_tf = build_transforms(data_config, {"random_resized_crop": False}, cfg.data.image_size, seed=cfg.seed)
    _, speed = resolve_speed(OmegaConf.to_container(cfg.trainer, resolve=True), backbone)
    by_split = {"train": splits.train, "val": splits.val, "test": splits.test}
    workers = resolve_num_workers(cfg.data.num_workers, speed.device, in_memory=False)
    settings = FeatureCacheSettings.from_config(cfg, backbone_name, workers, augmented=False)
    cached = cached_features(backbone, by_split, eval_tf, eval_tf, speed, settings)
    parts = {"features": [], "labels": [], "paths": [], "splits": []}
    for split, samples in by_split.items():
        if not samples:
            continue
        features = cached.features[split]
        features = features[0] if features.ndim == 3 else features
        kept = [item for item, _ in samples if not (isinstance(item, str) and item in cached.skipped)]
        parts["features"].append(features.numpy())
        parts["labels"].append(cached.labels[split].numpy())
        parts["paths"].append(
            np.array([item if isinstance(item, str) else f"{split}[{i}]" for i, item in enumerate(kept)])
        )
        parts["splits"].append(np.array([split] * len(kept)))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return Embeddings(**arrays, classes=list(splits.classes), backbone=backbone_name), cached.skipped


def save(embeddings: Embeddings, path: Path) -> Path:
    """Write `embeddings` as ``.npz`` (numpy) or ``.parquet`` (one row per image: split, path,
    label, class, feature list); the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez_compressed(
            path,
            features=embeddings.features,
            labels=embeddings.labels,
            paths=embeddings.paths,
            splits=embeddings.splits,
            classes=np.array(embeddings.classes),
            backbone=np.array(embeddings.backbone),
        )
    elif path.suffix == ".parquet":
        try:
            import pandas as pd
            import pyarrow  # noqa: F401  (pandas writes Parquet through it)
        except ImportError:
            raise ConfigError(
                "format=parquet needs pandas and pyarrow: pip install 'finetune[parquet]'; "
                "format=npz needs nothing more."
            ) from None
        pd.DataFrame(
            {
                "split": embeddings.splits,
                "path": embeddings.paths,
                "label": embeddings.labels,
                "class": [embeddings.classes[i] for i in embeddings.labels],
                "feature": list(embeddings.features),
            }
        ).to_parquet(path)
    else:
        raise ConfigError(f"Cannot write embeddings as {path.suffix!r}; use one of {', '.join(FORMATS)}.")
    return path


def load_embeddings(path: Path) -> Embeddings:
    """Embeddings written by :func:`save` as ``.npz``."""
    if not Path(path).is_file():
        raise ConfigError(f"embeddings={str(path)!r} does not exist; write one with `finetune embed`.")
    with np.load(path, allow_pickle=False) as f:
        return Embeddings(
            f["features"], f["labels"], f["paths"], f["splits"], [str(c) for c in f["classes"]], str(f["backbone"])
        )


@dataclass(frozen=True)
class ProbeScore:
    method: str
    split: str
    accuracy: float
    seconds: float


def probe(embeddings: Embeddings, c: float = 1.0, k: int = 5, seed: int = 0) -> list[ProbeScore]:
    """Logistic regression (standardized features, inverse regularization `c`) and cosine k-NN
    (`k` neighbours) fitted on the train split, scored on val and test (when present)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    x_train, y_train = embeddings.split("train")
    if len(np.unique(y_train)) < 2:
        raise ConfigError("The training split has fewer than 2 classes: nothing to probe.")
    methods = {
        f"logistic regression (C={c:g})": make_pipeline(
            StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed)
        ),
        f"k-NN (k={k}, cosine)": make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=min(k, len(y_train)))),
    }
    scores = []
    for name, method in methods.items():
        started = time.perf_counter()
        method.fit(x_train, y_train)
        fit_seconds = time.perf_counter() - started
        for split in ("val", "test"):
            x, y = embeddings.split(split)
            if len(y):
                scores.append(ProbeScore(name, split, float((method.predict(x) == y).mean()), fit_seconds))
    return scores
