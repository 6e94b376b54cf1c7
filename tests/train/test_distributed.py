"""trainer=ddp on 2 CPU processes (gloo): one output folder, rank-zero outputs, synced metrics,
gradual unfreezing under DDP, DDP trials of a sweep, and what fit() says about DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import QUICK, TINY

from finetune.config import compose_config

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def _finetune(args, cwd, **env):
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", **env},
        timeout=600,
    )


def test_ddp_run_writes_once_from_rank_zero_and_gates_gradual_unfreezing(tmp_path):
    # Digits, gradual unfreezing (one more group per epoch), 2 epochs; the checkpoint kept is the
    # last epoch's (unfrozen_groups grows), so its optimizer state shows which groups stepped.
    args = [
        *DDP,
        "+recipe=gradual_unfreeze",
        *TINY,
        "trainer.max_epochs=2",
        "data.num_workers=0",
        "viz=none",
        "callbacks.progress_bar=false",
        "callbacks.checkpoint.monitor=unfrozen_groups",
        "hydra.run.dir=run",
    ]
    proc = _finetune(args, tmp_path, WANDB_MODE="offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Lightning's lines go to the run's log, not the screen: really two ranks.
    assert "Starting with 2 processes" in (tmp_path / "run" / "finetune.log").read_text()
    assert proc.stdout.count("group    params") == 1 and proc.stdout.count("data: ") == 1  # tables once
    assert proc.stdout.count("\nval/acc=") == 1 and proc.stdout.count("   1/2 ") == 1  # one row per epoch, once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # one output folder, no stray run dir
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # written once
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # W&B from rank zero only

    summary = json.loads((run / "summary.json").read_text())
    assert [h["unfrozen_groups"] for h in summary["history"]] == [0.0, 1.0]
    # Every group is in the optimizer from the start, at lr x layer_decay^depth (head depth 0), in
    # both epochs (the step schedule decays at epoch 7): 0.01, 0.007, 0.0049, ...
    cfg = compose_config(["+recipe=gradual_unfreeze"])
    for depth, group in enumerate(["head", "stage4", "stage3", "stage2", "stage1", "stem"]):
        expected = cfg.optimizer.lr * cfg.optimizer.layer_decay**depth
        assert [h[f"lr/{group}"] for h in summary["history"]] == pytest.approx([expected] * 2, rel=1e-6), group
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    validated = [r for r in rows if r["val/acc"]]
    assert [r["epoch"] for r in rows] == ["1", "2"] and len(validated) == 2  # one synced row per epoch, rank zero
    # The reported metrics are the kept (last) epoch's, as rank zero logged them.
    for key in ("val/acc", "val/loss"):
        assert summary["metrics"][key] == pytest.approx(float(validated[-1][key]), rel=1e-6)
        assert [h[key] for h in summary["history"]] == pytest.approx([float(r[key]) for r in validated], rel=1e-6)
    # The W&B sweeps' metric is in the offline run's record file.
    assert b"best/val/acc" in next((run / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()

    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1
    optimizer = checkpoint["optimizer_states"][0]
    stepped = {
        g["name"].split("/")[0]: all(i in optimizer["state"] for i in g["params"]) for g in optimizer["param_groups"]
    }
    never = {
        g["name"].split("/")[0]: not any(i in optimizer["state"] for i in g["params"])
        for g in optimizer["param_groups"]
    }
    # head from epoch 1, stage4 from epoch 2; stem..stage3 still gated: no gradient ever reached SGD.
    assert stepped["head"] and stepped["stage4"]
    assert all(never[g] for g in ("stem", "stage1", "stage2", "stage3"))


@pytest.mark.slow  # 2 DDP processes
def test_ddp_trains_with_ema_mixup_and_augmentation_and_scores_tta_once(tmp_path):
    args = [
        *DDP,
        "+recipe=strong",
        *TINY,
        "trainer.max_epochs=2",
        "data.num_workers=0",
        "viz=none",
        "logger=none",
        "callbacks.progress_bar=false",
        "cutmix.alpha=1.0",
        "tta=flip",
        "hydra.run.dir=run",
    ]
    proc = _finetune(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("techniques:") == 1 and proc.stdout.count("test-time augmentation (flip") == 1
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # one EMA update per optimizer step, the ranks' steps being one synchronized step
    assert int(checkpoint["averaging_state"]["n_averaged"]) == checkpoint["global_step"] > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["tta_views"] == 2 and 0 <= summary["metrics"]["val/acc_tta"] <= 1
    finder = _finetune([*args[:-1], "optimizer.lr=auto", "hydra.run.dir=auto"], tmp_path)
    assert finder.returncode == 2 and "The lr finder runs in one process" in finder.stderr


@pytest.mark.slow  # 2 trials x 2 DDP processes: 30 s on 2 busy cores
def test_multirun_trials_each_run_ddp_and_a_failed_trial_does_not_end_the_sweep(image_folder, tmp_path):
    # An unknown scheduler fails inside fit (configure_optimizers), after the second rank has started;
    # the step trial must still run.
    args = [
        "-m",
        *DDP,
        "+recipe=freeze_all_but_head",
        "data=folder",
        f"data.root={image_folder}",
        *TINY,
        *QUICK,
        "scheduler.name=bogus,step",
        "hydra.sweep.dir=sweep",
    ]
    proc = _finetune(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [(tmp_path / "sweep" / job / "finetune.log").read_text() for job in ("0", "1")]
    assert all("Starting with 2 processes" in log for log in logs)  # each trial started its own second rank
    rows = {r["job"]: r for r in csv.DictReader((tmp_path / "sweep" / "summary.csv").open())}
    assert rows["0"]["status"] == "failed" and "choose step, cosine or none" in rows["0"]["error"]
    assert rows["1"]["status"] == "completed" and rows["1"]["rank"] == "1"
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [
        ".trials",
        "0",
        "1",
        "multirun.yaml",
        "summary.csv",
    ]
    assert (tmp_path / "sweep" / "1" / "checkpoints" / "best.ckpt").is_file()
    assert json.loads((tmp_path / "sweep" / "1" / "summary.json").read_text())["metrics"]["val/acc"] == pytest.approx(
        float(rows["1"]["val/acc"])
    )
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_fit_refuses_multi_process_strategies_with_what_to_do(image_folder, strategy):
    from finetune import fit
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="finetune trainer=ddp"):
        fit(
            "freeze_all_but_head",
            ["data=folder", f"data.root={image_folder}", *TINY, *QUICK, *DDP, f"trainer.strategy={strategy}"],
        )


@pytest.mark.slow  # 2 DDP processes
def test_ddp_multilabel_run_syncs_map_and_tunes_thresholds_once(tmp_path):
    from conftest import write_multilabel_manifest

    csv_path = write_multilabel_manifest(tmp_path / "data")
    args = [
        *DDP,
        *TINY,
        *QUICK,
        "task=multilabel",
        "data=csv",
        f"data.csv={csv_path}",
        "data.path_column=file",
        "data.label_column=labels",
        "data.label_sep=' '",
        "data.val_fraction=0.4",
        "hydra.run.dir=run",
    ]
    proc = _finetune(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\nval/map=") == 1 and proc.stdout.count("thresholds tuned for f1") == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # The epoch's val/map (synced over both ranks' halves) is the mAP of the whole split, scored again
    # on rank zero with the same weights when the thresholds were tuned.
    assert summary["metrics"]["val/map"] == pytest.approx(summary["multilabel"]["val"]["map"], abs=1e-4)
    meta = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["finetune"]
    assert meta["task"] == "multilabel" and list(meta["thresholds"]) == ["blue", "green", "red"]
