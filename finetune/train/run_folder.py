"""The run folder: one run at a time in it, no silent overwrite of a finished one, and a stop by
signal that says how to continue.

:func:`finetune.train.run.run` enters ``with RunFolder(cfg, output_dir) as folder`` before any
work and leaves it after ``summary.json``. Contract:

- Lock: the run's leading process (global rank zero, node zero) holds an exclusive POSIX record
  lock (``fcntl.lockf``) on ``OUTPUT_DIR/run.lock`` (its pid written in it) while the block lasts.
  A second run into the same folder is a :class:`ConfigError` (the CLI: exit 2) naming the first's
  pid. The file stays after the run: the lock is the record lock, which the kernel drops when the
  process ends, however it ends (deleting the file could let two later runs lock two different
  files). A record lock belongs to the process, not to its open file: the DataLoader workers a run
  forks do not inherit it, so a ``kill -9`` of the run frees the folder at once, even while its
  orphaned workers live on for a few seconds (an ``flock`` is shared with them, and refused the
  ``resume=true`` started right after). Within one process such locks never conflict, and closing
  any descriptor of the file drops them: :data:`_HELD` keeps the folders this process locked, so
  that a second run in the same process (``fit()`` twice) is refused too. DDP processes of
  rank > 0 (``FINETUNE_DDP_JOB`` children, :mod:`finetune.train.distributed`) share their rank
  zero's folder legitimately: they take no lock and apply none of the policy below. Without fcntl
  (Windows) there is no lock.
- Orphans: temporary files ``checkpoints/.*.ckpt.*.tmp`` that a kill during
  :func:`~finetune.train.checkpoints.atomic_save` left behind are removed once the lock is held.
- A used folder (``summary.json``, or a ``*.ckpt`` in ``checkpoints/``) is refused (ConfigError)
  unless the run continues it (``resume=true``, or ``ckpt_path`` inside it) or ``overwrite=true``
  asks to delete what the old run wrote (:data:`OLD_OUTPUTS`) first. Lightning's SLURM requeue
  checkpoint (``hpc_ckpt_*.ckpt`` beside ``checkpoints/``) marks a requeued job, which re-runs its
  command line unchanged and which Lightning continues from that file: it is let in, so that
  ``SLURMEnvironment(auto_requeue=True)`` keeps working.
- ``folder.resume_from``: what :func:`~finetune.train.checkpoints.resume_source` says, asked after
  the lock is held.
- Stops: a SIGTERM (Lightning's ``SIGTERMException``, raised at the next step once its handler saw
  the signal) or a SIGINT (``KeyboardInterrupt``, or the ``SystemExit(1)`` Lightning turns it into
  inside ``fit``) leaving the block becomes :class:`RunStopped`: a ``SystemExit`` with code
  128 + signal number (143, 130), the shell's convention for "killed by that signal", so that
  ``finetune ... && deploy`` does not deploy a half-trained run. Lightning has written the held
  checkpoints by then (its teardown flushes :class:`~finetune.train.checkpoints.AtomicCheckpointIO`).
  It is not an ``Exception``: a sweep does not record it as a failed trial and go on.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from finetune.console import is_rank_zero
from finetune.errors import ConfigError
from finetune.train.checkpoints import LAST, checkpoint_dir, resume_source

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK = "run.lock"
# The lock files this process holds (resolved paths): record locks do not conflict within a process.
_HELD: set[Path] = set()
# What a run writes into its folder: overwrite=true deletes these (.hydra/ is the new run's already).
OLD_OUTPUTS = ("checkpoints", "csv", "viz", "wandb", "summary.json", "finetune.log", "error.txt")


class RunStopped(SystemExit):
    """A run stopped by `signum` (SIGTERM, SIGINT) in `epoch` (counted from 1; None: before
    training). ``code`` is 128 + `signum`; ``last`` the ``last.ckpt`` it can continue from (None:
    none was written)."""

    def __init__(self, signum: int, epoch: int | None, output_dir: Path):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.epoch = epoch
        self.output_dir = output_dir
        last = checkpoint_dir(output_dir) / LAST
        self.last = last if last.is_file() else None

    def __str__(self) -> str:
        where = f"at epoch {self.epoch}" if self.epoch else "before training started"
        return f"stopped by {self.signal_name} {where}"


class StopNotice(L.Callback):
    """Marks the exception a signal raises inside ``fit`` with the epoch it came in, for
    :class:`RunStopped` (Lightning calls ``on_exception`` before it tears down)."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            exception.finetune_epoch = trainer.current_epoch + 1


def leads_the_run() -> bool:
    """Whether this process owns the folder: global rank zero on node zero (every single-process run)."""
    return is_rank_zero() and os.environ.get("NODE_RANK", "0") in ("", "0")


