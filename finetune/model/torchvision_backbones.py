"""torchvision classification models (``backbone.name=torchvision:alexnet``) as backbones.

The contract is timm's (see :mod:`finetune.model.backbone`): the model keeps torchvision's own module
names (so torchvision's weight files load as they are) with its last classifier layer replaced
by ``nn.Identity``, so ``model(x)`` returns the features that layer read:

- AlexNet and VGG: the 4096-d **fc7** activations (after ReLU), the classic transferable
  feature (DeCAF, Donahue et al. 2014; "CNN features off-the-shelf", Razavian et al. 2014).
  fc6 and fc7 stay in the backbone as layer groups: ``freeze=all_but_head`` freezes them too
  (a fixed feature extractor), ``freeze.until=conv5`` fine-tunes them.
- Every other model: the globally pooled last feature map (GoogLeNet 1024, Inception-v3 2048,
  ResNet-50 2048, ...).

GoogLeNet and Inception-v3 are always built with ``transform_input=True`` (torchvision's
pretrained weights expect it: ImageNet-normalized input is re-normalized inside the model) and
without auxiliary classifiers (they would make ``forward`` return a tuple in training mode;
their tensors in a weights file are ignored). Fixed at build time, not per weights source, so
that a checkpoint reloaded with random weights computes exactly what was trained.

Weights are always loaded by finetune, never by the torchvision builder, so the hub and local
files share one path: every tensor is compared with its source after loading.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision import models as tv_models

from finetune.errors import ConfigError, WeightsError
from finetune.model.groups import LayerGroup
from finetune.model.weights import WeightsReport, load_file_into, load_state_into

PREFIX = "torchvision:"
# Architectures whose builders take transform_input / aux_logits (see the module docstring).
_INCEPTION_STYLE = ("googlenet", "inception_v3")
# For an architecture without weights metadata: timm's ImageNet statistics and crop; 224 px and
# bilinear as torchvision's own classification weights use.
_IMAGENET_DEFAULTS = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "crop_pct": DEFAULT_CROP_PCT,
}


def classification_models() -> list[str]:
    """torchvision's ImageNet classification architectures (no detection/video models)."""
    return sorted(tv_models.list_models(module=tv_models))


def create_torchvision_model(
    arch: str, weights: str = "pretrained", drop_rate: float | None = None
) -> tuple[nn.Module, int, WeightsReport]:
    """torchvision `arch` without its last classifier layer, with verified `weights`.

    weights: ``pretrained``/``hub`` (the architecture's DEFAULT weights enum, downloaded by
    torchvision or taken from its cache), a weights enum name (``IMAGENET1K_V1`` or
    ``ResNet50_Weights.IMAGENET1K_V2``), ``random``, or a local ``.pth``/``.safetensors``/
    ``.ckpt`` file. drop_rate: when set, the probability of every dropout layer the features
    pass through (AlexNet/VGG fc6/fc7; the default config's 0.0 makes frozen features
    deterministic). Returns (model, number of features, report).
    """
    _check_arch(arch)
    weights = str(weights)
    model = _build(arch, init=weights == "random")
    num_features = _drop_classifier(model, arch)
    if drop_rate is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = float(drop_rate)
    if weights == "random":
        return model, num_features, WeightsReport("random initialization (no pretrained weights)", 0)
    if weights == "embedded":
        raise WeightsError(
            f"No embedded weights for torchvision:{arch}; use backbone.weights=pretrained "
            f"(torchvision's download), a weights enum name, or a local file."
        )
    path = Path(weights).expanduser()
    if path.suffix in (".pth", ".pt", ".safetensors", ".ckpt", ".bin") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"backbone.weights={weights!r}: no such file.")
        return model, num_features, load_file_into(model, path)
    enum = weights_enum(arch, weights)
    return model, num_features, load_state_into(model, _download(enum, arch), f"torchvision {enum}")


