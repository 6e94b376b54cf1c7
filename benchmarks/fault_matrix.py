"""Fault-injection matrix: the real CLI against hostile situations, on tiny generated data.

Usage: python benchmarks/fault_matrix.py [--keep] [--only CASE ...]

Each case starts ``python -m finetune`` in a subprocess (tiny ``test_resnet``, 32 px BMPs, CPU) and
injects one fault: SIGTERM, SIGINT, kill -9 then resume, two runs in one folder, a rerun over a
finished folder, an orphaned checkpoint .tmp, a read-only run folder or feature cache
(``chattr +i``), a full disk (1 MB tmpfs), a corrupted or stale feature-cache entry. It prints
``case | exit code | message | data intact | traceback`` and exits 1 when any row is not intact, did
not say what was expected, or shows a traceback. Cases the machine cannot set up (no chattr, no
mount) are printed as ``skipped (why)``. Techniques follow tests/test_hostile_*.py,
tests/train/test_trust.py and tests/train/test_checkpoints.py; nothing is imported from tests/.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ("ants", "bees", "wasps")
TINY = [
    "data=folder",
    "backbone.name=test_resnet",
    "backbone.weights=random",
    "data.image_size=32",
    "trainer.accelerator=cpu",
    "data.num_workers=0",
    "logger=none",
    "viz=none",
    "callbacks.progress_bar=false",
]
QUICK = [*TINY, "trainer.max_epochs=1"]
# Many short epochs: a signal always lands mid-run, after the first last.ckpt.
LONG = [*TINY, "trainer.max_epochs=200", "data.batch_size=8", "callbacks.checkpoint.min_write_interval_s=0"]
FROZEN = [*TINY, "+recipe=freeze_all_but_head", "data.batch_size=8", "trainer.max_epochs=2", "augment=none"]
TRACEBACK = "Traceback (most recent call last)"
WORK = Path("/nonexistent")  # the temporary folder, shown as $TMP in messages


@dataclass
class Row:
    case: str
    rc: str = "-"
    message: str = ""
    intact: bool | None = None  # None: skipped
    traceback: bool = False
    expected: bool = True  # the exit code and the message are the documented ones

    @property
    def ok(self) -> bool:
        return self.intact is None or (self.intact and self.expected and not self.traceback)


class Skip(Exception):
    """The machine cannot set this case up."""


def write_class_folders(root: Path, per_class: int, seed: int) -> None:
    """Equal-size BMPs whose dominant color channel is the class: learnable, and swappable."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            array = rng.integers(0, 90, size=(48, 48, 3), dtype=np.uint8)
            array[..., label % 3] += 150
            Image.fromarray(array).save(root / name / f"{name}_{i}.bmp")


def start(work: Path, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "FINETUNE_CACHE": str(work / "default-cache"),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", f"data.root={work / 'data'}", *args],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def finetune(work: Path, *args: str) -> subprocess.CompletedProcess:
    return finish(start(work, *args))


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"run ended (rc {proc.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{path.name} did not appear in {timeout:.0f} s")
        time.sleep(0.1)


def row(case: str, procs: list[subprocess.CompletedProcess], needle: str, codes: list[int], intact: bool) -> Row:
    """A row from the case's runs: exit codes, the line holding `needle`, the traceback check."""
    text = "\n".join(p.stderr + "\n" + p.stdout for p in procs).replace(str(WORK), "$TMP")
    lines = [line.strip() for line in text.splitlines() if needle in line]
    if not lines:  # the message that matters is then the last word of the last run
        lines = [line.strip() for line in procs[-1].stderr.replace(str(WORK), "$TMP").splitlines() if line.strip()][
            -1:
        ] or ["(no output)"]
    found = any(needle in p.stderr + p.stdout for p in procs)
    rcs = [p.returncode for p in procs]
    return Row(
        case,
        "/".join(map(str, rcs)),
        lines[0],
        intact,
        any(TRACEBACK in p.stderr for p in procs),
        expected=found and rcs == codes,
    )


def checkpoints_whole(run: Path, tmp_allowed: bool = False) -> bool:
    """Every checkpoint loads with weights_only=True and (unless allowed) no temporary file is left."""
    try:
        for path in run.rglob("*.ckpt"):
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure to load is "not intact"
        return False
    return tmp_allowed or not list(run.rglob("*.tmp"))