class RunFolder:
    """The folder policy of the module docstring, as a context manager."""

    def __init__(self, cfg: DictConfig, output_dir: Path):
        self.cfg, self.output_dir = cfg, Path(output_dir)
        self.resume_from: Path | None = None
        self._lock_file = None

    def __enter__(self) -> RunFolder:
        if leads_the_run():
            self._lock()
            try:
                remove_orphans(self.output_dir)
                check_reuse(self.cfg, self.output_dir)
                self.resume_from = resume_source(self.cfg, self.output_dir)
            except BaseException:
                self._unlock()
                raise
        else:
            self.resume_from = resume_source(self.cfg, self.output_dir)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            stop = _stop_signal(error)
            if stop is not None:
                raise RunStopped(stop, _stop_epoch(error), self.output_dir) from None
        finally:
            self._unlock()

    def _lock(self) -> None:
        if fcntl is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = (self.output_dir / LOCK).resolve()
        if path in _HELD:
            raise ConfigError(_busy(self.output_dir, str(os.getpid())))
        f = open(path, "a+")
        try:
            fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise ConfigError(_busy(self.output_dir, holder)) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f
        _HELD.add(path)

    def _unlock(self) -> None:
        if self._lock_file is not None:
            _HELD.discard(Path(self._lock_file.name))
            self._lock_file.close()  # closing drops the record lock
            self._lock_file = None


def _busy(output_dir: Path, holder: str) -> str:
    return (
        f"Another finetune run (pid {holder}) is writing to {output_dir}: two runs in one folder overwrite "
        f"each other's checkpoints. Wait for it to end, or give this run its own folder with hydra.run.dir=DIR."
    )


def busy_refusal(output_dir: Path) -> str | None:
    """Why a run may not start in `output_dir` because another holds its lock (None: free).
    Only tries the lock: the CLI asks before Hydra writes ``.hydra/`` into the live run's folder."""
    lock = output_dir / LOCK
    if fcntl is None or not lock.is_file():
        return None
    if lock.resolve() in _HELD:  # ours: opening and closing it here would drop the lock
        return _busy(output_dir, str(os.getpid()))
    with open(lock) as f:
        try:
            fcntl.lockf(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _busy(output_dir, f.read().strip() or "unknown")
    return None


def remove_orphans(output_dir: Path) -> list[Path]:
    """Delete the temporary files a kill mid-write left in ``checkpoints/``; returns them."""
    orphans = sorted(checkpoint_dir(output_dir).glob(".*.ckpt.*.tmp"))
    for path in orphans:
        path.unlink(missing_ok=True)
    return orphans


def check_reuse(cfg: DictConfig, output_dir: Path) -> None:
    """Refuse to start a new run over a used folder (see the module docstring); with
    ``overwrite=true`` delete the old run's outputs instead."""
    refusal = reuse_refusal(cfg, output_dir)
    if refusal is not None:
        raise ConfigError(refusal)
    if cfg.get("overwrite") and used(output_dir) and cfg.get("resume") is not True:
        for name in OLD_OUTPUTS:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def reuse_refusal(cfg: DictConfig, output_dir: Path) -> str | None:
    """Why a run with `cfg` may not start in `output_dir` (None: it may). Reads only: the CLI asks
    before Hydra writes ``.hydra/`` into the folder."""
    overwrite, resume = cfg.get("overwrite", False), cfg.get("resume")
    if overwrite not in (True, False, None):
        return f"overwrite={overwrite!r}: it must be true or false."
    if overwrite and (resume is True or cfg.get("ckpt_path")):
        return (
            "overwrite=true deletes the folder's checkpoints, and resume=true / ckpt_path continues "
            "from one: give one of them, not both."
        )
    if overwrite or resume is True or _inside(cfg.get("ckpt_path"), output_dir) or not used(output_dir):
        return None
    if any(output_dir.glob("hpc_ckpt_*.ckpt")):  # a requeued SLURM job: Lightning continues from that file
        return None
    return (
        f"{output_dir} holds a run already (summary.json or checkpoints); a new run there would replace its "
        f"checkpoints and metrics. Continue it with resume=true, replace it with overwrite=true, or give this "
        f"run its own folder with hydra.run.dir=DIR."
    )


def make_folder(output_dir: Path) -> Path:
    """Create the run folder and write a probe file in it (permission bits alone do not tell:
    root writes anywhere but to read-only mounts and immutable folders), or say in one sentence
    why it cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"Cannot write the run's outputs to {output_dir} ({err.strerror or err}): choose a folder "
            f"you can write to with hydra.run.dir=DIR."
        ) from None
    return output_dir


def used(output_dir: Path) -> bool:
    """Whether a run wrote results here: ``summary.json`` or a checkpoint."""
    return (output_dir / "summary.json").exists() or any(checkpoint_dir(output_dir).glob("*.ckpt"))


def _inside(ckpt_path, output_dir: Path) -> bool:
    if not ckpt_path:
        return False
    return Path(str(ckpt_path)).expanduser().resolve().parent == checkpoint_dir(output_dir).resolve()


def _stop_signal(error: BaseException | None) -> int | None:
    """The signal that `error` stands for: SIGTERM, SIGINT, or None (not a stop by signal)."""
    if isinstance(error, SIGTERMException):
        return signal.SIGTERM
    if isinstance(error, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt):
        return signal.SIGINT  # Lightning's "graceful shutdown" of a Ctrl-C in fit: sys.exit(1)
    return None


def _stop_epoch(error: BaseException) -> int | None:
    for candidate in (error, error.__context__):
        if hasattr(candidate, "finetune_epoch"):
            return candidate.finetune_epoch
    return None
