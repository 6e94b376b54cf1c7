"""The `finetune` command, as a user runs it: a subprocess in another working directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import QUICK, TINY


def finetune(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_cli_trains_reports_val_acc_and_every_output(image_folder, tmp_path):
    proc = finetune(
        "+recipe=freeze_all_but_head",
        "data=folder",
        f"data.root={image_folder}",
        *TINY,
        *QUICK,
        "logger=csv",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^val/acc=\d\.\d{4}$", out, re.MULTILINE), out[-2000:]
    for line in ("checkpoint:", "metrics_csv:", "summary:", "config:"):
        assert line in out
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()
    # The start table: layer groups with their state.
    assert re.search(r"^head\s+[\d,]+\s+trainable", out, re.MULTILINE)
    assert re.search(r"^stage4\s+[\d,]+\s+frozen\s+-\s+eval", out, re.MULTILINE)


def test_cli_relative_data_root_means_the_users_working_directory(image_folder, tmp_path):
    proc = finetune(
        "data=folder",
        f"data.root={os.path.relpath(image_folder, tmp_path)}",
        *TINY,
        *QUICK,
        "hydra.run.dir=out",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cli_config_mistakes_exit_with_a_short_message(tmp_path):
    proc = finetune("data=folder", f"data.root={tmp_path}/missing", *QUICK, "hydra.run.dir=x", cwd=tmp_path)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr

    proc = finetune("backbone.name=resnet5O", *QUICK, "hydra.run.dir=x", cwd=tmp_path)
    assert proc.returncode == 2 and "resnet50" in proc.stderr

    proc = finetune("optimizer.lrr=0.1", cwd=tmp_path)  # unknown key: the key it probably meant
    assert proc.returncode == 2 and "Did you mean optimizer.lr?" in proc.stderr and "Traceback" not in proc.stderr

    proc = finetune("data.batch_size=abc", *QUICK, "hydra.run.dir=x", cwd=tmp_path)  # wrong type
    assert proc.returncode == 2 and "data.batch_size='abc': it must be a positive integer" in proc.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()

    proc = finetune("+recipe=no_such_recipe", cwd=tmp_path)
    assert proc.returncode == 2 and "freeze_all_but_head" in proc.stderr


def test_diverging_run_stops_with_the_step_and_a_fix(image_folder, tmp_path):
    proc = finetune(
        "+recipe=full_finetune",
        "data=folder",
        f"data.root={image_folder}",
        *TINY,
        *QUICK,
        "optimizer.lr=1e30",
        "data.batch_size=8",
        "trainer.max_epochs=3",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "became nan" in proc.stderr or "became inf" in proc.stderr
    assert "optimizer.lr" in proc.stderr and "Traceback" not in proc.stderr


def test_a_command_line_run_composes_its_config_once_before_hydra(monkeypatch, tmp_path):
    """finetune's own code composes a run's config once (the pre-flight, whose errors name the
    fix); the run gets the config Hydra's CLI composed. Hydra composes twice by itself under
    ``hydra.main`` (``Hydra.get_mode`` reads ``hydra.mode`` from one, ``Hydra.run`` composes the
    job's), and a composition error there is printed and exits 1 before any hook of finetune's
    runs: that is why the pre-flight composes apart (see finetune/commands/train.py)."""
    from types import SimpleNamespace

    from hydra._internal.hydra import Hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    import finetune.train.run
    from finetune import cli
    from finetune.commands import preflight

    hydra_composes, preflight_composes, runs = [], [], []
    compose, compose_config = Hydra.compose_config, preflight.compose_config
    monkeypatch.setattr(
        Hydra, "compose_config", lambda self, *a, **k: hydra_composes.append(1) or compose(self, *a, **k)
    )
    monkeypatch.setattr(preflight, "compose_config", lambda o: preflight_composes.append(o) or compose_config(o))
    result = SimpleNamespace(metrics={"val/acc": 1.0}, objective="val/acc")
    monkeypatch.setattr(finetune.train.run, "run", lambda cfg: runs.append(cfg) or result)
    argv = [
        "optimizer.lr=0.5",
        f"hydra.run.dir={tmp_path / 'run'}",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
    ]
    monkeypatch.setattr(sys, "argv", ["finetune", *argv])
    try:
        cli.main()
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    assert len(runs) == 1 and runs[0].optimizer.lr == 0.5
    assert len(preflight_composes) == 1  # finetune's one composition of the run
    assert len(hydra_composes) == 1 + 2  # with Hydra's own two (hydra.main)
