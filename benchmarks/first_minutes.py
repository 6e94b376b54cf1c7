"""The first five minutes, measured as a user meets them: how fast the CLI answers, how long the
default run's output is, what its pictures cost, and what a 20-trial sweep costs against one run.

Every command runs in a fresh process, as typed in a shell (W&B offline, as without credentials).

    python benchmarks/first_minutes.py [--data ../shared/datasets/hymenoptera_data] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_data_and_out, check_data_and_out

FINETUNE = [sys.executable, "-m", "finetune"]


def timed(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(
        FINETUNE + args,
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
        stdin=subprocess.DEVNULL,
    )
    return time.perf_counter() - started, proc


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} s ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_and_out(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    check_data_and_out(args)
    data = args.data.resolve()
    work = Path(tempfile.mkdtemp(prefix="first-minutes-"))
    cache = f"data.cache.dir={work / 'cache'}"

    for what in (["--help"], ["predictt"], ["predict", "--help"], ["optimizer.lrr=0.1"]):
        seconds = [timed(what, work)[0] for _ in range(args.repeats)]
        print(f"finetune {' '.join(what)}: {spread(seconds)}")

    default = ["+recipe=freeze_all_but_head", cache]
    timed(default + [f"hydra.run.dir={work / 'warm'}"], work)  # fills the feature cache
    with_pictures, without = [], []
    for i in range(args.repeats):
        seconds, proc = timed(default + [f"hydra.run.dir={work / f'viz{i}'}"], work)
        with_pictures.append(seconds)
        without.append(timed(default + ["viz=none", f"hydra.run.dir={work / f'noviz{i}'}"], work)[0])
    lines = proc.stdout.count("\n") + proc.stderr.count("\n")
    escapes = "\x1b[" in proc.stdout + proc.stderr
    print(f"default run, piped: {lines} lines, escape codes: {escapes}")
    cost = [(a - b) / b for a, b in zip(with_pictures, without)]
    print(
        f"default run: {spread(without)} with viz=none, {spread(with_pictures)} with pictures: "
        f"pictures cost {statistics.mean(cost):.0%} of the run (runs {', '.join(f'{c:.0%}' for c in cost)})"
    )

    folder = ["data=folder", f"data.root={data}", "+recipe=freeze_all_but_head"]
    one, _ = timed(folder + [f"data.cache.dir={work / 'cache1'}", f"hydra.run.dir={work / 'one'}"], work)
    sweep, proc = timed(
        [
            "-m",
            *folder,
            f"data.cache.dir={work / 'cache2'}",
            "optimizer.lr=0.001,0.003,0.01,0.03,0.1",
            "optimizer.weight_decay=0,1e-5,1e-4,1e-3",
            f"hydra.sweep.dir={work / 'sweep'}",
        ],
        work,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    print(
        f"hymenoptera head-only, empty feature caches: one run (pictures included) {one:.1f} s, "
        f"20-trial CLI sweep {sweep:.1f} s = {sweep / one:.2f}x one run"
    )


if __name__ == "__main__":
    main()
