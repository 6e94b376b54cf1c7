"""Cost growth with the data set's size: seconds per image and peak memory of the real CLI at 2k,
20k and 100k generated JPEGs, for every file source (folder, CSV, hf, streamed shards).

    python benchmarks/scale_cost.py                                  # 2k and 20k, every source and command
    python benchmarks/scale_cost.py --sizes 100000 --sources folder stream --commands head check
    python benchmarks/scale_cost.py --table                          # only print the table of what is stored

Data (``--work``, default /tmp/cost-data; ``--keep`` keeps it): JPEGs drawn from (seed, index) alone
(a smooth colour field, 3-7 ellipses and rectangles in the class's hue, Gaussian grain; 300-500 px a
side, quality 90, about 40 KB), 10 classes, 80/20 train/val. Image i is the same file at every size
(one pool, hard-linked into a root per size), and from each root come the four sources:

- ``folder``: ROOT/train/<class>/*.jpg, ROOT/val/<class>/*.jpg.
- ``csv``: ROOT/labels.csv with path,label,split (``data.split_column=split``), paths relative to it.
- ``hf``: a ``save_to_disk`` DatasetDict (train, validation) built with ``datasets`` from the files,
  the JPEG bytes embedded (``Image()``, ``ClassLabel``): what a user who downloaded or built a
  large dataset keeps on disk, read memory-mapped, nothing copied into a cache.
- ``stream``: ``finetune shard data=folder data.root=ROOT out=SHARDS`` (local LitData shards).

Commands, each a fresh ``python -m finetune`` process (``logger=none viz=none``, ``--image-size``
px input, ``--workers`` DataLoader workers, precision and layout as the CLI resolves them):

- ``check``: ``finetune check-data`` (every header probed, every file hashed and fully decoded).
- ``head``: ``+recipe=freeze_all_but_head trainer.max_epochs=1`` with an empty ``data.cache.dir``
  (a cold run: every image through the backbone, then the head), ``data.cache.views=--views``
  (default 1, one pass per image: the config's 2 passes training images twice, a cost per image
  all the same, which did not fit the 2-core host's time).
- ``full``: ``+recipe=full_finetune trainer.max_epochs=1`` capped at ``--full-batches`` training
  and ``--full-val-batches`` validation batches; per image there means per image *processed*.
- ``full_again``: the same capped run again, in the ``data.cache.dir`` the ``full`` before it
  left: a later process on the same files, whose digests and headers the file memo
  (``files.sqlite``) remembers. Every other command starts from an empty ``data.cache.dir``.

Measured per process: wall seconds, peak RSS (``/usr/bin/time -v``'s "Maximum resident set size": the
largest single process, the finetune process or a DataLoader worker), the peak of the process tree's
summed RSS (sampled every 0.1 s; pages shared by forked workers counted once per process),
and the arrival time of every output line (``--work``/logs/*.log), which shows where time goes.
Results merge into ``--out``/scale_cost.json (one row per size, source and command); the table gives
each row's ratio to the 2k row of the same source and command.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from common import RESULTS

CLASSES = [f"class{i}" for i in range(10)]
SOURCES = ("folder", "csv", "hf", "stream")
COMMANDS = ("check", "head", "full", "full_again")
SEED = 0


# ---------------------------------------------------------------- data


def split_of(index: int) -> str:
    """80/20, balanced per class: of every 10 consecutive indices (one per class) the 5th block is val."""
    return "val" if (index // len(CLASSES)) % 5 == 4 else "train"


def relative_path(index: int) -> str:
    return f"{split_of(index)}/{CLASSES[index % len(CLASSES)]}/{index:06d}.jpg"


def jpeg(index: int) -> bytes:
    """Image `index`: a function of (SEED, index) alone."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([SEED, index])
    label = index % len(CLASSES)
    w, h = (int(v) for v in rng.integers(300, 501, size=2))
    image = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    hue = np.array([(label * 25) % 256, (label * 70) % 256, (label * 140) % 256])
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        color = tuple(int(c) for c in np.clip(hue + rng.integers(-40, 41, 3), 0, 255))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    grain = rng.normal(0, 6, size=(h, w, 3)).astype(np.int16)
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _write(args: tuple[Path, int]) -> int:
    pool, index = args
    path = pool / relative_path(index)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = jpeg(index)
        path.with_suffix(".tmp").write_bytes(data)
        path.with_suffix(".tmp").rename(path)
    return path.stat().st_size


