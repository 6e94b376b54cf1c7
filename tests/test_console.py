"""The first five minutes: what a run prints, help for every command, typos answered, fast answers."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import QUICK_WITH_PICTURES, TINY
from PIL import Image

from finetune.commands import COMMANDS
from finetune.commands.preflight import check_overrides
from finetune.errors import ConfigError

# Lines of library chatter that a run must keep off the screen (they go to finetune.log).
NOISE = re.compile(
    r"^(wandb:|GPU available|TPU available|Using bfloat16|.*Warning:|.*warnings\.warn|"
    r"\[.*\]\[.*\]\[(INFO|WARNING)\]|.*You have overridden|.*The number of training batches)"
)


def finetune(*args: str, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_a_piped_run_prints_one_row_per_epoch_and_no_library_chatter(image_folder, tmp_path):
    proc = finetune(
        "data=folder",
        f"data.root={image_folder}",
        *TINY,
        *QUICK_WITH_PICTURES,
        "trainer.max_epochs=3",
        "logger=wandb",
        "hydra.run.dir=run",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line for line in lines if NOISE.match(line)] == []
    assert [line for line in proc.stderr.splitlines() if NOISE.match(line)] == []
    assert "\x1b[" not in proc.stdout + proc.stderr  # no escape codes when piped
    rows = [line for line in lines if re.match(r"^\s+\d+/3\s", line)]
    assert [row.split()[0] for row in rows] == ["1/3", "2/3", "3/3"]
    assert lines[-1].startswith("val/acc=")
    # The whole console report, and the libraries' lines, are kept in the run's log file.
    log = (tmp_path / "run" / "finetune.log").read_text()
    assert all(row in log for row in rows) and "val/acc=" in log
    assert "GPU available" in log


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_without_loading_torch(name, tmp_path):
    for args in ([name, "--help"], ["help", name]):
        proc = finetune(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"finetune {name}" in proc.stdout and "``" not in proc.stdout
    code = (
        f"import sys; sys.argv = ['finetune', {name!r}, '--help']\nfrom finetune.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, 'lightning' in sys.modules)"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip().splitlines()[-1] == "False False"


def test_unknown_commands_get_a_suggestion_and_the_list(tmp_path):
    proc = finetune("predictt", "ckpt=x", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown command 'predictt'" in proc.stderr and "finetune predict`?" in proc.stderr
    assert "check-data" in proc.stderr and "probe" in proc.stderr


def test_list_recipes_and_groups_name_every_option(tmp_path):
    recipes = finetune("list", "recipes", cwd=tmp_path).stdout
    assert {"lenet_from_scratch", "freeze_all_but_head", "lp_ft"} <= {
        line.split()[0] for line in recipes.splitlines() if line
    }
    groups = finetune("list", "groups", cwd=tmp_path).stdout
    assert re.search(r"^backbone\s+.*lite0.*resnet50", groups, re.MULTILINE)
    assert "_common" not in groups
    proc = finetune("list", "nothing", cwd=tmp_path)
    assert proc.returncode == 2 and "recipes, backbones, groups" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["optimizer.lrr=0.1"], "Did you mean optimizer.lr?"),
        (["-m", "optimizer.lr=0.1,0.2", "head.dropot=0,0.1"], "Did you mean head.dropout?"),
        (["-m", "optimizer.lrr=range(1,3)"], "Did you mean optimizer.lr?"),
        (["backbone=resnet51"], "Did you mean backbone=resnet50?"),
        (["+recipe=freeze_all_but_hed"], "Did you mean +recipe=freeze_all_but_head?"),
    ],
)
def test_typos_are_answered_with_the_key_meant(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_overrides(args)


def test_a_typo_under_multirun_exits_2_before_the_sweep_starts(tmp_path):
    proc = finetune("-m", "optimizer.lrr=0.1,0.2", cwd=tmp_path)
    assert proc.returncode == 2 and "Did you mean optimizer.lr?" in proc.stderr
    assert not (tmp_path / "multirun").exists()


def test_a_missing_extra_names_its_pip_install(monkeypatch):
    from finetune.commands import preflight

    monkeypatch.setattr(preflight, "_installed", lambda module: False)
    with pytest.raises(ConfigError, match=re.escape("pip install 'finetune[sweep]'")):
        check_overrides(["-m", "+hparams_search=optuna"])
    with pytest.raises(ConfigError, match=re.escape("pip install 'finetune[slurm]'")):
        check_overrides(["-m", "hydra/launcher=slurm"])


def test_valid_sweeps_and_flags_pass_the_check():
    check_overrides(["-m", "+recipe=freeze_all_but_head", "optimizer.lr=0.003,0.01", "head.dropout=0,0.2"])
    check_overrides(["--cfg", "job", "optimizer.lr=0.1"])
    check_overrides(["--help"])


def test_predict_takes_one_pil_image(tmp_path, image_folder):
    from finetune import fit, load

    result = fit(
        overrides=[
            "data=folder",
            f"data.root={image_folder}",
            *TINY,
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            "data.num_workers=0",
            "logger=none",
            "viz=none",
            "callbacks.progress_bar=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    model = load(result.best_checkpoint)
    path = next((image_folder / "val" / "bees").glob("*.jpg"))
    with Image.open(path) as image:
        (one,) = model.predict(image)
    (from_path,) = model.predict(str(path))
    assert one.label == from_path.label and one.probability == pytest.approx(from_path.probability, abs=1e-6)
    assert len(model.predict(np.asarray(Image.open(path).convert("RGB")))) == 1


def test_checkpoints_exports_and_caches_follow_the_umask(tmp_path):
    """mkstemp and safetensors create 0600 files; under umask 022 colleagues must read them."""
    import torch

    from finetune.files import follow_umask
    from finetune.train.checkpoints import atomic_save

    old = os.umask(0o022)
    try:
        atomic_save({"w": torch.ones(2)}, tmp_path / "a.ckpt")
        assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o644
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, str(tmp_path / "m.safetensors"))
        assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o600  # what follow_umask is for
        follow_umask(tmp_path / "m.safetensors")
        assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_save({"w": torch.ones(2)}, tmp_path / "private.ckpt")
        assert (tmp_path / "private.ckpt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_epochs_count_from_1_everywhere_and_the_csv_has_one_row_each(image_folder, tmp_path):
    import csv
    import json

    from finetune import fit

    result = fit(
        overrides=[
            "data=folder",
            f"data.root={image_folder}",
            *TINY,
            "trainer.max_epochs=3",
            "trainer.accelerator=cpu",
            "data.num_workers=0",
            "logger=csv",
            "viz=none",
            "callbacks.progress_bar=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert all(r["train/loss"] and r["val/acc"] and r["lr/head"] for r in rows)  # one row holds the epoch
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3] == [h["epoch"] for h in result.history]
    best = max(result.history, key=lambda h: (h["val/acc"], -h["epoch"]))
    assert result.metrics["epoch"] == summary["metrics"]["epoch"] == best["epoch"]
    assert float(rows[best["epoch"] - 1]["val/acc"]) == pytest.approx(best["val/acc"], rel=1e-6)
    log = (tmp_path / "run" / "finetune.log").read_text()
    assert f"best epoch {best['epoch']} of 3: val/acc={best['val/acc']:.4f}" in log
