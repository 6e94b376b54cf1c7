"""An exponential moving average of the weights, through Lightning's :class:`WeightAveraging`.

What Lightning's callback gives: the average is updated after every optimizer step, swapped in
for validation (so ``val/*`` and the best-checkpoint choice are the averaged weights'), copied
into the model when training ends, and written as the checkpoint's ``state_dict`` (the training
weights go to ``current_model_state``, the update count to ``averaging_state``). So ``best.ckpt``,
``finetune.load`` and every export use the averaged weights, and ``last.ckpt`` holds both: a
resumed run continues the same average and ends bit-identical to an uninterrupted one.

What is added here: timm's warm-up of the decay (ModelEmaV3), ``min(decay, (1 + n) / (10 + n))``
after n updates, so that the first averages forget the random head quickly; Lightning's
EMAWeightAveraging has a fixed decay.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from lightning.pytorch.callbacks import WeightAveraging

from finetune.errors import ConfigError


def warmed_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of update number ``updates + 1`` (``updates`` done before it)."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def ema_update(decay: float, warmup: bool) -> Callable:
    """A ``multi_avg_fn`` for :class:`torch.optim.swa_utils.AveragedModel` (one call per device
    and dtype group): ``ema = decay_n * ema + (1 - decay_n) * current``."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        d = warmed_decay(decay, int(updates), warmup)
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked): as torch's own EMA does
            for a, c in zip(averaged, current, strict=True):
                a.copy_(a * d + c * (1.0 - d))

    return update


class EMA(WeightAveraging):
    """Lightning's weight averaging with an exponential moving average of parameters and buffers."""

    def __init__(self, decay: float, warmup: bool = True):
        if not 0 < decay < 1:
            raise ConfigError(f"ema.decay={decay}: a number between 0 and 1 (0.99 averages about 100 steps; 0: off).")
        super().__init__(use_buffers=True, multi_avg_fn=ema_update(decay, warmup))
        self.decay = decay
        self.warmup = warmup


def ema_callback(ema: Mapping | None) -> EMA | None:
    """The run's EMA callback from the ``ema`` config block, or None when ``decay`` is 0."""
    decay = float((ema or {}).get("decay") or 0)
    if decay == 0:
        return None
    return EMA(decay, bool((ema or {}).get("warmup", True)))


def describe(callback: EMA) -> str:
    warm = ", decay warmed up as min(decay, (1 + n) / (10 + n))" if callback.warmup else ""
    return f"EMA of the weights, decay {callback.decay:g} (about {round(1 / (1 - callback.decay))} steps){warm}"
