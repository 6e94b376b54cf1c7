"""MLflow and TensorBoard: Lightning's own loggers, quiet and never blocking a run.

MLflow's store: ``logger.mlflow.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a local SQLite
store in ``mlruns/`` (``mlruns/mlflow.db``, artifacts in ``mlruns/artifacts``) under the run's
folder, or under the sweep's folder for the trials of ``finetune -m`` and ``finetune auto``: one
store and one experiment for them all, each trial a run tagged ``finetune.group`` with that folder.
An unreachable store is one warning line and the run goes on without MLflow.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, MLFlowLogger  # mlflow itself: imported on use
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger(__name__)

GROUP_TAG = "finetune.group"  # the sweep's (or auto's) folder: the trials of one search share it


def flat_params(config: Mapping, prefix: str = "") -> dict[str, object]:
    """`config` flattened to dotted keys (``optimizer.lr``), as a command line overrides them."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_params(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def local_store(root: Path) -> str:
    """The tracking URI of the local store under `root`: ``sqlite:///ROOT/mlruns/mlflow.db``."""
    return f"sqlite:///{(Path(root) / 'mlruns' / 'mlflow.db').resolve()}"


def sweep_trial() -> tuple[Path, str] | None:
    """(the sweep's folder, the trial's name) inside a ``finetune -m`` trial; None otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra.sweep.dir).resolve(), f"job {hydra.job.num}"  # as the sweep's summary.csv and folders


def group_trial(group: str | Path, output_dir: Path) -> tuple[Path, str]:
    """(the search's folder `group`, the trial's name: its folder relative to `group`)."""
    root, out = Path(group).resolve(), Path(output_dir).resolve()
    return root, out.relative_to(root).as_posix() if out.is_relative_to(root) else out.name


def store_folder(logger: Logger) -> Path | None:
    """The folder of an MLflow logger's local SQLite store (``.../mlruns``); None for a server."""
    uri = getattr(logger, "_tracking_uri", "") or ""
    return Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None


def _overrides() -> dict[str, str]:
    """``finetune.overrides``: a sweep trial's command-line overrides, as summary.csv lists them."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {"finetune.overrides": " ".join(HydraConfig.get().overrides.task)[:5000]}


def tensorboard_logger(output_dir: Path, config: Mapping) -> Logger:
    """Event files in ``output_dir/tensorboard`` (``tensorboard --logdir OUTPUT_DIR``): the
    per-epoch metrics, and the run config with the best metrics on the HPARAMS tab at the end."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version="", default_hp_metric=False)


def mlflow_logger(
    cfg: Mapping, output_dir: Path, config: Mapping, group: tuple[Path, str] | None, *, run_id: str | None = None
) -> Logger | None:
    """An MLflow run in ``cfg.experiment`` with the run config as params; None (and one warning
    line) when the tracking store cannot be reached. `group`: (the sweep's folder, the trial's
    name) for a trial of a sweep, which shares the sweep's store and is tagged with its folder.
    `run_id`: the MLflow run a resumed run started (its checkpoint records it), continued when the
    store still holds it; otherwise a new run is started."""
    import mlflow  # noqa: F401 - configures its loggers, quieted below

    for name in ("mlflow", "alembic"):  # "Creating initial MLflow database tables...": nothing to act on
        logging.getLogger(name).setLevel(logging.WARNING)
    root = group[0] if group else Path(output_dir)
    uri = cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or local_store(root)
    experiment = cfg.get("experiment") or "finetune"
    try:
        _reachable(uri)
        # DDP: rank zero alone logs (Lightning's MLFlowLogger), and alone makes the experiment.
        experiment_id = _experiment(uri, experiment) if rank_zero_only.rank == 0 else None
        run_id = _continued(uri, run_id, experiment_id)
    except Exception as err:  # noqa: BLE001 - a tracking store never stops a run
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]  # one line
        log.warning("MLflow: no run logged, %s did not take it (%s); the run goes on without MLflow", uri, reason)
        return None
    tags = {str(k): str(v) for k, v in (cfg.get("tags") or {}).items()}
    if group:
        tags[GROUP_TAG] = str(group[0])
        tags.update(_overrides())
    logger = BestCheckpointMLFlowLogger(
        experiment_name=experiment,
        run_name=cfg.get("run_name") or (group[1] if group else Path(output_dir).name),
        tracking_uri=uri,
        tags=tags,
        log_model=bool(cfg.get("log_model", True)),
        run_id=run_id,
    )
    logger._experiment_id = experiment_id  # found or made above: Lightning's "not found, creating it" stays quiet
    if run_id is None:  # a continued run has its params (MLflow refuses to log one again with a new value)
        logger.log_hyperparams(flat_params(config))
    return logger


