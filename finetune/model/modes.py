"""Eval mode for a while, then each module's own train/eval mode back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode within the block; afterwards every submodule has the mode it had
    before, one by one. ``model.train(was_training)`` is not the same: it sets one mode on every
    submodule, so BatchNorm layers a freeze plan keeps in eval mode (frozen stages,
    ``freeze.trainable_batchnorm=eval``) would train on batch statistics again. Hand-written
    because torch has no public equivalent (Lightning's ``_ModuleMode`` is private)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training
