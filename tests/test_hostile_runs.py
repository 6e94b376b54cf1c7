"""Runs in a hostile world: preemption (SIGTERM), Ctrl-C, two runs in one folder, a rerun over a
finished run, and kills in the middle of a checkpoint write. The real CLI in subprocesses, on the
tiny ``test_resnet`` and generated images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, TINY

from finetune.train import checkpoints
from finetune.train.checkpoints import LAST
from finetune.train.run_folder import busy_refusal

# Many short epochs: a signal always lands mid-run, after the first last.ckpt.
LONG = [
    "data=folder",
    *TINY,
    *QUICK,
    "trainer.max_epochs=200",
    "data.batch_size=8",
    "callbacks.checkpoint.min_write_interval_s=0",
]


def start(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finetune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = start(*args, cwd=cwd)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {path} appeared: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.1)


@pytest.mark.slow  # trains until a checkpoint exists, is stopped, then resumes: about 30 s each on 2 cores
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_run_exits_nonzero_and_says_how_to_continue(image_folder, tmp_path, signum, code):
    args = [f"data.root={image_folder}", *LONG, "hydra.run.dir=run"]
    proc = start(*args, cwd=tmp_path)
    last = tmp_path / "run" / "checkpoints" / LAST
    wait_for(last, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name} at epoch " in err, err[-3000:]
    assert "continue with: finetune " in err and "hydra.run.dir=" in err and err.rstrip().endswith("resume=true")
    assert "Traceback" not in err and "Traceback" not in out
    assert not (tmp_path / "run" / "summary.json").exists()
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)
    assert stopped_at["epoch"] >= 0

    if signum == signal.SIGTERM:  # the printed command continues the run to its end
        resumed = finetune(
            *[a for a in args if not a.startswith("trainer.max_epochs")],
            f"trainer.max_epochs={stopped_at['epoch'] + 2}",
            "resume=true",
            cwd=tmp_path,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.slow  # two CLI runs at once on 2 cores
def test_a_second_run_into_a_busy_folder_names_the_first(image_folder, tmp_path):
    first = start(f"data.root={image_folder}", *LONG, "hydra.run.dir=run", cwd=tmp_path)
    wait_for(tmp_path / "run" / "finetune.log", first)
    second = finetune(f"data.root={image_folder}", *TINY, *QUICK, "data=folder", "hydra.run.dir=run", cwd=tmp_path)
    first.kill()
    first.communicate()
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr


def children(pid: int) -> list[int]:
    """The pids of `pid`'s live child processes (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow  # a run with DataLoader workers killed mid-training, then resumed: about 40 s on 2 cores
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from Linux /proc")
def test_a_killed_runs_surviving_workers_do_not_block_its_resume(image_folder, tmp_path):
    # Forked DataLoader workers outlive a kill -9 of their run by up to 5 s (they poll their parent).
    # They must not hold the folder's lock: resume=true started at once continues the run.
    args = [
        f"data.root={image_folder}",
        *LONG,
        "data.num_workers=2",
        "data.cache.decoded=false",  # workers decode files, and stay busy
        "hydra.run.dir=run",
    ]
    proc = start(*args, cwd=tmp_path)
    last = tmp_path / "run" / "checkpoints" / LAST
    wait_for(last, proc)
    workers = children(proc.pid)
    proc.kill()
    proc.wait(timeout=60)  # not communicate(): the workers hold the pipes open until they end
    assert proc.returncode == -signal.SIGKILL
    # While the orphaned workers live, the folder is free (a resume's own start-up takes longer than
    # they live on this machine, so ask the lock directly too).
    refusal = busy_refusal(tmp_path / "run")
    assert any(alive(pid) for pid in workers), "no DataLoader worker outlived the kill: the test shows nothing"
    assert refusal is None, refusal
    epoch = torch.load(last, map_location="cpu", weights_only=True)["epoch"]

    resumed = finetune(
        *[a for a in args if not a.startswith("trainer.max_epochs")],
        f"trainer.max_epochs={epoch + 2}",
        "resume=true",
        cwd=tmp_path,
    )
    proc.communicate(timeout=60)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Another finetune run" not in resumed.stderr
    assert (tmp_path / "run" / "summary.json").is_file()


def test_a_finished_folder_is_refused_unless_resumed_or_overwritten(image_folder, tmp_path):
    args = ["data=folder", f"data.root={image_folder}", *TINY, *QUICK, "hydra.run.dir=run"]
    assert finetune(*args, cwd=tmp_path).returncode == 0
    run = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in [run / "summary.json", run / "checkpoints" / LAST]}

    again = finetune(*args, cwd=tmp_path)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "resume=true" in again.stderr and "overwrite=true" in again.stderr and "Traceback" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing replaced

    replaced = finetune(*args, "overwrite=true", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", LAST]  # no best-v1.ckpt


def test_orphaned_temporary_checkpoints_are_removed_and_an_empty_resume_names_its_folder(image_folder, tmp_path):
    # A kill during the very first write: a temporary file, no last.ckpt; an unrelated unfinished run nearby.
    run = tmp_path / "outputs" / "day" / "run"
    orphan = run / "checkpoints" / f".{LAST}.abc123.tmp"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"PK half a zip")
    other = tmp_path / "outputs" / "day" / "other" / "checkpoints" / LAST
    other.parent.mkdir(parents=True)
    other.write_bytes(b"x")
    args = ["data=folder", f"data.root={image_folder}", *TINY, *QUICK, f"hydra.run.dir={run}"]

    nothing = finetune(*args, "resume=true", cwd=tmp_path)
    assert nothing.returncode == 2, nothing.stderr[-3000:]
    assert "nothing to resume in that folder" in nothing.stderr and "other" not in nothing.stderr
    assert not orphan.exists()

    assert finetune(*args, cwd=tmp_path).returncode == 0  # the folder holds no run: a fresh start is fine


def test_last_is_written_before_best_at_every_epoch_end(image_folder, tmp_path, monkeypatch):
    from finetune import fit

    writes = []
    save = checkpoints.atomic_save

    def recorded(obj, path):
        writes.append((Path(path).name, obj["epoch"]))
        save(obj, path)

    monkeypatch.setattr(checkpoints, "atomic_save", recorded)
    fit(
        overrides=[
            "data=folder",
            f"data.root={image_folder}",
            *TINY,
            *QUICK,
            "trainer.max_epochs=2",
            "callbacks.checkpoint.min_write_interval_s=0",
            f"hydra.run.dir={tmp_path}/run",
        ]
    )
    assert writes[:2] == [(LAST, 0), ("best.ckpt", 0)], writes
    for i, (name, epoch) in enumerate(writes):
        if name == "best.ckpt":
            assert (LAST, epoch) in writes[:i]