def snapshot(run: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(run)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def accuracies(run: Path) -> list[float]:
    return [epoch["val/acc"] for epoch in json.loads((run / "summary.json").read_text())["history"]]


def same_accuracy(a: Path, b: Path) -> bool:
    x, y = accuracies(a), accuracies(b)
    return len(x) == len(y) and all(abs(i - j) <= 1e-6 for i, j in zip(x, y))


@contextlib.contextmanager
def immutable(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        raise Skip("chattr +i not permitted")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "1m"):
    folder.mkdir(parents=True, exist_ok=True)
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        != 0
    ):
        raise Skip("mount -t tmpfs not permitted")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def signal_case(work: Path, signum: signal.Signals, code: int) -> Row:
    run = work / f"run-{signum.name}"
    proc = start(work, *LONG, f"hydra.run.dir={run.name}")
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signum)
    done = finish(proc)
    return row(
        signum.name,
        [done],
        f"stopped by {signum.name}",
        [code],
        checkpoints_whole(run) and not (run / "summary.json").exists(),
    )


def case_kill9_resume(work: Path) -> Row:
    run = work / "run-kill9"
    args = [a for a in LONG if not a.startswith("trainer.max_epochs")] + [f"hydra.run.dir={run.name}"]
    proc = start(work, *args, "trainer.max_epochs=200")
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.kill()
    killed = finish(proc)
    intact = checkpoints_whole(run, tmp_allowed=True)  # a kill mid-write may leave a .tmp: resume clears it
    epoch = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"]
    resumed = finetune(work, *args, f"trainer.max_epochs={epoch + 2}", "resume=true")
    intact = intact and checkpoints_whole(run) and (run / "summary.json").is_file()
    return row("kill -9 + resume", [killed, resumed], "val/acc=", [-signal.SIGKILL, 0], intact)


def case_two_runs(work: Path) -> Row:
    run = work / "run-busy"
    # Paced writes: no checkpoint on disk yet, so the second run meets the lock, not a used folder.
    first = start(work, *LONG, "callbacks.checkpoint.min_write_interval_s=600", f"hydra.run.dir={run.name}")
    wait_for(run / "finetune.log", first)
    config = snapshot(run / ".hydra") if (run / ".hydra").is_dir() else {}
    second = finetune(work, *QUICK, f"hydra.run.dir={run.name}")
    undisturbed = first.poll() is None and (not config or snapshot(run / ".hydra") == config)
    first.send_signal(signal.SIGTERM)
    finish(first)
    return row("two runs, one folder", [second], f"pid {first.pid}", [2], undisturbed and checkpoints_whole(run))


def case_rerun_finished(work: Path) -> Row:
    run = work / "run-finished"
    clean = finetune(work, *QUICK, f"hydra.run.dir={run.name}")
    before = snapshot(run)
    again = finetune(work, *QUICK, f"hydra.run.dir={run.name}")
    intact = clean.returncode == 0 and snapshot(run) == before
    return row("rerun over finished run", [again], "overwrite=true", [2], intact)


def case_orphan_tmp(work: Path) -> Row:
    run = work / "run-orphan"
    orphan = run / "checkpoints" / ".last.ckpt.abc123.tmp"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"PK half a zip")
    nothing = finetune(work, *QUICK, f"hydra.run.dir={run.name}", "resume=true")
    gone = not orphan.exists()
    fresh = finetune(work, *QUICK, f"hydra.run.dir={run.name}")
    intact = gone and checkpoints_whole(run) and (run / "summary.json").is_file()
    return row("orphaned .tmp + resume", [nothing, fresh], "nothing to resume", [2, 0], intact)


def case_readonly_run(work: Path) -> Row:
    locked = work / "locked"
    with immutable(locked):
        done = finetune(work, *QUICK, "hydra.run.dir=locked/run")
    result = row("read-only run folder", [done], "Cannot write", [2], not any(locked.iterdir()))
    result.expected = result.expected and "Unable to configure handler" not in done.stderr
    return result


def case_readonly_cache(work: Path) -> Row:
    cache = work / "cache-locked"
    with immutable(cache):
        done = finetune(work, *FROZEN, f"data.cache.dir={cache}", "hydra.run.dir=run-rocache")
    intact = done.returncode == 0 and same_accuracy(work / "run-rocache", reference(work))
    return row("read-only feature cache", [done], "feature cache: could not write", [0], intact)


def case_full_disk(work: Path) -> Row:
    disk = work / "disk"
    with small_disk(disk):
        done = finetune(work, *QUICK, "hydra.run.dir=disk/run")
        intact = checkpoints_whole(disk / "run")
    result = row("full disk (1 MB tmpfs)", [done], "the disk is full", [2], intact)
    result.expected = result.expected and "resume=true" in done.stderr
    return result


