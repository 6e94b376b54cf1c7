"""Multi-node DDP under torchrun (two "nodes" on localhost, gloo on CPU) against one process, and
Lightning's SLURM auto-requeue simulated with SLURM variables and a recording ``scontrol``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_class_folders

TORCHRUN = Path(sys.executable).with_name("torchrun")
# test_vit: LayerNorm only (no BatchNorm), no dropout: every sample is computed alone.
MODEL = ["backbone.name=test_vit", "backbone.weights=random", "data.image_size=32"]
COMMON = [
    "+recipe=full_finetune",
    *MODEL,
    "data=folder",
    "augment=none",
    "head.dropout=0.0",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.max_epochs=2",
    "data.num_workers=0",
    "logger=none",
    "viz=none",
    "callbacks.progress_bar=false",
    "optimizer.lr=0.05",
]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "PET_"))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(key, None)
    return {**env, "WANDB_MODE": "disabled", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(run: Path) -> list[dict]:
    return json.loads((run / "summary.json").read_text())["history"]


@pytest.mark.slow  # 3 runs of a tiny ViT, two of them at once: about 60 s on 2 cores
def test_two_torchrun_nodes_train_as_one_process_with_the_same_global_batch(tmp_path):
    """2 nodes x 1 process x batch 4 against 1 process x batch 8, 2 epochs, full fine-tuning.

    Comparable step for step: finetune's sampler gives every epoch one order (a function of seed and
    epoch); Lightning wraps it in a DistributedSampler without shuffling, which deals it out
    round-robin, so global step k sees exactly the images of the single run's batch k (24 training
    images, 3 steps either way; 12 validation images, 6 per rank, no padding). DDP averages the two
    ranks' gradients of equal-sized halves: the gradient of the mean loss over the 8 images. The
    model has no BatchNorm (test_vit: LayerNorm normalizes each sample alone; a BatchNorm would see
    4 images per rank against 8, unless SyncBatchNorm, which gloo on CPU lacks) and no dropout, so
    the only difference is the order of floating-point sums: metrics agree to 1e-4.
    """
    write_class_folders(tmp_path / "data" / "train", per_class=8)
    write_class_folders(tmp_path / "data" / "val", per_class=4, seed=1)
    data = [f"data.root={tmp_path / 'data'}"]
    port = _free_port()
    nodes = []
    for node in (0, 1):
        torchrun = [
            str(TORCHRUN),
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "finetune",
        ]
        args = [*COMMON, *data, "trainer=ddp", "trainer.devices=1", "+trainer.num_nodes=2", "data.batch_size=4"]
        nodes.append(
            subprocess.Popen(
                [*torchrun, *args, f"hydra.run.dir={tmp_path / 'multi'}"],
                cwd=tmp_path,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    # Lightning's lines go to the run's log: one process group of two ranks.
    assert "Starting with 2 processes" in (tmp_path / "multi" / "finetune.log").read_text()
    assert outputs[0][0].count("\nval/acc=") == 1 and "val/acc=" not in outputs[1][0], outputs  # rank zero speaks

    single = subprocess.run(
        [sys.executable, "-m", "finetune", *COMMON, *data, "data.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    multi, one = _history(tmp_path / "multi"), _history(tmp_path / "one")
    assert len(multi) == len(one) == 2
    for a, b in zip(multi, one):
        for key in ("train/loss", "val/loss", "val/acc"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (key, a, b)


SCONTROL = """#!/bin/sh
# A stand-in for SLURM's scontrol: records its arguments, then ends the job as a requeue does (SIGTERM).
echo "$@" >> "$SCONTROL_LOG"
kill -TERM "$PPID"
"""


@pytest.mark.slow  # a run requeued by SIGUSR1, then the same command line again: about 60 s on 2 cores
def test_slurm_auto_requeue_saves_a_checkpoint_requeues_and_the_same_command_resumes(image_folder, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "finetune-ants",  # not bash/interactive: Lightning takes SLURM's variables
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    args = [
        "data=folder",
        f"data.root={image_folder}",
        "backbone.name=test_resnet",
        "backbone.weights=random",
        "data.image_size=32",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.max_epochs=6",
        "data.batch_size=8",
        "data.num_workers=0",
        "logger=none",
        "viz=none",
        "callbacks.progress_bar=false",
        "callbacks.checkpoint.min_write_interval_s=0",
        "hydra.run.dir=run",
    ]
    command = [sys.executable, "-m", "finetune", *args]
    first = subprocess.Popen(
        command, cwd=tmp_path, env=_env(**slurm), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # Signal once epoch 2's row is in the log: Lightning counts an epoch only after its last
    # callbacks (last.ckpt and the row "1/6" included), so a signal sent at either can save epoch 0.
    log_file = tmp_path / "run" / "finetune.log"
    deadline = time.monotonic() + 300
    while first.poll() is None and time.monotonic() < deadline:
        if log_file.exists() and " 2/6 " in log_file.read_text():
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR1)  # what SLURM sends at --signal=SIGUSR1@SECONDS
    out, err = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, err[-3000:]  # requeued: SLURM ended the job
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    hpc = tmp_path / "run" / "hpc_ckpt_1.ckpt"
    assert hpc.is_file()
    saved = torch.load(hpc, map_location="cpu", weights_only=True)
    assert not (tmp_path / "run" / "summary.json").exists()

    # The requeued job runs the same command line: it continues from hpc_ckpt_1.ckpt to the end.
    again = subprocess.run(command, cwd=tmp_path, env=_env(**slurm), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in (tmp_path / "run" / "finetune.log").read_text()  # Lightning restored it
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["history"]) == 6 and saved["epoch"] >= 1
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]  # no second requeue
