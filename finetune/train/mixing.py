"""Mixup and CutMix of training batches (timm's :class:`~timm.data.Mixup`). The loss on the soft
targets they make is the task's (:func:`finetune.compute.task.soft_target_cross_entropy`).

On images the batch is mixed as timm's ``train.py`` does (``mode="batch"``: one ratio per batch,
each image blended with the batch reversed). On cached features (a frozen backbone, see
:mod:`finetune.compute.features`) the pooled feature vectors are mixed instead: manifold mixup
(Verma et al. 2019) at the last layer, which keeps the cache on. CutMix has no box to cut in a
feature vector, so there it becomes mixup with CutMix's alpha; the start table says which ran.

timm draws from numpy's global generator, which :class:`finetune.train.checkpoints.EpochSeeding`
re-seeds with (seed, epoch) at every epoch's first batch: a resumed epoch mixes exactly as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from finetune.compute.task import soft_target_cross_entropy
from finetune.errors import ConfigError


@dataclass
class BatchMixer:
    """Mixes batches until ``off_epoch`` (counted from 1; None: every epoch)."""

    mixup: Mixup
    off_epoch: int | None
    description: str
    multi_label: bool = False  # labels are multi-hot rows (N, C), mixed as they are

    def active(self, epoch: int) -> bool:
        """Whether 0-based `epoch` mixes its batches."""
        return self.off_epoch is None or epoch + 1 < self.off_epoch

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed inputs, soft targets (N, C)); `inputs` is mixed in place."""
        even = len(labels) - len(labels) % 2
        if self.multi_label:
            return inputs, self._mix_multi_hot(inputs, labels, even)
        # timm refuses odd batches (pairs come from reversing the batch); an epoch's last batch
        # often is one: mix all but its last sample, which keeps its (smoothed) one-hot target.
        if even:
            _, targets = self.mixup(inputs[:even], labels[:even])
        else:
            targets = labels.new_empty((0, self.mixup.num_classes), dtype=torch.float)
        if even < len(labels):
            clean = mixup_target(labels[even:], self.mixup.num_classes, 1.0, self.mixup.label_smoothing)
            targets = torch.cat([targets, clean.to(targets.device)])
        return inputs, targets

    def _mix_multi_hot(self, inputs: torch.Tensor, labels: torch.Tensor, even: int) -> torch.Tensor:
        """Multi-hot targets mixed with the images' ratio. timm's Mixup (before 1.0.31) only builds
        one-hot targets, so it mixes the sample indices instead (num_classes = the pair count):
        its soft targets are then the mixing matrix, and weights @ labels the mixed label sets."""
        targets = labels.float().clone()
        if even:
            self.mixup.num_classes = even
            _, weights = self.mixup(inputs[:even], torch.arange(even, device=labels.device))
            targets[:even] = weights.to(targets) @ targets[:even]
        return targets


def batch_mixer(
    mixup: Mapping,
    cutmix: Mapping,
    num_classes: int,
    label_smoothing: float,
    on_features: bool,
    multi_label: bool = False,
) -> BatchMixer | None:
    """The run's mixer from the ``mixup`` and ``cutmix`` config blocks, or None when both alphas
    are 0. `on_features`: the batches hold cached feature vectors, not images. `multi_label`: the
    labels are multi-hot rows, mixed unsmoothed (the loss smooths them)."""
    if multi_label:
        label_smoothing = 0.0
    mix_alpha, cut_alpha = float(mixup.get("alpha") or 0), float((cutmix or {}).get("alpha") or 0)
    if mix_alpha < 0 or cut_alpha < 0:
        raise ConfigError(
            f"mixup.alpha={mix_alpha}, cutmix.alpha={cut_alpha}: Beta-distribution alphas are >= 0 (0: off)."
        )
    if not mix_alpha and not cut_alpha:
        return None
    prob, switch = float(mixup.get("prob", 1.0)), float(mixup.get("switch_prob", 0.5))
    for key, value in (("mixup.prob", prob), ("mixup.switch_prob", switch)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}={value}: a probability from 0 to 1.")
    off_epoch = mixup.get("off_epoch")
    if off_epoch is not None and (not isinstance(off_epoch, int) or off_epoch < 1):
        raise ConfigError(f"mixup.off_epoch={off_epoch!r}: an epoch number from 1 (mixing stops there), or null.")
    if on_features:
        alpha = mix_alpha or cut_alpha
        mixer = Mixup(
            mixup_alpha=alpha,
            cutmix_alpha=0.0,
            prob=prob,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        what = f"mixup of cached features (manifold mixup), alpha {alpha:g}"
        if cut_alpha:
            what += ": cutmix needs images, it is mixup here" if not mix_alpha else ", no cutmix (it needs images)"
    else:
        mixer = Mixup(
            mixup_alpha=mix_alpha,
            cutmix_alpha=cut_alpha,
            prob=prob,
            switch_prob=switch,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        parts = [f"mixup alpha {mix_alpha:g}"] * bool(mix_alpha) + [f"cutmix alpha {cut_alpha:g}"] * bool(cut_alpha)
        what = " + ".join(parts) + (f" (switch prob {switch:g})" if mix_alpha and cut_alpha else "")
    what += f", batches mixed with prob {prob:g}" if prob < 1 else ""
    what += f", off from epoch {off_epoch}" if off_epoch else ""
    return BatchMixer(mixer, off_epoch, what, multi_label)


__all__ = ["BatchMixer", "batch_mixer", "soft_target_cross_entropy"]
