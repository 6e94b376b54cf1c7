"""Checkpoints a killed run can continue from.

Contract (see docs/guide/scale.md, "Runs that survive"):

- ``checkpoints/last.ckpt`` is due at the end of every training epoch (next to ``best.ckpt``) and
  written atomically: a temporary file in the same folder, fsync, ``os.replace``. A crash
  mid-write leaves the previous ``last.ckpt`` intact.
- Writes are paced (``callbacks.checkpoint.min_write_interval_s``, default 10): an epoch end less
  than that many seconds after the previous write keeps its checkpoints in memory, and the next
  epoch end past the interval, or the end of training (also by an exception), writes them. The
  files on disk are always those of one epoch end, at most the interval plus one epoch behind: a
  kill loses at most that much work, and runs of sub-second epochs (a head on cached features)
  do not spend most of their time writing 14 MB files. 0 writes at every epoch end.
- At a write point ``last.ckpt`` goes first and ``best.ckpt`` (held until then) after it, so a
  kill between the two never leaves a best without a last beside it: the folder can always be
  resumed. Both hold the same callback states (the best checkpoint's decision for that epoch).
- ``resume=true`` continues the run in the output folder (``hydra.run.dir=DIR``) from its
  ``last.ckpt``; ``ckpt_path=PATH`` continues from any checkpoint, writing to a new folder. Asking
  for either when there is nothing to continue from is a :class:`ConfigError`, and so is a
  checkpoint trained with a different model, classes, freezing or optimizer.
- Lightning restores model, optimizer, LR scheduler, epoch and step, and callback states
  (best checkpoint, early stopping, the metrics history). The W&B run id is stored here and
  reused (``resume="allow"``). Randomness needs no saved state: every epoch's draws are a
  function of (seed, epoch) (:mod:`finetune.data.epochs` and :class:`EpochSeeding`), so the
  interrupted epoch is redone exactly and a resumed run ends with the same weights.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from finetune.data.epochs import derived_seed
from finetune.errors import ConfigError
from finetune.files import follow_umask

LAST = "last.ckpt"
RUN_KEY = "finetune_run"  # checkpoint[RUN_KEY] = {"wandb_id": ...}: plain strings (weights_only)
# Settings a checkpoint's state depends on: a resume that changes one cannot load it faithfully.
MUST_MATCH = ("backbone.name", "head", "freeze", "optimizer.name", "scheduler.name")


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)  # mkstemp made it 0600: colleagues could not read the checkpoint
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`atomic_save` for local paths, and paced writes for the
    run's own files (those in `paced_dir`, ``last.ckpt`` before the others): see the module docstring. Other paths
    (the batch-size
    finder's scratch checkpoint, which it reads back at once) are always written immediately.
    """

    def __init__(self, min_write_interval_s: float = 0.0, paced_dir: Path | None = None):
        self.min_write_interval_s = float(min_write_interval_s)
        self.paced_dir = Path(paced_dir).resolve() if paced_dir is not None else None
        self._last_write = time.monotonic()  # the run's start: its first epochs are paced too
        self._pending: dict[str, tuple[dict, Any]] = {}  # path -> (checkpoint copy, storage options)

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        if not self._ours(path):
            self._write(checkpoint, path, storage_options)
            return
        due = time.monotonic() - self._last_write >= self.min_write_interval_s
        if Path(path).name != LAST or not due:
            # best.ckpt waits for its epoch's last.ckpt; a paced epoch end waits for the next write
            # point (a copy: the live tensors change with the next step).
            held = apply_to_collection(checkpoint, torch.Tensor, _cpu_copy) if not due else checkpoint
            self._pending[str(path)] = (held, storage_options)
            return
        self._pending.pop(str(path), None)  # an older last.ckpt held in memory: superseded
        self._write(checkpoint, path, storage_options)  # last.ckpt first: a best never lacks a last
        self.flush()
        self._last_write = time.monotonic()

    def remove_checkpoint(self, path) -> None:
        self._pending.pop(str(path), None)
        super().remove_checkpoint(path)

    def flush(self) -> None:
        """Write the checkpoints held in memory."""
        while self._pending:  # last.ckpt first
            path = min(self._pending, key=lambda p: Path(p).name != LAST)
            checkpoint, storage_options = self._pending[path]
            self._write(checkpoint, path, storage_options)
            del self._pending[path]

    def teardown(self) -> None:
        """End of fit, also when it raised: nothing held in memory is lost."""
        self.flush()
        super().teardown()

    def _ours(self, path) -> bool:
        return self.paced_dir is not None and "://" not in str(path) and Path(path).resolve().parent == self.paced_dir

    def _write(self, checkpoint: dict, path, storage_options: Any | None) -> None:
        if "://" in str(path):  # remote filesystems: Lightning's own transactional write
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, Path(path))


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


