"""The new classifier head placed on a backbone's pooled features."""

from __future__ import annotations

from torch import nn

NORMS = {None: None, "batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}


def build_head(
    in_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0, norm: str | None = None
) -> nn.Sequential:
    """Dropout -> Linear, or with `hidden`: Linear -> [norm] -> ReLU -> Dropout -> Linear.

    norm: None, ``batchnorm`` or ``layernorm``, applied to the hidden layer.
    """
    if num_classes < 2:
        raise ValueError(f"A classifier needs at least 2 classes, got {num_classes}.")
    if norm not in NORMS:
        raise ValueError(f"head.norm={norm!r}; choose null, batchnorm or layernorm.")
    if hidden:
        layers = [nn.Linear(in_features, hidden)]
        if NORMS[norm] is not None:
            layers.append(NORMS[norm](hidden))
        layers += [nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
        return nn.Sequential(*layers)
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


def set_prior_bias(head: nn.Sequential, frequencies) -> None:
    """Start a multi-label head at each label's training frequency: the last Linear's bias becomes
    logit(frequency) (Lin et al. 2017's prior initialization). With bias 0 every label starts at
    probability 0.5 while most are rare, and the first epochs only learn to say no."""
    import torch

    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    p = torch.as_tensor(frequencies, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        last.bias.copy_(torch.log(p / (1 - p)))
