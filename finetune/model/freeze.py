"""The freezing plan: which parameters train, from which epoch, and what their BatchNorm does.

One :class:`FreezePlan` is built per model from ``cfg.freeze`` and owns all freezing state: it
sets ``requires_grad``, swaps or pins BatchNorm layers, and writes ``Classifier.frozen_norms``
(the only writer). The gradual-unfreezing callback, the feature cache and the group tables read
it (``model.freeze_plan``) instead of inferring it back from ``requires_grad``.

Scheduled groups (gradual unfreezing) keep ``requires_grad=True`` from the start and sit in the
optimizer with their real learning rates (schedulers and resume see every group, and DDP sees a
fixed set of parameters); until their epoch they are *gated*: the callback drops their gradients
before each optimizer step and their BatchNorm layers stay in eval mode.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from timm.layers import freeze_batch_norm_2d
from torch import nn

from finetune.errors import ConfigError
from finetune.model.classifier import Classifier

BATCHNORM_MODES = ("eval", "train", "frozen")


def batchnorm_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Every trainable-statistics BatchNorm layer of `module` by name (not timm's or
    torchvision's FrozenBatchNorm2d, which are fixed buffers)."""
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def unfreeze_schedule(frozen_groups: Sequence[str], every: int | None = None, at: int | None = None) -> dict[str, int]:
    """group -> first epoch (0-based) it trains. `frozen_groups` in model order (stem first).

    every: the group next to the head at epoch `every`, the next one at 2*every, ... (ULMFiT).
    at: all of them at epoch `at` (linear probe, then fine-tune everything: LP-FT).
    """
    if every is not None and at is not None:
        raise ConfigError("Set freeze.unfreeze_every or freeze.unfreeze_at, not both.")
    if every is not None:
        if every < 1:
            raise ConfigError(f"freeze.unfreeze_every must be >= 1, got {every}.")
        return {g: (i + 1) * every for i, g in enumerate(reversed(frozen_groups))}
    if at is not None:
        if at < 0:
            raise ConfigError(f"freeze.unfreeze_at must be >= 0, got {at}.")
        return {g: at for g in frozen_groups}
    return {}