def weights_enum(arch: str, name: str = "pretrained"):
    """The weights enum member `name` names for `arch` (``pretrained``/``hub``: DEFAULT)."""
    try:
        enum_class = tv_models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision:{arch} has no pretrained weights; use backbone.weights=random.") from None
    if name in ("pretrained", "hub"):
        return enum_class.DEFAULT
    member = name.rsplit(".", 1)[-1]
    if (
        name.count(".") > 1
        or (name.count(".") == 1 and not name.startswith(enum_class.__name__ + "."))
        or member not in enum_class.__members__
    ):
        choices = ", ".join(enum_class.__members__)
        raise ConfigError(
            f"backbone.weights={name!r} is neither pretrained|hub|random, an existing file, nor "
            f"a weights name of torchvision:{arch} ({choices})."
        )
    return enum_class[member]


def min_input_size(arch: str) -> int:
    """The smallest input side `arch` accepts (torchvision's weights metadata), 1 if unknown."""
    try:
        return int(weights_enum(arch).meta.get("min_size", (1, 1))[0])
    except ConfigError:
        return 1


def torchvision_data_config(arch: str, weights: str = "pretrained") -> dict:
    """Input size, interpolation, mean, std and crop_pct from the weights' own eval transform
    (resize to ``resize_size``, center crop ``crop_size``): crop_pct = crop / resize. The named
    weights' when `weights` names an enum member, else the DEFAULT weights' (what they were
    trained with is what a fine-tuning run should feed them)."""
    enum = None
    for name in (str(weights), "pretrained"):  # random, a file: the DEFAULT weights' transform
        try:
            enum = weights_enum(arch, name)
            break
        except ConfigError:
            continue
    if enum is None:
        return dict(_IMAGENET_DEFAULTS)
    transform = enum.transforms()
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    return {
        "input_size": (3, crop, crop),
        "interpolation": transform.interpolation.value,
        "mean": tuple(transform.mean),
        "std": tuple(transform.std),
        # Rounded so that size / crop_pct gives back resize_size exactly (224 / (224/232) = 231.99...).
        "crop_pct": round(crop / resize, 6),
    }


def torchvision_groups(model: nn.Module, arch: str) -> list[LayerGroup]:
    """Named layer groups, input to output.

    AlexNet: conv1 … conv5, fc6, fc7 (the paper's layers). VGG: conv1 … conv5 (the blocks
    between poolings, as in the paper's conv3-64 … tables), fc6, fc7. GoogLeNet: stem (conv1-3),
    inception3, inception4, inception5. Inception-v3: stem, mixed5, mixed6, mixed7. ResNet
    family: stem, stage1 … stage4 (timm's names for the same layers). Others: stem, then one
    group per top-level module (per child of a ``features`` Sequential), a remaining classifier
    layer as ``head``.
    """
    if arch == "alexnet":
        key = _chain_keys(model, per_block=False)
    elif arch.startswith("vgg"):
        key = _chain_keys(model, per_block=True)
    elif arch == "googlenet":
        key = _regex_keys([(r"conv\d\.", "stem"), (r"inception(\d)", r"inception\1")])
    elif arch == "inception_v3":
        key = _regex_keys([(r"Conv2d_", "stem"), (r"Mixed_(\d)", r"mixed\1")])
    elif re.match(r"(resnet|resnext|wide_resnet)\d", arch):
        key = _regex_keys([(r"(conv1|bn1)\.", "stem"), (r"layer(\d)\.", r"stage\1"), (r"fc\.", "head")])
    else:
        key = _generic_keys(model)
    order: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        group = key(name)
        if group is None:
            raise RuntimeError(f"torchvision:{arch}: parameter {name} fits no layer group.")
        order.setdefault(group, []).append(name)
    return [LayerGroup(name, tuple(names)) for name, names in order.items()]


def _check_arch(arch: str) -> None:
    known = classification_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise ConfigError(
            f"Unknown torchvision classification model {arch!r}.{hint} "
            f"torchvision {torchvision.__version__} has: {', '.join(known)}."
        )


