"""Automatic augmentation policies (RandAugment, TrivialAugment, AutoAugment) as one albumentations step.

albumentations has no searched policy of its own; torchvision's v2 implementations are the
reference ones (the papers' operation lists and magnitude scales). :class:`AutoAugmentPolicy`
wraps one of them as an albumentations transform so that it sits inside the run's pipeline and
draws its randomness from the pipeline's seeded generator: torchvision samples from torch's global
generator, so each call runs under a forked generator seeded from albumentations' own draw. A
sample's augmentation then stays a function of (seed, epoch, index) (:mod:`finetune.data.epochs`)
and exact resume holds.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
import torch
from torchvision.transforms import v2

from finetune.errors import ConfigError

POLICIES = ("none", "randaugment", "trivialaugment", "autoaugment")


def policy_transform(name: str, magnitude: int = 9, num_ops: int = 2) -> v2.Transform:
    """torchvision's policy `name` on uint8 CHW tensors. `magnitude` (0-30, RandAugment's scale;
    timm's ``rand-m9``: 9) and `num_ops` (operations per image) apply to RandAugment only:
    TrivialAugment draws one operation and its magnitude per image, AutoAugment uses the
    ImageNet policy searched by Cubuk et al. 2019."""
    if name == "randaugment":
        if not 0 <= magnitude <= 30:
            raise ConfigError(f"augment.magnitude={magnitude}: RandAugment's magnitude runs from 0 to 30 (9 is usual).")
        return v2.RandAugment(num_ops=int(num_ops), magnitude=int(magnitude), num_magnitude_bins=31)
    if name == "trivialaugment":
        return v2.TrivialAugmentWide()
    if name == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    raise ConfigError(f"augment.policy={name!r}: choose one of {', '.join(POLICIES)}.")


class AutoAugmentPolicy(A.ImageOnlyTransform):
    """A torchvision augmentation policy as one albumentations step (HxWx3 uint8 in and out)."""

    def __init__(self, policy: str = "randaugment", magnitude: int = 9, num_ops: int = 2, p: float = 1.0):
        super().__init__(p=p)
        self.policy = policy
        self.magnitude = magnitude
        self.num_ops = num_ops
        self._transform = policy_transform(policy, magnitude, num_ops)

    def get_params(self) -> dict[str, Any]:
        return {"torch_seed": int(self.random_generator.integers(2**63 - 1))}

    def apply(self, img: np.ndarray, torch_seed: int = 0, **params: Any) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3:
            raise TypeError(f"augment.policy works on HxWx3 uint8 images, got {img.dtype} {img.shape}")
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
            torch.manual_seed(torch_seed)
            out = self._transform(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
        return np.ascontiguousarray(out.permute(1, 2, 0).numpy())

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("policy", "magnitude", "num_ops")
