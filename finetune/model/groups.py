"""Named layer groups of a backbone: stem, stage1 … stageN, head, from timm's group matcher.

The same groups serve freezing, per-group learning rates and the printed summary. Group order
runs from the input (stem) to the output. The model adds its new classifier to ``head``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from timm.models import group_parameters
from torch import nn


@dataclass(frozen=True)
class LayerGroup:
    """A named, ordered slice of a model's parameters (names relative to the grouped module)."""

    name: str
    param_names: tuple[str, ...]


def backbone_groups(model: nn.Module) -> list[LayerGroup]:
    """Group `model`'s parameters with its own ``group_matcher(coarse=True)``.

    Whatever the matcher does not place (a final norm, a pre-logits layer) lands in the last
    group; when that group holds no block of the network it belongs with the classifier and is
    called ``head``. Models without a matcher become one group, ``body``.
    """
    if not hasattr(model, "group_matcher"):
        return [LayerGroup("body", tuple(n for n, _ in model.named_parameters()))]
    matcher = model.group_matcher(coarse=True)
    grouped = list(group_parameters(model, matcher).values())
    stem = re.compile(matcher["stem"]) if isinstance(matcher, dict) and "stem" in matcher else None
    block_patterns = _block_patterns(matcher)

    groups, stage = [], 0
    for i, names in enumerate(grouped):
        if i == 0 and stem is not None and all(stem.match(n) for n in names):
            name = "stem"
        elif block_patterns and not any(p.match(n) for p in block_patterns for n in names):
            name = "head"
        else:
            stage += 1
            name = f"stage{stage}"
        groups.append(LayerGroup(name, tuple(names)))
    return groups


def _block_patterns(matcher) -> list[re.Pattern]:
    """Regexes of the matcher's repeated blocks, without the catch-all ones placed last (99999)."""
    if not isinstance(matcher, dict) or "blocks" not in matcher:
        return []
    blocks = matcher["blocks"]
    if isinstance(blocks, str):
        return [re.compile(blocks)]
    return [re.compile(pattern) for pattern, order in blocks if order is None]


def group_modules(model: nn.Module, group: LayerGroup) -> list[str]:
    """The largest modules of `model` whose parameters all belong to `group` (their parent has
    others), in registration order: ``layer1`` for a ResNet stage, the convolutions of a VGG block."""
    members = set(group.param_names)
    qualifies = {}
    for name, module in model.named_modules():
        params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        qualifies[name] = bool(params) and all(p in members for p in params)
    return [
        name
        for name, ok in qualifies.items()
        if ok and (name == "" or not qualifies.get(name.rpartition(".")[0], False))
    ]


def feature_modules(model: nn.Module, groups: list[LayerGroup]) -> list[dict]:
    """timm-style ``feature_info`` entries (``{"module": name}``), one per group: its last module.
    The pictures look at these layers (non-spatial ones, such as fc6, are skipped there)."""
    return [{"module": modules[-1]} for g in groups if (modules := group_modules(model, g))]