def make_root(work: Path, size: int) -> tuple[Path, dict]:
    """work/root-SIZE: hard links to images 0..size-1 of work/pool, and labels.csv beside them."""
    pool, root = work / "pool", work / f"root-{size}"
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as workers:
        sizes = workers.map(_write, [(pool, i) for i in range(size)], chunksize=64)
    generated = time.perf_counter() - started
    if not (root / "labels.csv").is_file():
        for index in range(size):
            link = root / relative_path(index)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.link(pool / relative_path(index), link)
        lines = ["path,label,split"] + [
            f"{relative_path(i)},{CLASSES[i % len(CLASSES)]},{split_of(i)}" for i in range(size)
        ]
        (root / "labels.tmp").write_text("\n".join(lines) + "\n")
        (root / "labels.tmp").rename(root / "labels.csv")
    return root, {"generate_s": round(generated, 1), "mean_kb": round(float(np.mean(sizes)) / 1e3, 1)}


def make_hf(work: Path, root: Path, size: int) -> Path:
    """work/hf-SIZE: a save_to_disk DatasetDict (train, validation), JPEG bytes embedded."""
    out = work / f"hf-{size}"
    if (out / "dataset_dict.json").is_file():
        return out
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})

    def rows(split: str):
        for index in range(size):
            if split_of(index) == split:
                path = root / relative_path(index)
                yield {"image": {"bytes": path.read_bytes(), "path": path.name}, "label": index % len(CLASSES)}

    built = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_generator(
                rows, gen_kwargs={"split": split}, features=features, cache_dir=str(work / "hf-build")
            )
            for name, split in (("train", "train"), ("validation", "val"))
        }
    )
    built.save_to_disk(str(out.with_suffix(".tmp")))
    shutil.rmtree(work / "hf-build", ignore_errors=True)
    out.with_suffix(".tmp").rename(out)
    return out


def make_shards(work: Path, root: Path, size: int) -> tuple[Path, float]:
    out = work / f"shards-{size}"
    if (out / "finetune.json").is_file():
        return out, 0.0
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "shard", "data=folder", f"data.root={root}", f"out={out}", "overwrite=true"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        sys.exit(f"finetune shard failed:\n{done.stdout}\n{done.stderr}")
    return out, time.perf_counter() - started


# ---------------------------------------------------------------- runs


def data_overrides(source: str, root: Path, hf: Path | None, shards: Path | None) -> list[str]:
    return {
        "folder": lambda: ["data=folder", f"data.root={root}"],
        "csv": lambda: ["data=csv", f"data.csv={root / 'labels.csv'}", "data.split_column=split"],
        "hf": lambda: ["data=hf", f"data.path={hf}"],
        "stream": lambda: ["data=stream", f"data.uri={shards}"],
    }[source]()