def _continued(uri: str, run_id: str | None, experiment_id: str | None) -> str | None:
    """`run_id` when the store at `uri` holds that run in `experiment_id` (a resumed run goes on
    logging into it, as W&B continues its run); None when there is none to continue."""
    if run_id is None or experiment_id is None:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        found = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        log.debug("MLflow: run %s is not in %s; a new run is started", run_id, uri)
        return None
    return run_id if found.info.experiment_id == experiment_id and found.info.lifecycle_stage == "active" else None


def mlflow_run_id(loggers: list[Logger]) -> str | None:
    """The id of the MLflow run among `loggers` (None without one), recorded in checkpoints so that
    a resumed run continues it."""
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            return logger.run_id
    return None


def _reachable(uri: str, timeout: float = 3.0) -> None:
    """Raise OSError when `uri` is an HTTP server that does not answer within `timeout` seconds
    (MLflow's own client retries for minutes)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()


def _experiment(uri: str, name: str) -> str:
    """The id of experiment `name` in `uri`, made when missing; a local SQLite store keeps its
    artifacts beside its database (MLflow's default would be ``./mlruns`` in the working directory)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage != "deleted":
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


class BestCheckpointMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger logging the best checkpoint (``best/best.ckpt``) once the run has
    stored everything in it (:func:`log_best_metrics`); its own logs at the end of ``fit``, before
    the temperature or thresholds are stored, and whichever checkpoint callback saved last
    (finetune's ``last.ckpt``). MLflow's "View run at" lines go to ``finetune.log``."""

    best_callback = None

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        if self._log_model and checkpoint_callback.monitor is not None:
            self.best_callback = checkpoint_callback

    def log_best_checkpoint(self) -> None:
        if self.best_callback is not None:
            self._scan_and_log_checkpoints(self.best_callback)

    def finalize(self, status: str = "success") -> None:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            super().finalize(status)
        if printed.getvalue().strip():
            log.debug("%s", printed.getvalue().strip())


def log_best_metrics(loggers: list[Logger], config: Mapping, metrics: Mapping[str, float]) -> None:
    """The best epoch's metrics as ``best/NAME``: MLflow run metrics, and TensorBoard's HPARAMS
    tab (the run config beside them)."""
    best = {f"best/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "BestCheckpointMLFlowLogger":
            logger.log_metrics(best)
            logger.log_best_checkpoint()
        elif kind == "TensorBoardLogger":
            logger.log_hyperparams(flat_params(config), best)


@rank_zero_only
def log_pictures(loggers: list[Logger], pictures: list) -> None:
    """The run's pictures (``viz/*.png``: curves, confusion matrix, mistakes, ...) where each
    logger shows pictures: W&B's media panel, MLflow artifacts under ``viz/``, TensorBoard's
    IMAGES tab (tag ``viz/NAME``)."""
    for logger in loggers:
        kind = type(logger).__name__
        for picture in pictures:
            if kind == "WandbLogger":
                logger.log_image(key=f"viz/{picture.name}", images=[str(picture.path)], caption=[picture.caption])
            elif kind == "BestCheckpointMLFlowLogger":
                logger.experiment.log_artifact(logger.run_id, str(picture.path), "viz")
            elif kind == "TensorBoardLogger":
                import numpy as np
                from PIL import Image

                with Image.open(picture.path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                logger.experiment.add_image(f"viz/{picture.name}", pixels, dataformats="HWC")
        if kind == "TensorBoardLogger":
            logger.experiment.flush()
