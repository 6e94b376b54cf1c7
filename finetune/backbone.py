"""A pretrained timm backbone without its classifier, plus what the rest of a run needs from it."""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from finetune.groups import LayerGroup, backbone_groups
from finetune.weights import WeightsReport, create_pretrained_model


@dataclass
class Backbone:
    """A timm model whose ``forward(x)`` returns pooled features of size ``num_features``."""

    name: str
    model: nn.Module
    num_features: int
    data_config: dict  # input_size, mean, std, interpolation, crop_pct (timm's resolution rules)
    groups: list[LayerGroup]
    weights: WeightsReport


def build_backbone(name: str, weights: str = "pretrained", drop_rate: float | None = None,
                   global_pool: str | None = None) -> Backbone:
    """Create `name` with verified `weights` (see :func:`create_pretrained_model`), drop its head.

    global_pool: None keeps the model's pooling; else one timm knows for it, e.g. ``avg``,
    ``max``, ``avgmax`` (mean of both) or ``catavgmax`` (both, concatenated: twice the features).
    """
    kwargs = {} if drop_rate is None else {"drop_rate": drop_rate}
    model, report = create_pretrained_model(name, weights, **kwargs)
    if global_pool is None:
        model.reset_classifier(0)
    else:
        model.reset_classifier(0, global_pool=global_pool)
    data_config = timm.data.resolve_model_data_config(model)
    if global_pool is None:
        # head_hidden_size is the width of pre_logits where a model has a pre-logits layer.
        num_features = getattr(model, "head_hidden_size", None) or model.num_features
    else:  # models disagree on whether num_features counts a concatenating pool: measure it
        num_features = _output_width(model, data_config["input_size"])
    return Backbone(name, model, num_features, data_config, backbone_groups(model), report)


@torch.no_grad()
def _output_width(model: nn.Module, input_size) -> int:
    was_training = model.training
    model.eval()
    try:
        return int(model(torch.zeros(1, *input_size)).shape[-1])
    finally:
        model.train(was_training)
