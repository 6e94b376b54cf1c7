"""Lightning internals we rely on, in one place.

Everything here reaches into names Lightning does not promise to keep (underscored classes,
attributes of private classes). Each is wrapped in one function that the rest of the package
calls, and tests/train/test_compat.py imports every name and runs every function, so a Lightning
upgrade that renames or removes one fails there, with the Lightning version in the message,
instead of in the middle of a user's run. Imports are inside the functions: ``import finetune``
keeps working on a Lightning that lacks one of them.

What we rely on (Lightning 2.x):

- ``lightning.pytorch.strategies.launchers.subprocess_script._SubprocessScriptLauncher`` (the
  ``ddp`` strategy's launcher: re-runs the command line for ranks > 0) and its
  ``cluster_environment.creates_processes_externally``; ``lightning.pytorch.strategies.launchers.
  multiprocessing._MultiProcessingLauncher`` (``ddp_spawn``/``ddp_notebook``: worker processes).
  Used by :func:`process_launch`.
- ``lightning.fabric.strategies.launchers.subprocess_script._ChildProcessObserver``: the thread
  (named ``child-process-observer``) that SIGKILLs the main process when a child exits non-zero;
  its list ``_child_processes``; it ends once every child in that list exited 0, so an empty
  list ends it. Used by :func:`take_children_from_observers`.
- ``trainer.fit_loop.epoch_progress.current.processed``: the epochs a run has begun, restored
  from a checkpoint before the training iterator is made (``current_epoch`` is updated only
  later). Used by :func:`epochs_begun`.
- ``WandbLogger._wandb_init``: the keyword arguments it hands ``wandb.init``; it always includes
  ``anonymous``, which W&B 0.19+ answers with a deprecation warning on every run. Used by
  :func:`drop_wandb_anonymous`.
"""

from __future__ import annotations

import subprocess
import threading


def process_launch(trainer) -> str | None:
    """How `trainer`'s strategy starts the processes of ranks > 0:

    - ``"script"``: by re-running this process's command line (``strategy=ddp``);
    - ``"external"``: the same launcher, but something else (torchrun, SLURM) started them;
    - ``"workers"``: spawned or forked worker processes (``ddp_spawn``, ``ddp_notebook``);
    - ``None``: no launcher, or one that starts no processes of its own (one device, XLA, ...).
    """
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, _MultiProcessingLauncher):
        return "workers"
    if isinstance(launcher, _SubprocessScriptLauncher):
        return "external" if launcher.cluster_environment.creates_processes_externally else "script"
    return None


def take_children_from_observers() -> list[subprocess.Popen]:
    """The child processes every live Lightning child-process observer watches, taken from it.

    Left with nothing to watch, an observer ends at its next check (every 5 s) instead of
    SIGKILLing this process, and the rest of a sweep with it, when a child of a finished job
    exits non-zero. The caller waits for (or kills) the returned children.
    """
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    children: list[subprocess.Popen] = []
    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver):
            taken, thread._child_processes = thread._child_processes, []
            children += taken
    return children


def drop_wandb_anonymous(logger) -> None:
    """Take ``anonymous`` out of what `logger` (a ``WandbLogger``) passes to ``wandb.init``: W&B
    deprecated it and warns about it on every run, also when it is None, as Lightning passes it."""
    logger._wandb_init.pop("anonymous", None)


def epochs_begun(trainer) -> int:
    """How many training epochs `trainer` has begun, restored checkpoints included: the epoch a
    DataLoader iterator made now belongs to (a resumed run makes it before Lightning calls
    ``set_epoch``, and worker processes prefetch indices at once)."""
    return int(trainer.fit_loop.epoch_progress.current.processed)
