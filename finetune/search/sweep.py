"""Sweeps (``finetune -m``): one failing trial never stops the others, and a summary ranks them.

:class:`SweepSummary` is a Hydra callback (configured in ``conf/hydra/default.yaml``). After each
job it rewrites ``<sweep dir>/summary.csv`` (trials ranked by the objective, with their overrides,
status, error and output folder) and at the end prints the table. It works for grids and Optuna
studies alike, with jobs run locally or on SLURM. A trial that fails leaves
``error.txt`` in its folder; Hydra's grid sweeper gets NaN for it, Optuna a FAIL trial.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from finetune.console import is_rank_zero, setup
from finetune.tables import format_table

ERROR_FILE = "error.txt"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def basic_sweeper() -> bool:
    """Whether this multirun uses Hydra's own sweeper (grids), not another such as Optuna's."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().sweeper.get("_target_") == BASIC_SWEEPER


class SweepSummary(Callback):
    """Ranks a sweep's trials by `objective` (``mode`` max or min) in ``<sweep dir>/summary.csv``.

    Each job's row is written to ``<sweep dir>/.trials/<job>.json`` by the process that ran it, and
    the CSV is rebuilt from all rows after every job and at the end: it is right whether the jobs
    run in this process (Hydra's basic launcher), in other processes or on SLURM nodes (submitit).
    """

    def __init__(self, objective: str = "auto", mode: str = "max"):
        self.setting = objective  # auto: the trials' monitored metric (val/acc, or val/map for multilabel)
        self.objective = objective
        self.mode = mode

    def _resolve(self, config: DictConfig) -> None:
        if self.setting == "auto":
            from finetune.train.history import monitored  # lightning: only when a sweep runs

            self.objective = monitored(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._resolve(config)
        # A sweep folder used again starts a fresh table; the workers of a shared study fill one together.
        if config.hydra.sweeper.get("shared"):
            return
        for stale in _trials_dir(config).glob("*.json"):
            stale.unlink()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        hydra = config.hydra
        if str(hydra.mode) != "RunMode.MULTIRUN" or not is_rank_zero():  # SLURM runs a job once per rank
            return
        self._resolve(config)
        output_dir = Path(hydra.runtime.output_dir)
        value = job_return._return_value if job_return.status.name == "COMPLETED" else None
        error = (output_dir / ERROR_FILE).read_text().strip() if (output_dir / ERROR_FILE).is_file() else ""
        if job_return.status.name == "FAILED":
            error = error or f"{type(job_return._return_value).__name__}: {job_return._return_value}"
        failed = bool(error) or not isinstance(value, (int, float)) or math.isnan(value)
        row = {
            "rank": None,
            "job": hydra.job.num,
            "status": "failed" if failed else "completed",
            self.objective: None if failed else float(value),
            "overrides": " ".join(job_return.overrides or []),
            "error": error.splitlines()[0] if error else "",
            "output_dir": str(output_dir),
        }
        trials = _trials_dir(config)
        trials.mkdir(parents=True, exist_ok=True)
        _write_atomic(trials / f"{hydra.job.num}.json", json.dumps(row))
        self._write(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._resolve(config)
        rows = self._write(config)
        if not rows:
            return
        # The table shows what varies between trials; the CSV keeps every override.
        shared = set.intersection(*(set(r["overrides"].split()) for r in rows))
        table = [
            [
                r["rank"] or "-",
                r["job"],
                r["status"],
                "-" if r[self.objective] is None else f"{r[self.objective]:.4f}",
                " ".join(o for o in r["overrides"].split() if o not in shared) or "(none)",
            ]
            for r in rows
        ]
        setup().info(
            "\n".join(
                [
                    f"\nsweep of {len(rows)} trials, ranked by {self.objective} ({self.mode}):",
                    format_table(["rank", "job", "status", self.objective, "overrides"], table, "rrlrl"),
                    f"  summary: {Path(config.hydra.sweep.dir) / 'summary.csv'}",
                ]
            )
        )
        if config.get("viz", {}).get("enabled") and not config.viz.get("sweep_trials", False):
            _draw_best(rows)

    def _write(self, config: DictConfig) -> list[dict]:
        """Rebuild summary.csv from every job's row; returns the ranked rows."""
        rows = [json.loads(p.read_text()) for p in sorted(_trials_dir(config).glob("*.json"))]
        if not rows:
            return []
        sign = -1.0 if self.mode == "max" else 1.0
        done = sorted(
            (r for r in rows if r["status"] == "completed"), key=lambda r: (sign * r[self.objective], r["job"])
        )
        for rank, row in enumerate(done, 1):
            row["rank"] = rank
        rows = done + sorted((r for r in rows if r["status"] != "completed"), key=lambda r: r["job"])
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        _write_atomic(Path(config.hydra.sweep.dir) / "summary.csv", buffer.getvalue())
        return rows


def _trials_dir(config: DictConfig) -> Path:
    return Path(config.hydra.sweep.dir) / ".trials"


def _draw_best(rows: list[dict]) -> None:
    """The best trial's pictures (``finetune viz`` on its best checkpoint, into its ``viz/``),
    drawn once at the end of the sweep instead of in every trial (``viz.sweep_trials``)."""
    best = next((r for r in rows if r["rank"] == 1), None)
    checkpoint = Path(best["output_dir"]) / "checkpoints" / "best.ckpt" if best else None
    if checkpoint is None or not checkpoint.is_file():
        return
    from finetune.use.load import load
    from finetune.viz.checkpoint import checkpoint_pictures

    log = setup()
    try:
        pictures = checkpoint_pictures(load(checkpoint), checkpoint, checkpoint.parent.parent / "viz")
        log.info(
            "pictures of the best trial (job %s): %s",
            best["job"],
            checkpoint.parent.parent / "viz" / "index.md" if pictures else "none",
        )
    except Exception as err:  # noqa: BLE001 - the sweep's results are written; pictures are extra
        log.info(
            "no pictures of the best trial: %s: %s", type(err).__name__, str(err).splitlines()[0] if str(err) else ""
        )


def _write_atomic(path: Path, text: str) -> None:
    """Jobs on other processes or nodes may rewrite the same file: readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sqlite_url(path: str) -> str:
    """``sqlite:////ABSOLUTE/PATH`` for `path` (relative to the working directory), its folder
    created: SQLite creates a missing database file but not a missing folder."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def register_resolvers() -> None:
    """``${finetune_sqlite:PATH}`` for sweep configs (conf/hparams_search/optuna.yaml)."""
    OmegaConf.register_new_resolver("finetune_sqlite", sqlite_url, replace=True)
