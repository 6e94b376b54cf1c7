"""Freezing policy: which layer groups or parameters stop training, and what their BatchNorm does."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from timm.layers import freeze_batch_norm_2d
from torch import nn

from finetune.errors import ConfigError
from finetune.model import Classifier

BATCHNORM_MODES = ("eval", "train", "frozen")


@dataclass(frozen=True)
class FreezeResult:
    frozen_groups: tuple[str, ...]  # groups with every parameter frozen
    frozen_norms: tuple[str, ...]   # BatchNorm modules inside frozen parts
    batchnorm: str


def apply_freeze(
    model: Classifier,
    groups: str | Sequence[str] = (),
    until: str | None = None,
    patterns: Sequence[str] = (),
    batchnorm: str = "eval",
) -> FreezeResult:
    """Set ``requires_grad`` on every parameter of `model` and apply the BatchNorm policy.

    groups: ``all`` (every group but ``head``) or group names; until: freeze every group from the
    stem up to and including this one; patterns: regexes matched (``re.search``) against
    parameter names. batchnorm, for norm layers whose parameters are all frozen: ``eval``
    (running statistics used, never updated), ``train`` (statistics keep adapting) or
    ``frozen`` (replaced by timm's FrozenBatchNorm2d).
    """
    if batchnorm not in BATCHNORM_MODES:
        raise ConfigError(f"freeze.batchnorm={batchnorm!r}; choose one of {', '.join(BATCHNORM_MODES)}.")
    names = [g.name for g in model.groups]
    frozen_group_names = _resolve_groups(names, groups, until)
    frozen = {n for g in model.groups if g.name in frozen_group_names for n in g.param_names}
    compiled = [re.compile(p) for p in patterns]
    params = dict(model.named_parameters())
    frozen |= {n for n in params if any(p.search(n) for p in compiled)}
    if frozen >= set(params):
        raise ConfigError("The freeze settings freeze every parameter, the head included: nothing would train.")
    for name, param in params.items():
        param.requires_grad_(name not in frozen)

    norms = _frozen_norms(model, frozen)
    if batchnorm == "frozen":
        for name in norms:
            model.set_submodule(name, freeze_batch_norm_2d(model.get_submodule(name)))
    model.frozen_norms = list(norms) if batchnorm == "eval" else []
    model.train(model.training)
    fully_frozen = tuple(g.name for g in model.groups if g.param_names and set(g.param_names) <= frozen)
    return FreezeResult(fully_frozen, tuple(norms), batchnorm)


def _resolve_groups(names: list[str], groups, until: str | None) -> set[str]:
    backbone = names[:-1]  # the last group is the head
    if isinstance(groups, str):
        if groups != "all":
            raise ConfigError(f"freeze.groups={groups!r}: use `all` or a list of groups from {names}.")
        chosen = set(backbone)
    else:
        chosen = set(groups)
        unknown = chosen - set(names)
        if unknown:
            raise ConfigError(f"freeze.groups names unknown groups {sorted(unknown)}; this model has {names}.")
    if until is not None:
        if until not in names:
            raise ConfigError(f"freeze.until={until!r} is not a group of this model: {names}.")
        chosen |= set(names[: names.index(until) + 1])
    return chosen


def _frozen_norms(model: nn.Module, frozen: set[str]) -> list[str]:
    """BatchNorm modules whose parameters are all frozen (affine-free ones: when all are)."""
    head = set(model.groups[-1].param_names)
    all_frozen = frozen >= {n for n, _ in model.named_parameters() if n not in head}
    result = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        own = [f"{name}.{n}" for n, _ in module.named_parameters(recurse=False)]
        if (own and all(n in frozen for n in own)) or (not own and all_frozen):
            result.append(name)
    return result