def _build(arch: str, init: bool) -> nn.Module:
    kwargs = {}
    if arch in _INCEPTION_STYLE:  # their truncated-normal init takes seconds: skipped when weights follow
        kwargs = {"aux_logits": False, "transform_input": True, "init_weights": init}
    return tv_models.get_model(arch, weights=None, **kwargs)


def _drop_classifier(model: nn.Module, arch: str) -> int:
    """Replace the last Linear that produces the 1000 ImageNet logits with Identity; its input width."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == 1000:
            last = name
    if last is None:
        raise ConfigError(
            f"torchvision:{arch} has no linear classifier to replace (its logits come from a "
            f"convolution); choose another architecture."
        )
    width = model.get_submodule(last).in_features
    model.set_submodule(last, nn.Identity())
    return width


def _download(enum, arch: str) -> dict[str, torch.Tensor]:
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # URLError, HTTPError, hash mismatch, a half-written cache file
        file = enum.url.rsplit("/", 1)[-1]
        raise WeightsError(
            f"Could not get torchvision's {enum} weights for torchvision:{arch} from {enum.url}: "
            f"{type(err).__name__}: {err}\n"
            f"Offline? Download that file elsewhere and pass backbone.weights=/path/to/{file} "
            f"(or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}), "
            f"or use backbone.weights=random to train from scratch."
        ) from err


# --- layer-group keys: parameter name -> group name --------------------------------------------


def _chain_keys(model: nn.Module, per_block: bool) -> Callable[[str], str | None]:
    """AlexNet/VGG: conv groups from ``features`` (one per conv, or per block between poolings),
    then fc6, fc7 for the Linear layers left in ``classifier``."""
    names, block, conv = {}, 1, 0
    for index, layer in enumerate(model.features):
        if isinstance(layer, nn.Conv2d):
            conv += 1
        if isinstance(layer, nn.MaxPool2d):
            block += 1
        elif any(True for _ in layer.parameters()):
            names[f"features.{index}."] = f"conv{block if per_block else conv}"
    fc = 6
    for index, layer in enumerate(model.classifier):
        if isinstance(layer, nn.Linear):
            names[f"classifier.{index}."] = f"fc{fc}"
            fc += 1

    def key(param: str) -> str | None:
        return next((group for prefix, group in names.items() if param.startswith(prefix)), None)

    return key


def _regex_keys(rules: list[tuple[str, str]]) -> Callable[[str], str | None]:
    compiled = [(re.compile(pattern), template) for pattern, template in rules]

    def key(param: str) -> str | None:
        for pattern, template in compiled:
            match = pattern.match(param)
            if match:
                return match.expand(template)
        return None

    return key


def _generic_keys(model: nn.Module) -> Callable[[str], str | None]:
    """stem, stage1 … in registration order: the top-level modules, where a module holding more
    than half of all parameters (a ``features`` or ``encoder.layers`` Sequential) is split into its
    children; classifier layers left in the model (MobileNetV3's last Linear) go with the head."""
    total = sum(p.numel() for p in model.parameters())
    units: list[str] = []

    def split(module: nn.Module, prefix: str) -> None:
        for name, _ in module.named_parameters(recurse=False):
            units.append(prefix + name)
        for name, child in module.named_children():
            size = sum(p.numel() for p in child.parameters())
            if size > total / 2 and any(True for _ in child.children()):
                split(child, f"{prefix}{name}.")
            elif size:
                units.append(prefix + name)

    split(model, "")
    names, stage = {}, 0
    for i, unit in enumerate(units):
        if unit.split(".")[0] in ("classifier", "head", "heads", "fc"):
            names[unit] = "head"
        elif i == 0:
            names[unit] = "stem"
        else:
            stage += 1
            names[unit] = f"stage{stage}"

    def key(param: str) -> str | None:
        return next((group for unit, group in names.items() if param == unit or param.startswith(unit + ".")), None)

    return key
