"""W&B never prompts or blocks: no credentials means offline, decided in well under a second."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import QUICK_WITH_PICTURES, TINY

from finetune.train.checkpoints import LAST, RUN_KEY
from finetune.train.loggers import build_loggers, wandb_mode


def test_no_credentials_means_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    start = time.perf_counter()
    assert wandb_mode("auto") == "offline"
    assert time.perf_counter() - start < 1.0
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"


@pytest.mark.slow  # a CLI run with pictures; fast: the offline decision and run-id tests in this file
def test_default_wandb_logger_runs_offline_without_credentials(image_folder, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "none"))
    args = [
        "data=folder",
        f"data.root={image_folder}",
        *TINY,
        *QUICK_WITH_PICTURES,
        "logger=wandb",
        "hydra.run.dir=run",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs
    assert list(runs[0].rglob("media/images/viz/*.png"))  # the pictures went to W&B too
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()
    # The W&B run id is stored in the checkpoints: a resumed run continues this W&B run.
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / LAST, map_location="cpu", weights_only=True)
    assert runs[0].name.endswith("-" + checkpoint[RUN_KEY]["wandb_id"])


def test_a_resumed_run_reuses_its_wandb_run_id(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    (logger,) = build_loggers({"csv": False, "wandb": {"mode": "auto"}}, tmp_path, {}, run_id="a1b2c3d4")
    assert logger._wandb_init["id"] == "a1b2c3d4" and logger._wandb_init["resume"] == "allow"
    assert logger._offline
