"""Fast defaults for training: numeric precision, memory layout and compilation, resolved per machine.

``trainer.precision: auto`` picks bf16 mixed precision only where the device computes bf16
natively (CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX); elsewhere bf16 is emulated
and slower than fp32 (measured on a 2-core AVX2 EPYC: lite0 train step 9.6 img/s fp32,
2.9 img/s bf16). ``trainer.channels_last: auto`` uses the NHWC layout for convolutional
backbones (15.5 img/s on the same CPU, 1.6x). Any explicit value wins over ``auto``.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from finetune.errors import ConfigError
from finetune.model.modes import evaluating

# Our keys in the `trainer` group; everything else there is a lightning.Trainer argument.
SPEED_KEYS = ("channels_last", "compile")


@dataclass(frozen=True)
class Speed:
    precision: str  # a Lightning precision string, never "auto"
    channels_last: bool
    compile: bool
    device: torch.device  # where training (and feature extraction) runs

    def describe(self) -> str:
        parts = [f"precision {self.precision}", f"channels_last {'on' if self.channels_last else 'off'}"]
        if self.compile:
            parts.append("torch.compile on")
        return f"speed: {', '.join(parts)} ({self.device.type}; trainer.precision / trainer.channels_last to change)"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype Lightning autocasts to under this precision (None: no autocast)."""
        if self.precision.startswith("bf16"):
            return torch.bfloat16
        if self.precision.startswith("16"):
            return torch.float16
        return None


@cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX-BF16); Linux x86 only."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_device(accelerator: str) -> torch.device:
    """The device a Lightning ``accelerator`` setting trains on (first GPU for gpu/cuda/auto)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(
                "trainer.accelerator asks for a GPU but CUDA is not available; use trainer.accelerator=cpu."
            )
        return torch.device("cuda")
    if accelerator in ("cpu", "auto"):
        return torch.device("cpu")
    raise ConfigError(f"trainer.accelerator={accelerator!r}: finetune supports auto, cpu and gpu.")


def resolve_precision(precision: str, device: torch.device) -> str:
    if str(precision) != "auto":
        return str(precision)
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def _flag(value, key: str, auto: bool) -> bool:
    if value == "auto":
        return auto
    if isinstance(value, bool):
        return value
    raise ConfigError(f"trainer.{key}={value!r}; use true, false or auto.")


def resolve_speed(trainer_cfg: Mapping, model: nn.Module) -> tuple[dict, Speed]:
    """(lightning.Trainer keyword arguments, the speed settings) from the ``trainer`` group."""
    kwargs = {k: v for k, v in dict(trainer_cfg).items() if k not in SPEED_KEYS}
    device = training_device(str(kwargs.get("accelerator", "auto")))
    kwargs["precision"] = resolve_precision(kwargs.get("precision", "auto"), device)
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    speed = Speed(
        precision=kwargs["precision"],
        channels_last=_flag(trainer_cfg.get("channels_last", "auto"), "channels_last", has_conv),
        compile=_flag(trainer_cfg.get("compile", False), "compile", False),
        device=device,
    )
    return kwargs, speed


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_num_workers(setting, device: torch.device, in_memory: bool) -> int:
    """DataLoader worker processes for ``data.num_workers`` (``auto`` or a count).

    auto: on a GPU, up to 8 (one core stays with the training process). On a CPU the workers
    share the cores that train: with images already decoded in memory only augmentation is left,
    cheaper in the training process itself on a small machine (2-core EPYC, lite0 full
    fine-tuning, 5 epochs: 84 s with 0 workers, 114 s with 2); files still get workers to decode.
    """
    if setting != "auto":
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
            raise ConfigError(f"data.num_workers={setting!r}: use auto or an integer >= 0.")
        return setting
    cores = usable_cores()
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    if in_memory:
        return 0 if cores <= 4 else min(4, cores // 4)
    return min(2, cores) if cores <= 4 else min(8, cores // 2)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC layout for an image batch; other tensors unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


@torch.inference_mode()
def forward_images_per_second(
    model: nn.Module, input_size, speed: Speed, seconds: float = 2.0, batch_size: int = 32
) -> float:
    """Images/s of `model`'s forward pass (eval mode, batches of `batch_size` at `input_size`
    (C, H, W)) on `speed`'s device, precision and layout: one warm-up batch, then `seconds` of batches."""
    import time

    model.to(speed.device)
    batch = torch.randn(batch_size, *input_size, device=speed.device)
    batch = to_channels_last(batch) if speed.channels_last else batch
    dtype = speed.autocast_dtype

    def forward():
        with torch.autocast(speed.device.type, dtype=dtype, enabled=dtype is not None):
            model(batch)
        if speed.device.type == "cuda":
            torch.cuda.synchronize()

    with evaluating(model):
        forward()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            forward()
            done += batch_size
    return done / (time.perf_counter() - started)