def measured(command: list[str], log: Path) -> dict:
    """Run `command` under ``/usr/bin/time -v``: wall seconds, its "Maximum resident set size" (MB),
    the sampled peak of the finetune process alone, of its anonymous memory alone (RSS less its
    file-backed and shared pages: what mapped Arrow files or chunk files do not count in), and of its
    process tree summed (MB), line times.

    Not ``os.wait4`` on a child of this script: Linux records the RSS of the forked copy of this
    process at ``exec`` in the child's ``ru_maxrss``, so a child of a large parent (this one holds
    torch and ``datasets``) reports at least the parent's size. ``time`` is small."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(
        ["/usr/bin/time", "-v", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"},
    )
    peak_main, peak_anon, peak_tree, stop = [0], [0], [0], threading.Event()

    def sample() -> None:
        timer = psutil.Process(process.pid)
        while not stop.wait(0.1):
            try:
                tree = timer.children(recursive=True)
            except psutil.Error:
                continue
            rss, anon = [], []
            for p in tree:
                try:
                    info = p.memory_info()
                except psutil.Error:
                    info = None
                rss.append(info.rss if info else 0)
                anon.append(info.rss - info.shared if info else 0)  # Linux: shared = RssFile + RssShmem
            if rss:
                peak_main[0] = max(peak_main[0], rss[0])  # time's child: the finetune process
                peak_anon[0] = max(peak_anon[0], anon[0])
                peak_tree[0] = max(peak_tree[0], sum(rss))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines, maxrss_kb = [], 0
    for line in process.stdout:
        if match := re.match(r"\s*Maximum resident set size \(kbytes\): (\d+)", line):
            maxrss_kb = int(match.group(1))
        lines.append(f"{time.perf_counter() - started:8.2f}  {line.rstrip()}")
    process.wait()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(" ".join(command) + "\n" + "\n".join(lines) + "\n")
    return {
        "seconds": round(seconds, 2),
        "rc": process.returncode,
        "peak_rss_mb": round(maxrss_kb / 1024),  # time -v: KiB
        "sampled_main_rss_mb": round(peak_main[0] / 2**20),
        "sampled_main_anon_mb": round(peak_anon[0] / 2**20),
        "peak_tree_rss_mb": round(peak_tree[0] / 2**20),
        "log": str(log),
    }


def cache_dir(args, size: int, source: str, command: str) -> Path:
    """The run's ``data.cache.dir``: empty for every command (cold: no features, no file memo),
    but the one `full` left for `full_again` (its file memo: every file's digest and header)."""
    if command in ("full", "full_again"):
        shared = args.work / "memo" / f"{size}-{source}"
        if command == "full":
            shutil.rmtree(shared, ignore_errors=True)
        elif not (shared / "files.sqlite").is_file():
            sys.exit(f"full_again runs after full on the same files (no file memo in {shared})")
        return shared
    return args.work / "runs" / f"{size}-{source}-{command}" / "cache"


def run_one(args, size: int, source: str, command: str, data: list[str]) -> dict:
    tag = f"{size}-{source}-{command}"
    run = args.work / "runs" / tag
    shutil.rmtree(run, ignore_errors=True)
    common = [
        f"data.image_size={args.image_size}",
        f"data.num_workers={args.workers}",
        f"data.cache.dir={cache_dir(args, size, source, command)}",
    ]
    train, val = sum(split_of(i) == "train" for i in range(size)), sum(split_of(i) == "val" for i in range(size))
    if command == "check":
        argv, images = ["check-data", *data, *common], size
    else:
        argv = [
            *data,
            *common,
            f"hydra.run.dir={run / 'out'}",
            "trainer.max_epochs=1",
            "logger=none",
            "viz=none",
            "callbacks.progress_bar=false",
        ]
        if command == "head":
            argv, images = ["+recipe=freeze_all_but_head", f"data.cache.views={args.views}", *argv], size
        else:
            batch = 32  # conf/data/_common.yaml's data.batch_size
            argv = [
                "+recipe=full_finetune",
                *argv,
                f"+trainer.limit_train_batches={args.full_batches}",
                f"+trainer.limit_val_batches={args.full_val_batches}",
            ]
            images = min(train, args.full_batches * batch) + min(val, args.full_val_batches * batch)
    row = measured([sys.executable, "-m", "finetune", *argv], args.work / "logs" / f"{tag}.log")
    shutil.rmtree(run, ignore_errors=True)
    row |= {"size": size, "source": source, "command": command, "images": images}
    row["s_per_image"] = round(row["seconds"] / images, 6)
    if row["rc"] != 0:
        tail = Path(row["log"]).read_text().splitlines()[-15:]
        print(f"  {tag}: exit code {row['rc']}\n    " + "\n    ".join(tail), flush=True)
    return row


# ---------------------------------------------------------------- results


def load_rows(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"machine": {}, "prepared": {}, "rows": []}


def save_row(path: Path, stored: dict, row: dict) -> None:
    key = (row["size"], row["source"], row["command"])
    stored["rows"] = [r for r in stored["rows"] if (r["size"], r["source"], r["command"]) != key] + [row]
    path.write_text(json.dumps(stored, indent=1) + "\n")


def table(stored: dict) -> str:
    rows = sorted(stored["rows"], key=lambda r: (COMMANDS.index(r["command"]), SOURCES.index(r["source"]), r["size"]))
    base = {}
    for r in rows:  # rows are sorted by size within (command, source): the first is the smallest
        base.setdefault((r["source"], r["command"]), r)
    out = [
        "| command | source | images | processed | s | ms / image | x smallest | peak RSS MB | growth MB "
        "| anon MB | anon growth MB | tree RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get((r["source"], r["command"]))
        ratio = f"{r['s_per_image'] / b['s_per_image']:.2f}" if b else "-"
        growth = f"{r['peak_rss_mb'] - b['peak_rss_mb']:+d}" if b else "-"
        anon = r.get("sampled_main_anon_mb")  # rows measured before it was sampled have none
        anon_growth = f"{anon - b['sampled_main_anon_mb']:+d}" if anon and b.get("sampled_main_anon_mb") else "-"
        failed = "" if r["rc"] == 0 else f" (exit {r['rc']})"
        out.append(
            f"| {r['command']}{failed} | {r['source']} | {r['size']:,} | {r['images']:,} | {r['seconds']:.1f} | "
            f"{1000 * r['s_per_image']:.2f} | {ratio} | {r['peak_rss_mb']:,} | {growth} | "
            f"{f'{anon:,}' if anon else '-'} | {anon_growth} | {r['peak_tree_rss_mb']:,} |"
        )
    return "\n".join(out)


def phases(log: Path) -> dict[str, float]:
    """Where a run's seconds went, from the arrival times of its lines: ``start`` (until the data
    table: imports, scanning the source, the data check), and as the run reports them, ``features``
    (the cache's backbone pass), ``head_fit`` (L-BFGS with its cross-validation), ``decode`` (decode
    once), ``epoch`` (the capped epoch), ``calibration`` (the temperature's pass over validation)."""
    found: dict[str, float] = {}
    epoch_at = None
    for line in log.read_text().splitlines()[1:]:
        at, _, text = line.strip().partition("  ")
        text = text.strip()
        if text.startswith("data:") and "start" not in found:
            found["start"] = float(at)
        for key, pattern in (
            ("features", r"^feature cache: on.* computed in ([\d.]+) s"),
            ("head_fit", r"^head: fitted.* computed in ([\d.]+) s"),
            ("decode", r"^decoded-image cache: on.* decoded in ([\d.]+) s"),
            ("epoch", r"^1/1 .* ([\d.]+)$"),
        ):
            if match := re.search(pattern, text):
                found[key] = float(match.group(1))
                if key == "epoch":
                    epoch_at = float(at)
        if text.startswith("calibration:") and epoch_at is not None:
            found["calibration"] = round(float(at) - epoch_at, 2)
    return found


def phases_table(stored: dict) -> str:
    rows = sorted(stored["rows"], key=lambda r: (COMMANDS.index(r["command"]), SOURCES.index(r["source"]), r["size"]))
    keys = ("start", "features", "head_fit", "decode", "epoch", "calibration")
    out = ["| command | source | images | s | " + " | ".join(keys) + " |", "|---" * (4 + len(keys)) + "|"]
    for r in rows:
        found = phases(Path(r["log"])) if Path(r["log"]).is_file() else r.get("phases", {})
        r["phases"] = found
        cells = " | ".join(f"{found[k]:.1f}" if k in found else "" for k in keys)
        out.append(f"| {r['command']} | {r['source']} | {r['size']:,} | {r['seconds']:.1f} | {cells} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    parser.add_argument("--image-size", type=int, default=64, help="data.image_size (the JPEGs are decoded whole)")
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--views", type=int, default=1, help="head: data.cache.views (the config's default: 2)")
    parser.add_argument("--full-batches", type=int, default=20, help="full: trainer.limit_train_batches")
    parser.add_argument("--full-val-batches", type=int, default=10, help="full: trainer.limit_val_batches")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cost-data"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep this size's roots, datasets and shards")
    parser.add_argument("--table", action="store_true", help="print the stored tables and exit")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scale_cost.json"
    stored = load_rows(path)
    if args.table:
        print(table(stored) + "\n\n" + phases_table(stored))
        path.write_text(json.dumps(stored, indent=1) + "\n")  # with each row's phases
        return
    import torch

    stored["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "settings": {
            k: getattr(args, k) for k in ("image_size", "workers", "views", "full_batches", "full_val_batches")
        },
    }
    for size in args.sizes:
        print(f"{size:,} images: preparing", flush=True)
        root, prepared = make_root(args.work, size)
        hf = shards = None
        if "hf" in args.sources:
            started, built = time.perf_counter(), (args.work / f"hf-{size}").is_dir()
            hf = make_hf(args.work, root, size)
            if not built:  # a reused dataset keeps the time it took when it was built
                prepared["hf_build_s"] = round(time.perf_counter() - started, 1)
        if "stream" in args.sources:
            shards, seconds = make_shards(args.work, root, size)
            if seconds:
                prepared["shard_s"] = round(seconds, 1)
        stored["prepared"][str(size)] = stored["prepared"].get(str(size), {}) | prepared
        print(f"  prepared: {prepared}", flush=True)
        for source in args.sources:
            data = data_overrides(source, root, hf, shards)
            for command in args.commands:
                row = run_one(args, size, source, command, data)
                print(
                    f"  {source:6} {command:5} {row['seconds']:7.1f} s  {1000 * row['s_per_image']:6.2f} ms/img  "
                    f"peak RSS {row['peak_rss_mb']:,} MB (anon {row['sampled_main_anon_mb']:,}, "
                    f"tree {row['peak_tree_rss_mb']:,} MB)  rc {row['rc']}",
                    flush=True,
                )
                save_row(path, stored, row)
        if not args.keep:
            for name in (f"root-{size}", f"hf-{size}", f"shards-{size}"):
                shutil.rmtree(args.work / name, ignore_errors=True)
    print(table(stored) + "\n\n" + phases_table(stored))
    path.write_text(json.dumps(stored, indent=1) + "\n")


if __name__ == "__main__":
    main()
