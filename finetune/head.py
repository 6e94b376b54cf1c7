"""The new classifier head placed on a backbone's pooled features."""

from __future__ import annotations

from torch import nn


def build_head(in_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0) -> nn.Sequential:
    """Dropout -> Linear, or with `hidden`: Linear -> ReLU -> Dropout -> Linear."""
    if num_classes < 2:
        raise ValueError(f"A classifier needs at least 2 classes, got {num_classes}.")
    if hidden:
        return nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