class EpochSeeding(L.Callback):
    """Re-seeds torch, numpy and python with (seed, epoch) before the first step of every training
    epoch, so dropout and any other global draw in an epoch does not depend on the epochs before it.

    Not in ``on_train_epoch_start``: Lightning creates the epoch's DataLoader iterator (which draws
    a base seed from torch's generator) after that hook in a continuing run but before it in a
    resumed one; the first batch comes after both.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx != 0:
            return
        seed = derived_seed(self.seed, trainer.current_epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also every CUDA device


class RunRecord(L.Callback):
    """Writes what a resume needs beyond Lightning's own state into checkpoints: the W&B run id,
    and the MLflow run's id when the run logs to MLflow."""

    def __init__(self, wandb_id: str):
        self.wandb_id = wandb_id

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        from finetune.train.tracking import mlflow_run_id

        mlflow_id = mlflow_run_id(trainer.loggers)
        checkpoint[RUN_KEY] = {"wandb_id": self.wandb_id, **({"mlflow_id": mlflow_id} if mlflow_id else {})}


def resume_source(cfg: Mapping, output_dir: Path) -> Path | None:
    """The checkpoint this run continues from: ``ckpt_path``, else ``OUTPUT_DIR/checkpoints/last.ckpt``
    when ``resume`` is true, else None. A ConfigError when the one asked for does not exist."""
    ckpt_path, resume = cfg.get("ckpt_path"), cfg.get("resume")
    if resume not in (True, False, None):
        raise ConfigError(f"resume={resume!r}; use resume=true (continue the run in hydra.run.dir) or ckpt_path=PATH.")
    if ckpt_path:
        path = Path(str(ckpt_path)).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={ckpt_path} does not exist: nothing to resume from. "
                f"Give a checkpoint file, e.g. ckpt_path=RUN_DIR/checkpoints/{LAST}."
            )
        return path
    if not resume:
        return None
    path = checkpoint_dir(output_dir) / LAST
    if path.is_file():
        return path
    if checkpoint_dir(output_dir).exists():
        # A run was here and stopped before it wrote last.ckpt (in its first write, which made the
        # folder): another run's folder is not what was meant. (finetune.log is Hydra's too: no sign.)
        raise ConfigError(
            f"resume=true but the run in {output_dir} stopped before it wrote checkpoints/{LAST} (its first epoch "
            f"did not end): nothing to resume in that folder. Start it again without resume=true (add "
            f"overwrite=true if it refuses the folder)."
        )
    hint = _latest_unfinished(output_dir)
    raise ConfigError(
        f"resume=true but {output_dir} has no checkpoints/{LAST}: nothing to resume from (a run writes it at "
        f"the end of each epoch). Name the run's folder with hydra.run.dir=DIR"
        + (f" (the latest unfinished run is {hint})" if hint else "")
        + ", or start a new run without resume=true."
    )


def _latest_unfinished(output_dir: Path) -> Path | None:
    """The newest run folder near `output_dir` with a last.ckpt and no summary.json (unfinished)."""
    root = output_dir.parent.parent  # outputs/DATE/TIME -> outputs
    candidates = [
        p.parent.parent for p in root.glob(f"*/*/checkpoints/{LAST}") if not (p.parent.parent / "summary.json").exists()
    ]
    return max(candidates, key=lambda p: (p / "checkpoints" / LAST).stat().st_mtime, default=None)


