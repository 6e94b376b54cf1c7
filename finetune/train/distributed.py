"""Several processes, one run (``trainer=ddp``): which process speaks, and how the others join.

Lightning's ``ddp`` strategy starts the processes of ranks > 0 by re-running the command line.
A Hydra multirun command line would re-run the whole sweep in each of them, so the CLI instead
hands them the exact job: while a job runs, :func:`relaunchable_job` puts its overrides and
output folder in the environment (which the children inherit), and :func:`child_argv` rebuilds
the child's command line from it. After the job its children are waited for, and the launcher's
environment variables and the process group are cleared, so the next trial of a sweep starts its
own processes. In a sweep a child leaves a failure to rank zero to record and exits 0: a child
exiting non-zero makes Lightning kill its parent, the sweep with it.

Under torchrun or SLURM (``process_launch`` says ``"external"``) every rank was started from
outside with the job's own command line: Lightning launches nothing, and neither does finetune
(:envvar:`FINETUNE_DDP_JOB` only matters to processes Lightning re-launches; tests/train/test_multinode.py
runs two torchrun nodes). Each rank trains on its round-robin share of the epoch's order
(:class:`finetune.data.epochs.RankShare`).

Only rank zero prints and writes outputs (:func:`finetune.console.is_rank_zero`); checkpoints, loggers and
torchmetrics already act on rank zero or sync across ranks by themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from finetune.config import hydra_value
from finetune.errors import ConfigError
from finetune.train.compat import process_launch, take_children_from_observers

JOB_ENV = "FINETUNE_DDP_JOB"
# What Lightning's subprocess launcher leaves in the environment of the process it runs in.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def relaunchable_job(overrides: Sequence[str], output_dir: str, sweep: bool) -> Iterator[None]:
    """Run one CLI job such that DDP's extra processes re-run exactly it (see the module doc).
    `sweep`: the job is a sweep trial, whose failure its rank-zero process records."""
    saved = {key: os.environ.get(key) for key in (JOB_ENV, *LAUNCHER_ENV)}
    if JOB_ENV not in os.environ:  # a child keeps what its parent gave it
        # The children share the parent's folder; they write no .hydra/ copy of their own.
        args = [
            *overrides,
            f"hydra.run.dir={hydra_value(output_dir)}",
            "hydra.output_subdir=null",
            "hydra.job.name=finetune_ddp_rank",
        ]
        os.environ[JOB_ENV] = json.dumps({"args": args, "sweep": sweep})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _end_children()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _end_children(grace: float = 60.0) -> None:
    """After a job: wait for its DDP children (killing any still there after `grace` seconds),
    and retire Lightning's observer thread, which would SIGKILL this process, and with it the
    rest of a sweep, if a child of a finished job had exited non-zero (see
    :func:`~finetune.train.compat.take_children_from_observers`; tests/train/test_distributed.py fails if a
    sweep dies after a failed DDP trial)."""
    import subprocess

    for child in take_children_from_observers():
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def child_argv(argv: Sequence[str]) -> list[str]:
    """The command line for this process: `argv`, or, in a DDP child (LOCAL_RANK > 0) of a
    :func:`relaunchable_job`, the program name followed by that job's overrides."""
    job = _child_job()
    return [argv[0], *job["args"]] if job else list(argv)


def in_sweep_child() -> bool:
    """Whether this process is a DDP child (rank > 0) of a sweep trial."""
    job = _child_job()
    return bool(job and job["sweep"])


def _child_job() -> dict | None:
    job = os.environ.get(JOB_ENV)
    if not job or os.environ.get("LOCAL_RANK", "0") == "0":
        return None
    return json.loads(job)


def check_launcher(trainer, from_cli: bool) -> None:
    """Refuse process launchers whose extra processes could not run this job (before ``fit``).

    ``ddp`` (re-runs the command line) works from the CLI only; ``ddp_spawn``/``ddp_notebook``
    train in worker processes whose per-epoch history and best metrics never come back."""
    if trainer.world_size == 1:
        return
    launch = process_launch(trainer)
    if launch == "workers":
        raise ConfigError(
            f"trainer.strategy={trainer.strategy.__class__.__name__} (spawned or forked workers) is not supported: "
            "the run's history and best metrics stay in the workers. Use trainer=ddp from the command line: "
            "finetune trainer=ddp trainer.devices=N ..."
        )
    if launch == "script" and not from_cli:
        raise ConfigError(
            "trainer=ddp starts its extra processes by re-running the command line, which fit() (a notebook or a "
            "script) cannot do. Train from a shell: finetune trainer=ddp trainer.devices=N ..., then load the "
            "result with finetune.load(PATH/checkpoints/best.ckpt); or use one device (trainer.devices=1)."
        )
