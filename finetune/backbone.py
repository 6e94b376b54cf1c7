"""A backbone without its classifier, plus what the rest of a run needs from it.

``backbone.name`` picks the family: any timm model name; ``torchvision:ARCH`` for a torchvision
classification model (:mod:`finetune.torchvision_backbones`); ``lenet5`` for LeNet-5 from
scratch (:mod:`finetune.lenet`). All three meet the same contract, :class:`Backbone`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from finetune import lenet, torchvision_backbones
from finetune.errors import ConfigError
from finetune.groups import LayerGroup, backbone_groups, feature_modules
from finetune.weights import WeightsReport, create_pretrained_model, load_file_into


@dataclass
class Backbone:
    """A model whose ``forward(x)`` returns pooled features of size ``num_features``."""

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
    if name.startswith(torchvision_backbones.PREFIX):
        return _torchvision_backbone(name, weights, drop_rate, global_pool)
    if name == "lenet5":
        return _lenet_backbone(weights, global_pool)
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


def _torchvision_backbone(name: str, weights: str, drop_rate: float | None, global_pool: str | None) -> Backbone:
    arch = name[len(torchvision_backbones.PREFIX):]
    model, num_features, report = torchvision_backbones.create_torchvision_model(arch, weights, drop_rate)
    data_config = torchvision_backbones.torchvision_data_config(arch, weights)
    if global_pool is not None:
        _replace_global_pool(model, name, global_pool)
        num_features = _output_width(model, data_config["input_size"])
    groups = torchvision_backbones.torchvision_groups(model, arch)
    model.feature_info = feature_modules(model, groups)  # the layers finetune's pictures look at
    _require_min_input(model, name, torchvision_backbones.min_input_size(arch))
    return Backbone(name, model, num_features, data_config, groups, report)


def _replace_global_pool(model: nn.Module, name: str, global_pool: str) -> None:
    """head.pool for a torchvision model: swap its global ``avgpool`` for timm's selectable one."""
    from timm.layers import SelectAdaptivePool2d

    pool = getattr(model, "avgpool", None)
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
        raise ConfigError(f"head.pool={global_pool} needs a global average pooling to replace; {name} has none "
                          f"(AlexNet/VGG features are fc7 activations). Leave head.pool=null.")
    model.avgpool = SelectAdaptivePool2d(pool_type=global_pool, flatten=False)


def _lenet_backbone(weights: str, global_pool: str | None) -> Backbone:
    if global_pool is not None:
        raise ConfigError(f"head.pool={global_pool}: LeNet-5's features are F6 units, not a pooled map. "
                          f"Leave head.pool=null.")
    model = lenet.LeNet5()
    weights = str(weights)
    if weights == "random":
        report = WeightsReport("random initialization (LeNet-5 trains from scratch)", 0)
    elif Path(weights).expanduser().is_file():
        report = load_file_into(model, Path(weights).expanduser())
    else:
        raise ConfigError(
            f"backbone.weights={weights!r}: LeNet-5 has no pretrained weights, it trains from scratch. "
            f"Use backbone=lenet5 (or backbone.weights=random), or a weights file of your own."
        )
    groups = lenet.lenet_groups(model)
    model.feature_info = feature_modules(model, groups)
    _require_min_input(model, "lenet5", lenet.MIN_INPUT_SIZE)
    return Backbone("lenet5", model, lenet.NUM_FEATURES, dict(lenet.DATA_CONFIG), groups, report)


class _MinInputSize:
    """Forward pre-hook: an input smaller than the network accepts is a config mistake, said as
    one (PyTorch would stop deep inside with "kernel size can't be greater than input size")."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size

    def __call__(self, module: nn.Module, args) -> None:
        height, width = args[0].shape[-2:]
        if min(height, width) < self.size:
            raise ConfigError(f"{self.name} needs inputs of at least {self.size}x{self.size} px, got {height}x{width}: "
                              f"set data.image_size={self.size} or more.")


def _require_min_input(model: nn.Module, name: str, size: int) -> None:
    if size > 1:
        model.register_forward_pre_hook(_MinInputSize(name, size))