def read_resume_checkpoint(path: Path, config: Mapping, classes: list[str]) -> tuple[dict[str, str], int]:
    """Check that `path` can continue a run with `config` and `classes`; returns its run record
    (``wandb_id``, ``mlflow_id`` when it logged to MLflow) and the (0-based) epoch whose end it
    was saved at."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ConfigError(
            f"Cannot resume from {path}: it does not load with torch.load(weights_only=True) "
            f"({str(err).splitlines()[0]})."
        ) from None
    stored = checkpoint.get("finetune") if isinstance(checkpoint, dict) else None
    if not stored or "loops" not in checkpoint:
        raise ConfigError(f"Cannot resume from {path}: it is not a finetune training checkpoint.")
    differences = []
    if list(stored.get("classes", [])) != list(classes):
        differences.append(f"classes {stored.get('classes')} (this run: {classes})")
    for key in MUST_MATCH:
        then, now = _get(stored.get("config", {}), key), _get(config, key)
        if then != now:
            differences.append(f"{key}={then} (this run: {now})")
    if differences:
        raise ConfigError(
            f"Cannot resume from {path}: it was trained with "
            + "; ".join(differences)
            + ". Resume with the checkpoint's settings, or start a new run without resume/ckpt_path."
        )
    return dict(checkpoint.get(RUN_KEY) or {}), int(checkpoint.get("epoch", -1))


def stored_lr(path: Path | None) -> float | None:
    """The ``optimizer.lr`` the run in checkpoint `path` trained with (None: no checkpoint, or no number)."""
    if path is None:
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    lr = _get((checkpoint.get("finetune") or {}).get("config", {}), "optimizer.lr")
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def last_good_checkpoint(output_dir: Path) -> str:
    """A sentence saying where the run's last good checkpoint is, for an error message."""
    path = checkpoint_dir(output_dir) / LAST
    if not path.is_file():
        return "No checkpoint was written before it (it happened in the first epoch)."
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True).get("epoch")
        at = f" (end of epoch {int(epoch) + 1})" if epoch is not None else ""
    except Exception:  # noqa: BLE001 - the path is the useful part
        at = ""
    return f"The last good checkpoint is kept: {path}{at}."


def _get(tree: Any, dotted: str) -> Any:
    """`tree`'s value at ``a.b.c`` (plain containers), None where a key is missing."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree


class Resume:
    """What train.run needs to make a run resumable: where it continues from (or None), how many
    epochs' logged rows the output folder keeps (``logged_through_epoch``, counted from 1; 0: none),
    the W&B run id to (re)use, the MLflow run to continue (``mlflow_id``; None: a new one), the
    callbacks and the checkpoint-IO plugin."""

    def __init__(
        self,
        path: Path | None,
        output_dir: Path,
        seed: int,
        config: Mapping,
        classes: list[str],
        min_write_interval_s: float = 0.0,
    ):
        self.path = path
        record, epoch = read_resume_checkpoint(path, config, classes) if path else ({}, -1)
        max_epochs = (config.get("trainer") or {}).get("max_epochs")
        if isinstance(max_epochs, int) and 0 < max_epochs < epoch + 1:
            raise ConfigError(
                f"{path} already finished epoch {epoch + 1}, beyond trainer.max_epochs={max_epochs}: "
                f"resume with trainer.max_epochs={epoch + 1} or more (the run's own value), or "
                f"start a new run."
            )
        self.wandb_id = record.get("wandb_id") or new_run_id()
        self.mlflow_id = record.get("mlflow_id")
        # resume=true continues in the checkpoint's own folder: what it logged through `epoch` stays
        in_place = path is not None and Path(path).resolve().parent == checkpoint_dir(output_dir).resolve()
        self.logged_through_epoch = epoch + 1 if in_place else 0  # epochs finished, counted from 1
        self.callbacks = [EpochSeeding(seed), RunRecord(self.wandb_id), last_checkpoint(output_dir)]
        self.plugins = [AtomicCheckpointIO(min_write_interval_s, checkpoint_dir(output_dir))]


def last_checkpoint(output_dir: Path) -> ModelCheckpoint:
    """``checkpoints/last.ckpt`` after every training epoch, paced by :class:`AtomicCheckpointIO`.
    (ModelCheckpoint's own ``save_last`` writes it only in epochs where the monitored metric
    improved.) Saved at the end of the training epoch, after validation and the metrics history, which Lightning
    resumes from as a
    finished epoch: the next one starts with all its hooks."""
    return ModelCheckpoint(
        dirpath=checkpoint_dir(output_dir),
        filename=Path(LAST).stem,
        monitor=None,
        save_top_k=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
