"""The run folder's lock within one process and across processes (a POSIX record lock: held by the
process that took it, never by the processes it forks). The CLI runs are in tests/test_hostile_runs.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from finetune.errors import ConfigError
from finetune.train.run_folder import RunFolder, busy_refusal

pytest.importorskip("fcntl")

PROBE = (
    "import sys; from pathlib import Path; from finetune.train.run_folder import busy_refusal; "
    "print(busy_refusal(Path(sys.argv[1])))"
)


def refusal_elsewhere(folder) -> str:
    """What another process is told about `folder`."""
    return subprocess.run(
        [sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


def test_a_second_run_in_the_same_process_is_refused_and_asking_keeps_the_lock(tmp_path):
    cfg = OmegaConf.create({})
    with RunFolder(cfg, tmp_path / "run"):
        # Record locks never conflict within a process: the folder remembers it is held here.
        assert f"pid {os.getpid()}" in busy_refusal(tmp_path / "run")
        with pytest.raises(ConfigError, match=f"Another finetune run \\(pid {os.getpid()}\\)"):
            RunFolder(cfg, tmp_path / "run").__enter__()
        # Neither question dropped the lock: another process is refused, naming this one.
        assert f"pid {os.getpid()}" in refusal_elsewhere(tmp_path / "run")
    assert busy_refusal(tmp_path / "run") is None and refusal_elsewhere(tmp_path / "run") == "None"
    with RunFolder(cfg, tmp_path / "run"):  # free again after the block
        pass


def test_a_forked_child_does_not_hold_the_lock_after_its_parent_ends(tmp_path):
    # A parent takes the lock, forks a child that sleeps (a DataLoader worker outliving a kill -9),
    # and exits at once: the folder is free while the child still lives.
    script = (
        "import os, sys, time; from pathlib import Path; from omegaconf import OmegaConf; "
        "from finetune.train.run_folder import RunFolder; "
        "folder = RunFolder(OmegaConf.create({}), Path(sys.argv[1])).__enter__(); "
        "pid = os.fork()\n"
        "if pid == 0: os.closerange(0, 3); time.sleep(30); os._exit(0)\n"
        "print(pid, flush=True); os._exit(0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True, timeout=120
    )
    child = int(out.stdout.strip())
    try:
        os.kill(child, 0)  # still alive
        assert busy_refusal(tmp_path / "run") is None
        with RunFolder(OmegaConf.create({}), tmp_path / "run"):
            pass
    finally:
        os.kill(child, 9)
