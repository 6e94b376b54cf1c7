"""What the first process on a set of image files pays per file before its first step: the
header probe and the content digest that the scan and the data check compute for every file
(`finetune.data.images.probe`, `finetune.data.file_memo.file_digest`), nothing remembered.

    python benchmarks/first_read.py ROOT [--threads 0 8] [--cold]

ROOT: a folder of image files (e.g. ``benchmarks/scale_cost.py``'s ``/tmp/cost-data/root-100000``).
Each measurement runs in a fresh process with no file memo. ``--threads 0`` is the run's own
serial loop; N > 0 spreads the same calls over N threads. ``--cold`` also measures each with the
page cache dropped first (``echo 3 > /proc/sys/vm/drop_caches``: root only), as for files that
were not read since the machine started. Also counted: the files whose byte size no file of
another split or class shares, the only ones a size-first duplicate check could surely leave
unread. Prints one line per measurement and writes nothing.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path


def files_of(root: Path) -> list[Path]:
    """The image files under `root`, by the suffixes a folder source takes."""
    from finetune.data.images import IMAGE_EXTENSIONS

    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def one_pass(root: Path, threads: int) -> None:
    """In this process: probe and digest every file of `root`, and print the seconds."""
    from concurrent.futures import ThreadPoolExecutor

    from finetune.data.file_memo import file_digest
    from finetune.data.images import probe

    paths = files_of(root)
    started = time.perf_counter()

    def both(path: Path):
        return probe(path), file_digest(path)

    if threads:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(both, paths, chunksize=64))
    else:
        for path in paths:
            both(path)
    seconds = time.perf_counter() - started
    print(f"{len(paths)} files, {seconds:.2f} s, {seconds / len(paths) * 1e3:.3f} ms a file", flush=True)


def size_collisions(root: Path) -> str:
    """How many files (ROOT/SPLIT/CLASS/FILE) share their byte size with a file of another split
    or another class: the candidates a size-first duplicate check would have to consider (an upper
    bound on what it hashes: the data check compares val/test with train, and train across classes)."""
    by_size = collections.defaultdict(set)
    sizes = {}
    for path in files_of(root):
        key = (path.parent.parent.name, path.parent.name)  # (split, class)
        sizes[path] = path.stat().st_size
        by_size[sizes[path]].add(key)
    shared = sum(1 for path, size in sizes.items() if len(by_size[size]) > 1)
    return f"{shared} of {len(sizes)} files share their size with a file of another split or class"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 8])
    parser.add_argument("--cold", action="store_true", help="also with the page cache dropped (root only)")
    parser.add_argument("--one-pass", type=int, metavar="THREADS", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one_pass is not None:
        one_pass(args.root, args.one_pass)
        return
    print(size_collisions(args.root), flush=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's finetune
    child = [sys.executable, __file__, str(args.root), "--one-pass"]
    for threads in args.threads:
        for cold in (False, True) if args.cold else (False,):
            if cold:
                if subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"]).returncode:
                    sys.exit("--cold drops the page cache: it needs root (run without --cold for the warm figures)")
            else:  # warm: read once, untimed, so that every file is in the page cache
                subprocess.run([*child, "0"], capture_output=True, check=True, env=env)
            print(f"threads {threads}, page cache {'dropped' if cold else 'warm'}: ", end="", flush=True)
            subprocess.run([*child, str(threads)], check=True, env=env)


if __name__ == "__main__":
    main()
