"""Failures mid-run turned into messages that say what to do (the CLI prints them, exit code 2)."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.checkpoints import last_good_checkpoint
from finetune.data.datamodule import explain_worker_failure
from finetune.errors import NonFiniteLossError, OutOfMemoryError


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError saying a device or the CPU allocator ran out."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "DefaultCPUAllocator" in text)


def explain_failure(err: BaseException, batch_size, output_dir: Path) -> BaseException:
    """A FinetuneError with the fix for a failure users can act on; `err` itself otherwise."""
    if isinstance(err, NonFiniteLossError):
        return NonFiniteLossError(f"{err} {last_good_checkpoint(output_dir)}")
    if is_out_of_memory(err):
        return out_of_memory(err, batch_size)
    if isinstance(err, RuntimeError):
        return explain_worker_failure(err)
    return err


def out_of_memory(err: BaseException, batch_size) -> OutOfMemoryError:
    first_line = (str(err).splitlines() or [type(err).__name__])[0]
    if isinstance(batch_size, int) and batch_size > 1:
        half = batch_size // 2
        fix = (f"Try data.batch_size={half} (half of {batch_size}); +trainer.accumulate_grad_batches=2 keeps the "
               f"effective batch at {batch_size}.")
    else:
        fix = "The batch is already 1: use a smaller backbone or data.image_size, or precision=bf16-mixed."
    return OutOfMemoryError(f"Out of memory with data.batch_size={batch_size} ({first_line}). {fix}")
