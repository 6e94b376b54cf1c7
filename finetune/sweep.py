"""Sweeps (``finetune -m``): one failing trial never stops the others, and a summary ranks them.

:class:`SweepSummary` is a Hydra callback (configured in ``conf/hydra/default.yaml``). After each
job it rewrites ``<sweep dir>/summary.csv`` (trials ranked by the objective, with their overrides,
status, error and output folder) and at the end prints the table. A trial that fails leaves
``error.txt`` in its folder and returns NaN, which Optuna records as a failed trial.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from finetune.summary import format_table

ERROR_FILE = "error.txt"


class SweepSummary(Callback):
    def __init__(self, objective: str = "val/acc", mode: str = "max"):
        self.objective = objective
        self.mode = mode
        self.rows: list[dict] = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        hydra = config.hydra
        if str(hydra.mode) != "RunMode.MULTIRUN":
            return
        output_dir = Path(hydra.runtime.output_dir)
        value = job_return._return_value if job_return.status.name == "COMPLETED" else None
        error = (output_dir / ERROR_FILE).read_text().strip() if (output_dir / ERROR_FILE).is_file() else ""
        if job_return.status.name == "FAILED":
            error = error or f"{type(job_return._return_value).__name__}: {job_return._return_value}"
        failed = bool(error) or not isinstance(value, (int, float)) or math.isnan(value)
        self.rows.append({
            "rank": None,
            "job": hydra.job.num,
            "status": "failed" if failed else "completed",
            self.objective: None if failed else float(value),
            "overrides": " ".join(job_return.overrides or []),
            "error": error.splitlines()[0] if error else "",
            "output_dir": str(output_dir),
        })
        self._write(Path(hydra.sweep.dir) / "summary.csv")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.rows:
            return
        path = Path(config.hydra.sweep.dir) / "summary.csv"
        # The table shows what varies between trials; the CSV keeps every override.
        shared = set.intersection(*(set(r["overrides"].split()) for r in self.rows))
        rows = [[r["rank"] or "-", r["job"], r["status"], "-" if r[self.objective] is None else f"{r[self.objective]:.4f}",
                 " ".join(o for o in r["overrides"].split() if o not in shared) or "(none)"] for r in self._ranked()]
        print(f"\nsweep of {len(self.rows)} trials, ranked by {self.objective} ({self.mode}):")
        print(format_table(["rank", "job", "status", self.objective, "overrides"], rows, "rrlrl"))
        print(f"  summary: {path}")

    def _ranked(self) -> list[dict]:
        sign = -1.0 if self.mode == "max" else 1.0
        done = sorted((r for r in self.rows if r["status"] == "completed"), key=lambda r: sign * r[self.objective])
        for rank, row in enumerate(done, 1):
            row["rank"] = rank
        return done + [r for r in self.rows if r["status"] != "completed"]

    def _write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self._ranked()
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
