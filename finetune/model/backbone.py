"""A backbone without its classifier, plus what the rest of a run needs from it.

``backbone.name`` picks the family: any timm model name; ``torchvision:ARCH`` for a torchvision
classification model (:mod:`finetune.model.torchvision_backbones`); ``lenet5`` for LeNet-5 from
scratch (:mod:`finetune.model.lenet`). All three meet the same contract, :class:`Backbone`.

Input size: convolutional networks take any image size. timm's fixed-size models (ViT, DeiT,
Swin, EVA, LeViT, ...: ``fixed_input_size`` in their pretrained config) are built for one size,
so they are created at the run's ``data.image_size`` (timm resamples position embeddings and
relative-position tables from the pretrained grid), or refused with a :class:`ConfigError`
naming a size that works when the architecture cannot take that size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from finetune.errors import ConfigError
from finetune.model import lenet, torchvision_backbones
from finetune.model.groups import LayerGroup, backbone_groups, feature_modules
from finetune.model.modes import evaluating
from finetune.model.weights import WeightsReport, create_pretrained_model, load_file_into


@dataclass
class Backbone:
    """A model whose ``forward(x)`` returns pooled features of size ``num_features``."""

    name: str
    model: nn.Module
    num_features: int
    data_config: dict  # input_size, mean, std, interpolation, crop_pct (timm's resolution rules)
    groups: list[LayerGroup]
    weights: WeightsReport


def build_backbone(
    name: str,
    weights: str = "pretrained",
    drop_rate: float | None = None,
    global_pool: str | None = None,
    image_size: int | None = None,
    drop_path_rate: float | None = None,
) -> Backbone:
    """Create `name` with verified `weights` (see :func:`create_pretrained_model`), drop its head.

    global_pool: None keeps the model's pooling; else one timm knows for it, e.g. ``avg``,
    ``max``, ``avgmax`` (mean of both) or ``catavgmax`` (both, concatenated: twice the features).
    image_size: the side of the square images the run feeds (``data.image_size``; None: the
    backbone's own size). Only a fixed-size timm model is affected: it is created at that size,
    and ``data_config["input_size"]`` says so; a size it cannot take raises :class:`ConfigError`.
    Every other model is created exactly as without it.
    drop_path_rate: timm's stochastic depth (None: the model's default); the torchvision classics
    and LeNet have no residual branches to drop, and refuse a rate above 0.
    """
    if drop_path_rate and (name.startswith(torchvision_backbones.PREFIX) or name == "lenet5"):
        raise ConfigError(
            f"backbone.drop_path_rate={drop_path_rate}: {name} has no residual branches to drop "
            f"(stochastic depth is for timm's residual networks); use backbone.drop_path_rate=null."
        )
    if name.startswith(torchvision_backbones.PREFIX):
        return _torchvision_backbone(name, weights, drop_rate, global_pool)
    if name == "lenet5":
        return _lenet_backbone(weights, global_pool)
    kwargs = {} if drop_rate is None else {"drop_rate": drop_rate}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = float(drop_path_rate)
    kwargs.update(fixed_size_kwargs(name, image_size))
    model, report = create_pretrained_model(name, weights, **kwargs)
    if global_pool is None:
        model.reset_classifier(0)
    else:
        model.reset_classifier(0, global_pool=global_pool)
    data_config = timm.data.resolve_model_data_config(model)
    if "img_size" in kwargs:  # timm resolves from the pretrained config, which keeps the source size
        data_config["input_size"] = (data_config["input_size"][0], image_size, image_size)
    if global_pool is None:
        # head_hidden_size is the width of pre_logits where a model has a pre-logits layer.
        num_features = getattr(model, "head_hidden_size", None) or model.num_features
    else:  # models disagree on whether num_features counts a concatenating pool: measure it
        num_features = _output_width(model, data_config["input_size"])
    return Backbone(name, model, num_features, data_config, backbone_groups(model), report)


def fixed_size_kwargs(name: str, image_size: int | None) -> dict:
    """``{"img_size": image_size}`` when timm model `name` is fixed-size and `image_size` is not
    its native size, after checking that the architecture works at that size; else ``{}``.

    Raises ConfigError naming ``data.image_size`` and a size that works when it does not (a
    ViT needs a multiple of its patch size, EfficientFormer only takes its native size, ...).
    """
    cfg = timm.models.get_pretrained_cfg(name) if image_size else None  # None for unknown names
    if cfg is None or not cfg.fixed_input_size or tuple(cfg.input_size[-2:]) == (image_size, image_size):
        return {}
    size, native = int(image_size), int(cfg.input_size[-1])
    error = _size_error(name, size, device="meta")
    if error is not None:  # meta tensors can fail where real ones would not (data-dependent code): confirm
        error = _size_error(name, size, device="cpu")
    if error is not None:
        working = _working_size(name, size, native)
        fix = f"{working} (its native size) or null" if working == native else f"{working} (null: its native {native})"
        raise ConfigError(
            f"{name} cannot take {size}x{size} px images ({error.rstrip('.')}): set data.image_size={fix}."
        )
    return {"img_size": size}


def _size_error(name: str, size: int, device: str) -> str | None:
    """Why `name` created at `size` fails a forward pass on one `size` image, or None. On the meta
    device nothing is initialised or computed: only shapes propagate, in a fraction of a second."""
    with torch.random.fork_rng(devices=[]):  # probing leaves the run's random numbers untouched
        try:
            with torch.device(device), torch.no_grad():
                model = timm.create_model(name, img_size=size).eval()
                model(torch.zeros(1, 3, size, size))
        except Exception as err:  # timm says it with asserts, shape errors or TypeErrors, per family
            return (str(err).strip().splitlines() or [type(err).__name__])[0]
    return None


def _working_size(name: str, size: int, native: int) -> int:
    """The size nearest `size` that `name` takes, among multiples of common patch sizes; else
    its native size, which always works."""
    candidates = {step * k for step in (14, 16, 32) for k in (size // step, size // step + 1) if k > 0}
    for candidate in sorted(candidates - {size}, key=lambda c: (abs(c - size), c))[:6]:
        if _size_error(name, candidate, device="meta") is None:
            return candidate
    return native


@torch.no_grad()
def _output_width(model: nn.Module, input_size) -> int:
    with evaluating(model):
        return int(model(torch.zeros(1, *input_size)).shape[-1])


def _torchvision_backbone(name: str, weights: str, drop_rate: float | None, global_pool: str | None) -> Backbone:
    arch = name[len(torchvision_backbones.PREFIX) :]
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
        raise ConfigError(
            f"head.pool={global_pool} needs a global average pooling to replace; {name} has none "
            f"(AlexNet/VGG features are fc7 activations). Leave head.pool=null."
        )
    model.avgpool = SelectAdaptivePool2d(pool_type=global_pool, flatten=False)


def _lenet_backbone(weights: str, global_pool: str | None) -> Backbone:
    if global_pool is not None:
        raise ConfigError(
            f"head.pool={global_pool}: LeNet-5's features are F6 units, not a pooled map. Leave head.pool=null."
        )
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
            raise ConfigError(
                f"{self.name} needs inputs of at least {self.size}x{self.size} px, got {height}x{width}: "
                f"set data.image_size={self.size} or more."
            )


def _require_min_input(model: nn.Module, name: str, size: int) -> None:
    if size > 1:
        model.register_forward_pre_hook(_MinInputSize(name, size))