@dataclass(frozen=True)
class FreezePlan:
    """What trains in one model, for the whole run. Build with :meth:`build` (or
    :meth:`from_config`), then :meth:`apply` it once; :meth:`set_epoch` moves it along."""

    frozen_groups: tuple[str, ...]  # groups whose every parameter is frozen at the start
    frozen_params: frozenset[str]  # parameter names frozen at the start (groups, until, patterns)
    unfreeze_at: Mapping[str, int]  # scheduled group -> first epoch (0-based) it trains
    group_params: Mapping[str, frozenset[str]]  # scheduled group -> its parameter names
    batchnorm: str  # eval, train or frozen: for norms whose parameters are frozen
    frozen_norms: tuple[str, ...]  # BatchNorm layers inside frozen parts
    group_norms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # scheduled group -> its norms
    trainable_batchnorm: str = "train"  # train or eval: for the backbone's norms whose parameters train
    backbone_norms: tuple[str, ...] = ()  # every BatchNorm layer of the backbone (with running statistics)

    @classmethod
    def build(
        cls,
        model: Classifier,
        groups: str | Sequence[str] = (),
        until: str | None = None,
        patterns: Sequence[str] = (),
        batchnorm: str = "eval",
        unfreeze_every: int | None = None,
        unfreeze_at: int | None = None,
        *,
        trainable_batchnorm: str = "train",
    ) -> FreezePlan:
        """groups: ``all`` (every group but ``head``) or group names; until: freeze every group
        from the stem up to and including this one; patterns: regexes matched (``re.search``)
        against parameter names. batchnorm, for norm layers whose parameters are all frozen:
        ``eval`` (running statistics used, never updated), ``train`` (statistics keep adapting)
        or ``frozen`` (replaced by timm's FrozenBatchNorm2d). unfreeze_every / unfreeze_at: see
        :func:`unfreeze_schedule`. trainable_batchnorm, for the backbone's norm layers whose
        parameters train: ``train`` (batch statistics, running ones updated: PyTorch's default) or
        ``eval`` (the pretrained running statistics kept; their scale and shift still train)."""
        if batchnorm not in BATCHNORM_MODES:
            raise ConfigError(f"freeze.batchnorm={batchnorm!r}; choose one of {', '.join(BATCHNORM_MODES)}.")
        if trainable_batchnorm not in ("train", "eval"):
            raise ConfigError(f"freeze.trainable_batchnorm={trainable_batchnorm!r}; choose train or eval.")
        names = [g.name for g in model.groups]
        chosen = _resolve_groups(names, groups, until)
        frozen = {n for g in model.groups if g.name in chosen for n in g.param_names}
        compiled = [re.compile(p) for p in patterns]
        params = dict(model.named_parameters())
        frozen |= {n for n in params if any(p.search(n) for p in compiled)}
        if frozen >= set(params):
            raise ConfigError("The freeze settings freeze every parameter, the head included: nothing would train.")
        fully_frozen = tuple(g.name for g in model.groups if g.param_names and set(g.param_names) <= frozen)
        schedule = unfreeze_schedule(fully_frozen, unfreeze_every, unfreeze_at)
        if (unfreeze_every is not None or unfreeze_at is not None) and not fully_frozen:
            raise ConfigError("Gradual unfreezing needs frozen groups: set freeze.groups or freeze.until too.")
        by_name = {g.name: g for g in model.groups}
        group_params = {g: frozenset(by_name[g].param_names) for g in schedule}
        norms = _frozen_norms(model, frozen)
        # batchnorm=frozen swaps the frozen ones for FrozenBatchNorm2d: nothing left to pin.
        all_norms = [n for n in batchnorm_layers(model) if not (batchnorm == "frozen" and n in norms)]
        group_norms = {g: tuple(n for n in all_norms if f"{n}.weight" in group_params[g]) for g in schedule}
        backbone_norms = tuple(n for n in all_norms if n.startswith("backbone."))
        return cls(
            fully_frozen,
            frozenset(frozen),
            schedule,
            group_params,
            batchnorm,
            tuple(norms),
            group_norms,
            trainable_batchnorm,
            backbone_norms,
        )

    @classmethod
    def from_config(cls, model: Classifier, cfg: Mapping) -> FreezePlan:
        """From the ``freeze`` config group."""
        groups = cfg.get("groups", ())
        return cls.build(
            model,
            groups if isinstance(groups, str) else list(groups),
            cfg.get("until"),
            list(cfg.get("patterns") or ()),
            cfg.get("batchnorm", "eval"),
            cfg.get("unfreeze_every"),
            cfg.get("unfreeze_at"),
            trainable_batchnorm=cfg.get("trainable_batchnorm", "train"),
        )

    def apply(self, model: Classifier) -> FreezePlan:
        """Set ``requires_grad`` on every parameter, apply the BatchNorm policy and attach the
        plan as ``model.freeze_plan``; the model is then as at epoch 0."""
        scheduled = set().union(*self.group_params.values())
        for name, param in model.named_parameters():
            param.requires_grad_(name not in self.frozen_params or name in scheduled)
        if self.batchnorm == "frozen":
            for name in self.frozen_norms:
                model.set_submodule(name, freeze_batch_norm_2d(model.get_submodule(name)))
        model.freeze_plan = self
        self.set_epoch(model, 0)
        return self

    def gated_at(self, epoch: int) -> set[str]:
        """Scheduled groups that do not train yet in `epoch` (0-based)."""
        return {g for g, start in self.unfreeze_at.items() if epoch < start}

    def gated_params(self, epoch: int) -> frozenset[str]:
        return frozenset().union(*(self.group_params[g] for g in self.gated_at(epoch)))

    def norms_in_eval(self, epoch: int) -> list[str]:
        """BatchNorm layers kept in eval mode during `epoch`: the frozen parts' (batchnorm=eval),
        every gated group's, whatever the policy, and with trainable_batchnorm=eval every one of
        the backbone's (the head's own norms, which have no pretrained statistics, train)."""
        scheduled = {n for norms in self.group_norms.values() for n in norms}
        always = [n for n in self.frozen_norms if n not in scheduled] if self.batchnorm == "eval" else []
        in_eval = always + [n for g in sorted(self.gated_at(epoch)) for n in self.group_norms[g]]
        if self.trainable_batchnorm == "eval":
            in_eval += [n for n in self.backbone_norms if n not in in_eval]
        return in_eval

    def set_epoch(self, model: Classifier, epoch: int) -> None:
        """Put `model`'s BatchNorm modes where `epoch` wants them."""
        model.frozen_norms = self.norms_in_eval(epoch)
        model.train(model.training)


def apply_freeze(model: Classifier, **settings) -> FreezePlan:
    """``FreezePlan.build(model, **settings).apply(model)``."""
    return FreezePlan.build(model, **settings).apply(model)


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


def _frozen_norms(model: Classifier, frozen: set[str]) -> list[str]:
    """BatchNorm modules whose parameters are all frozen (affine-free ones: when all are)."""
    head = set(model.groups[-1].param_names)
    all_frozen = frozen >= {n for n, _ in model.named_parameters() if n not in head}
    result = []
    for name, module in batchnorm_layers(model).items():
        own = [f"{name}.{n}" for n, _ in module.named_parameters(recurse=False)]
        if (own and all(n in frozen for n in own)) or (not own and all_frozen):
            result.append(name)
    return result
