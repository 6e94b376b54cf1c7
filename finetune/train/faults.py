"""Failures mid-run turned into messages that say what to do (the CLI prints them, exit code 2)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch
from lightning.pytorch.utilities.memory import is_oom_error

from finetune.data.datamodule import explain_worker_failure
from finetune.errors import FinetuneError, NonFiniteLossError, OutOfMemoryError
from finetune.train.checkpoints import last_good_checkpoint


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` says memory ran out: Lightning's detector (CUDA out-of-memory messages, the
    cuDNN error that stands for one, the CPU allocator on Linux), plus what it misses.

    Lightning matches exact wordings on a ``RuntimeError`` with one argument. Also recognized here:
    any ``torch.OutOfMemoryError`` (CUDA's, whatever its message), other devices' messages (``MPS
    backend out of memory``, ``XPU out of memory``), and every failure of the CPU allocator, whose
    wording Lightning knows only from Linux (``DefaultCPUAllocator: can't allocate memory``;
    Windows says ``DefaultCPUAllocator: not enough memory``).
    """
    if is_oom_error(err) or isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "DefaultCPUAllocator" in text)


def explain_failure(err: BaseException, batch_size, output_dir: Path) -> BaseException:
    """A FinetuneError with the fix for a failure users can act on; `err` itself otherwise."""
    if isinstance(err, NonFiniteLossError):
        return NonFiniteLossError(f"{err} {last_good_checkpoint(output_dir)}")
    if is_out_of_memory(err):
        return out_of_memory(err, batch_size)
    if is_disk_full(err):
        return disk_full(err, output_dir)
    if isinstance(err, RuntimeError):
        return explain_worker_failure(err)
    return err


def is_disk_full(err: BaseException) -> bool:
    """No space (or quota) left: an ``OSError`` saying so, here or in the chain of exceptions that
    led to `err` (torch's zip writer turns it into ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``, or ``PytorchStreamWriter failed writing file``)."""
    seen = 0
    while err is not None and seen < 16:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(err, RuntimeError) and "PytorchStreamWriter failed writing" in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def disk_full(err: BaseException, output_dir: Path) -> FinetuneError:
    try:
        free = f"{shutil.disk_usage(output_dir).free / 2**20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    return FinetuneError(
        f"Writing to {output_dir} failed: the disk is full ({free}). The checkpoints written before are intact "
        f"(writes are atomic). Free some space, then continue with resume=true (same overrides), or run "
        f"elsewhere with hydra.run.dir=DIR."
    )


def out_of_memory(err: BaseException, batch_size) -> OutOfMemoryError:
    first_line = (str(err).splitlines() or [type(err).__name__])[0]
    if isinstance(batch_size, int) and batch_size > 1:
        half = batch_size // 2
        fix = (
            f"Try data.batch_size={half} (half of {batch_size}); +trainer.accumulate_grad_batches=2 keeps the "
            f"effective batch at {batch_size}. On a GPU, data.find_batch_size=true finds the largest batch that fits."
        )
    else:
        fix = "The batch is already 1: use a smaller backbone or data.image_size, or precision=bf16-mixed."
    return OutOfMemoryError(f"Out of memory with data.batch_size={batch_size} ({first_line}). {fix}")


def find_batch_size(trainer, module, datamodule, device, resuming: bool) -> int:
    """The largest batch size that trains on `device` (Lightning's batch-size finder: powers of
    two from ``datamodule.batch_size``, one step each), set on `datamodule` and returned.

    GPU only: CPU memory does not run out at a batch size a run could use, and the search
    there would only cost time. A resumed run keeps the batch size it started with.
    """
    from lightning.pytorch.tuner import Tuner

    from finetune.errors import ConfigError

    if device.type != "cuda":
        raise ConfigError(
            "data.find_batch_size=true needs a GPU (on a CPU memory is not the limit): set data.batch_size instead."
        )
    if resuming:
        raise ConfigError(
            "data.find_batch_size=true cannot be combined with resume: the resumed run must keep "
            "its batch size. Drop data.find_batch_size and set data.batch_size to the run's."
        )
    found = Tuner(trainer).scale_batch_size(
        module, datamodule=datamodule, mode="power", steps_per_trial=2, init_val=datamodule.batch_size
    )
    datamodule.batch_size = int(found)
    return int(found)
