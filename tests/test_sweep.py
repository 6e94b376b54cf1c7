"""Sweeps: every trial in its own folder, failures isolated, a ranked summary CSV."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

from conftest import QUICK, TINY


def test_multirun_grid_ranks_trials_and_isolates_a_failing_one(image_folder, tmp_path):
    args = ["-m", "+recipe=freeze_all_but_head", "data=folder", f"data.root={image_folder}", *TINY, *QUICK,
            "optimizer.name=sgd,lamb", "optimizer.lr=0.01,0.1", "hydra.sweep.dir=sweep"]
    proc = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "failed"]
    assert [r["rank"] for r in rows[:2]] == ["1", "2"]
    assert float(rows[0]["val/acc"]) >= float(rows[1]["val/acc"])
    assert all("optimizer.name=sgd" in r["overrides"] for r in rows[:2])
    assert all("lamb" in r["error"] and "choose sgd or adamw" in r["error"] for r in rows[2:])
    for row in rows:
        assert (tmp_path / "sweep" / row["job"]).is_dir()
    assert (tmp_path / "sweep" / rows[2]["job"] / "error.txt").is_file()
    assert "ranked by val/acc" in proc.stdout and "optimizer.name=lamb optimizer.lr=0.1" in proc.stdout
