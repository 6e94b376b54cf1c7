"""Disks that say no: a read-only run folder, a read-only feature cache (and file memo), a full disk. Each ends in
one sentence (exit 2) or, for the cache, a warning and a finished run; never a traceback.

Read-only means immutable (``chattr +i``) and full means a 1 MB tmpfs: tests run as root, and root
writes through permission bits. Where the machine allows neither, the test skips and says why."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK, TINY

# The fault injectors (an immutable folder, a 1 MB tmpfs) are the fault matrix's own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fault_matrix  # noqa: E402

RUN = ["data=folder", *TINY, *QUICK]


def finetune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
        timeout=600,
    )


@contextlib.contextmanager
def immutable(folder: Path):
    with _skipped_unless_permitted(), fault_matrix.immutable(folder) as locked:
        yield locked


@contextlib.contextmanager
def small_disk(folder: Path):
    with _skipped_unless_permitted(), fault_matrix.small_disk(folder) as disk:
        yield disk


@contextlib.contextmanager
def _skipped_unless_permitted():
    try:
        yield
    except fault_matrix.Skip as why:
        pytest.skip(f"{why}: no such disk to test with here")


def test_a_read_only_run_folder_is_one_sentence(image_folder, tmp_path):
    with immutable(tmp_path / "locked"):
        proc = finetune(*RUN, f"data.root={image_folder}", "hydra.run.dir=locked/run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Cannot write the run's outputs" in proc.stderr and "hydra.run.dir" in proc.stderr
    assert "Traceback" not in proc.stderr and "Unable to configure handler" not in proc.stderr


def test_a_read_only_feature_cache_is_only_a_warning(image_folder, tmp_path):
    with immutable(tmp_path / "cache"):
        proc = finetune(
            *RUN,
            f"data.root={image_folder}",
            "+recipe=freeze_all_but_head",
            f"data.cache.dir={tmp_path / 'cache'}",
            "hydra.run.dir=run",
            cwd=tmp_path,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "feature cache: could not write" in proc.stdout and "going on with the features in memory" in proc.stdout
    # The per-file memo kept beside it (files.sqlite) is said once too, and only costs its speed-up.
    assert proc.stdout.count("file memo:") == 1 and "files are read again in every process" in proc.stdout
    assert (tmp_path / "run" / "summary.json").is_file()


def test_a_full_disk_while_writing_checkpoints_is_one_sentence_and_keeps_what_was_written(image_folder, tmp_path):
    with small_disk(tmp_path / "disk"):
        proc = finetune(*RUN, f"data.root={image_folder}", "hydra.run.dir=disk/run", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "the disk is full" in proc.stderr and "resume=true" in proc.stderr
        assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr
        leftovers = list((tmp_path / "disk" / "run" / "checkpoints").glob("*.tmp"))
        assert leftovers == []  # atomic writes: no half-written file stays