def reference(work: Path) -> Path:
    """The clean frozen-features run without any cache: what every cache case must report."""
    run = work / "run-reference"
    if not (run / "summary.json").is_file():
        finetune(work, *FROZEN, "data.cache.features=false", f"hydra.run.dir={run.name}").check_returncode()
    return run


def case_corrupt_cache(work: Path) -> Row:
    cache = work / "cache-corrupt"
    first = finetune(work, *FROZEN, f"data.cache.dir={cache}", "hydra.run.dir=run-corrupt-1")
    (path,) = (cache / "features").glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", raw[:8])
    start_, end = json.loads(raw[8 : 8 + header_size])["features.val"]["data_offsets"]
    for i in range(8 + header_size + start_ + 3, 8 + header_size + end, 16):  # high byte of every 4th float
        raw[i] ^= 0x7F
    path.write_bytes(bytes(raw))
    second = finetune(work, *FROZEN, f"data.cache.dir={cache}", "hydra.run.dir=run-corrupt-2")
    intact = (
        first.returncode == 0
        and "computed in" in second.stdout
        and same_accuracy(work / "run-corrupt-2", reference(work))
    )
    return row("corrupted cache entry", [second], "failed its check", [0], intact)


def case_stale_cache(work: Path) -> Row:
    """Last: it swaps images in the shared data folder (sizes equal, mtimes restored)."""
    cache = work / "cache-stale"
    finetune(work, *FROZEN, f"data.cache.dir={cache}", "hydra.run.dir=run-stale-0").check_returncode()
    ants, bees = (sorted((work / "data" / "val" / name).glob("*.bmp")) for name in ("ants", "bees"))
    for a, b in zip(ants, bees):
        stats = a.stat(), b.stat()
        data_a, data_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(data_b)
        b.write_bytes(data_a)
        for path, stat in zip((a, b), stats):
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cached = finetune(work, *FROZEN, f"data.cache.dir={cache}", "hydra.run.dir=run-stale-1")
    finetune(work, *FROZEN, "data.cache.features=false", "hydra.run.dir=run-stale-nocache").check_returncode()
    intact = "loaded in" not in cached.stdout and same_accuracy(work / "run-stale-1", work / "run-stale-nocache")
    return row("stale cache entry (swap)", [cached], "computed in", [0], intact)


CASES = {
    "sigterm": lambda work: signal_case(work, signal.SIGTERM, 143),
    "sigint": lambda work: signal_case(work, signal.SIGINT, 130),
    "kill9": case_kill9_resume,
    "two-runs": case_two_runs,
    "rerun": case_rerun_finished,
    "orphan-tmp": case_orphan_tmp,
    "readonly-run": case_readonly_run,
    "readonly-cache": case_readonly_cache,
    "full-disk": case_full_disk,
    "corrupt-cache": case_corrupt_cache,
    "stale-cache": case_stale_cache,
}  # stale-cache last: it alters the data


def run_case(name: str, work: Path) -> Row:
    began = time.monotonic()
    try:
        result = CASES[name](work)
    except Skip as why:
        result = Row(name, message=f"skipped ({why})")
    except Exception as error:  # noqa: BLE001 - one broken case is a failing row, not a crash of the matrix
        result = Row(name, message=f"harness error: {type(error).__name__}: {error}", intact=False)
    print(f"  {name}: {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
    return result


def print_table(rows: list[Row]) -> None:
    def cells(r: Row) -> list[str]:
        message = r.message if r.expected else f"UNEXPECTED: {r.message}"
        message = message if len(message) <= 90 else message[:87] + "..."
        intact = "-" if r.intact is None else ("yes" if r.intact else "no")
        return [r.case, r.rc, message, intact, "-" if r.intact is None else ("yes" if r.traceback else "no")]

    table = [["case", "exit code", "message (first line that matters)", "data intact", "traceback"]]
    table += [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(5)]
    for i, line in enumerate(table):
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if i == 0:
            print("-|-".join("-" * width for width in widths))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="run only these cases")
    args = parser.parse_args()
    global WORK
    work = WORK = Path(tempfile.mkdtemp(prefix="fault-matrix-"))
    began = time.monotonic()
    try:
        write_class_folders(work / "data" / "train", per_class=8, seed=0)
        write_class_folders(work / "data" / "val", per_class=4, seed=1)
        rows = [run_case(name, work) for name in CASES if not args.only or name in args.only]
    finally:
        if args.keep:
            print(f"kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    failed = [r.case for r in rows if not r.ok]
    print(
        f"\n{len(rows) - len(failed)}/{len(rows)} rows pass in {time.monotonic() - began:.0f} s"
        + (f"; failing: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
