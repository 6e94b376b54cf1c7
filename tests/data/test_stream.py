"""Streamed shards (finetune/data/stream.py, shards.py, the `finetune shard` command): written from
a generated image folder, read from a folder and from a real S3-compatible server (moto's
standalone server, a subprocess on loopback), trained on, killed and resumed, and refused in one
line when the data cannot be reached or trusted."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK, TINY, assert_refused, write_class_folders

pytest.importorskip("litdata")
pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

from finetune import fit  # noqa: E402
from finetune.data.datamodule import ImageDataset, Unreadable  # noqa: E402
from finetune.data.epochs import ChunkOrder, ShardShare  # noqa: E402
from finetune.data.sources import load_data  # noqa: E402
from finetune.errors import DataError  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
HEAD_ONLY = ["+recipe=freeze_all_but_head", *TINY, *QUICK, "trainer.max_epochs=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """moto's S3-compatible server on a free loopback port: (process, endpoint URL)."""
    port = free_port()
    env = {**os.environ, **CREDENTIALS, **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("moto's server did not start")


def run_cli(*args: str, env: dict | None = None, driver: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", driver, *args] if driver else [sys.executable, "-m", "finetune", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(folder root, local shards written by `finetune shard`, s3 URI of a copy, env to reach it)."""
    root = tmp_path_factory.mktemp("stream")
    write_class_folders(root / "data" / "train", per_class=8, seed=0)
    write_class_folders(root / "data" / "val", per_class=4, seed=1)
    out = root / "shards"
    done = run_cli("shard", "data=folder", f"data.root={root / 'data'}", f"out={out}", "chunk_bytes=20kb")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote train 24, val 12 images" in done.stdout
    server, endpoint = start_s3()
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    os.environ.update(env)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="shards")
    for path in out.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "shards", f"tiny/{path.relative_to(out)}")
    yield root, out, "s3://shards/tiny", env
    server.kill()
    for key in env:
        os.environ.pop(key, None)


def test_shards_hold_every_image_in_chunks_with_the_source_labels(shards):
    root, out, _, _ = shards
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["counts"] == {"train": 24, "val": 12} and meta["classes"] == ["ants", "bees", "wasps"]
    assert len(list((out / "train").glob("chunk-*.bin"))) > 1  # 20 kB chunks: several per split
    folder = load_data(_data("folder", root / "data"), 0)
    streamed = load_data(_data("stream", out), 0)
    # The rows come back in the source's order, each record the file's own bytes with its label.
    assert _rows(streamed.train) == _rows(folder.train) and _rows(streamed.val) == _rows(folder.val)
    # The training records are stored shuffled (a folder lists class by class: chunks, so batches,
    # would each hold one class); the chunks hold every row once.
    assert sorted(sum(streamed.chunks, [])) == list(range(24)) and len(streamed.chunks) > 1
    labels = [y for _, y in streamed.train]
    assert all(len({labels[row] for row in chunk}) > 1 for chunk in streamed.chunks if len(chunk) >= 4)


def _data(name: str, where):
    from finetune.config import compose_config

    key = "data.root" if name == "folder" else "data.uri"
    return compose_config([f"data={name}", f"{key}={where}"]).data


def test_head_only_from_local_and_s3_shards_matches_the_folder(shards, tmp_path):
    root, out, uri, _ = shards
    results = [
        fit(overrides=HEAD_ONLY + [*source, f"hydra.run.dir={tmp_path / name}"]).metrics
        for name, source in (
            ("folder", ["data=folder", f"data.root={root / 'data'}"]),
            ("local", ["data=stream", f"data.uri={out}"]),
            # its own feature cache: the local shards' features (same fingerprint) would be reused
            (
                "s3",
                [
                    "data=stream",
                    f"data.uri={uri}",
                    f"data.cache_dir={tmp_path / 'cache'}",
                    f"data.cache.dir={tmp_path}",
                ],
            ),
        )
    ]
    for key in ("val/acc", "val/loss", "train/loss"):
        assert results[0][key] == results[1][key] == results[2][key], (key, [r[key] for r in results])
    assert list((tmp_path / "cache").rglob("chunk-*.bin"))  # the s3 run read downloaded chunks


def _encoded(item) -> bytes:
    return item.encoded() if hasattr(item, "encoded") else Path(item).read_bytes()


def _rows(samples) -> list[tuple[bytes, object]]:
    """(encoded bytes, label) of each sample, label sets as tuples."""
    return [(_encoded(item), tuple(y) if isinstance(y, (list, tuple)) else y) for item, y in samples]


@pytest.mark.parametrize("source", ["csv-multilabel", "hf"])
def test_a_manifest_and_a_hugging_face_dataset_shard_to_the_same_rows(source, tmp_path):
    """Every source shards alike: the same classes, labels (label sets too) and bytes, split by split."""
    from finetune.config import compose_config
    from finetune.data.shards import write_shards

    data = tmp_path / "data"
    write_class_folders(data / "train", per_class=4)
    write_class_folders(data / "validation", per_class=2, seed=1)
    task = "multilabel" if source == "csv-multilabel" else "multiclass"
    if source == "hf":
        overrides = ["data=hf", f"data.path={data}"]
    else:
        rows = ["path,label,split"]
        for i, path in enumerate(sorted(data.rglob("*.jpg"))):
            labels = path.parent.name + (" wasps" if i % 3 == 0 and path.parent.name != "wasps" else "")
            rows.append(f"{path.relative_to(data)},{labels},{'train' if path.parts[-3] == 'train' else 'val'}")
        (data / "labels.csv").write_text("\n".join(rows) + "\n")
        overrides = ["data=csv", f"data.csv={data / 'labels.csv'}", "data.split_column=split", "data.label_sep=' '"]
    cfg = compose_config([*overrides, f"task={task}"])
    original = load_data(cfg.data, 0, task)
    method = multiprocessing.get_start_method(allow_none=True)
    write_shards(original, str(tmp_path / "shards"))
    assert multiprocessing.get_start_method(allow_none=True) == method  # LitData forces spawn; put back
    streamed = load_data(_data("stream", tmp_path / "shards"), 0, task)
    assert streamed.classes == original.classes and streamed.multilabel == original.multilabel
    assert len(streamed.train) == len(original.train) > 0 and len(streamed.val) == len(original.val) > 0
    assert _rows(streamed.train) == _rows(original.train) and _rows(streamed.val) == _rows(original.val)


def test_chunk_order_reads_a_chunk_at_a_time_and_ranks_read_their_own_chunks():
    stored = np.random.default_rng(0).permutation(24).tolist()  # the rows each chunk holds
    stored = [stored[:8], stored[8:15], stored[15:22], stored[22:]]
    order = ChunkOrder(stored, seed=3)
    chunk_of = {row: c for c, rows in enumerate(stored) for row in rows}
    first = [i for _, i in order]
    assert sorted(first) == list(range(24))
    assert sum(chunk_of[a] != chunk_of[b] for a, b in zip(first, first[1:])) == 3  # one switch per chunk
    order.set_epoch(1)
    assert [i for _, i in order] != first and [i for _, i in ChunkOrder(stored, 3)] == first
    shares = [list(ShardShare(ChunkOrder(stored, 3), 2, rank)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1])  # equal steps on every rank
    chunks = [{chunk_of[i] for _, i in share} for share in shares]
    assert not chunks[0] & chunks[1]  # no chunk read by both ranks
    assert {i for share in shares for _, i in share} == set(range(24))


def test_a_corrupt_record_is_counted_and_skipped_like_a_bad_file(tmp_path):
    from finetune.data.shards import write_shards

    write_class_folders(tmp_path / "data" / "train", per_class=3)
    write_class_folders(tmp_path / "data" / "val", per_class=2, seed=1)
    bad = tmp_path / "data" / "train" / "bees" / "bees_1.jpg"
    bad.write_bytes(bad.read_bytes()[:1500])  # a header, then nothing: passes the scan, fails to decode
    splits = load_data(_data("folder", tmp_path / "data"), 0)
    assert not splits.skipped
    write_shards(splits, str(tmp_path / "shards"))
    streamed = load_data(_data("stream", tmp_path / "shards"), 0)
    dataset = ImageDataset(streamed.train, lambda image: {"image": torch.zeros(1)})
    items = [dataset[i] for i in range(len(dataset))]
    failures = [item for item in items if isinstance(item, Unreadable)]
    assert len(failures) == 1 and failures[0].path == str(streamed.train[4][0]), failures
    assert "not a readable image" in failures[0].reason


def test_unusable_shards_are_one_line_errors(shards, tmp_path, monkeypatch):
    _, out, uri, env = shards
    truncated = tmp_path / "truncated"
    subprocess.run(["cp", "-r", str(out), str(truncated)], check=True)
    chunk = truncated / "train" / "chunk-0-1.bin"
    chunk.write_bytes(chunk.read_bytes()[:100])
    closed = f"http://127.0.0.1:{free_port()}"
    # The CLI: one line, exit 2 (two processes at once: each pays torch's import).
    cli_cases = [
        ([f"data.uri={uri}"], {"AWS_ENDPOINT_URL": closed}, "cannot reach the S3 endpoint"),
        ([f"data.uri={truncated}"], {}, "chunk-0-1.bin: a corrupt shard (100 bytes"),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "finetune", "check-data", "data=stream", *args],
            env={**os.environ, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, extra, _ in cli_cases
    ]
    for proc, (_, _, message) in zip(procs, cli_cases):
        stdout, stderr = proc.communicate(timeout=120)
        assert_refused(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), message)
    # The same DataError (what the CLI prints) for the rest, in this process.
    strict, strict_endpoint = start_s3({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # every request checks its keys
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict_endpoint)
        with pytest.raises(DataError, match="refused these credentials"):
            load_data(_data("stream", uri), 0)
    finally:
        strict.kill()
    monkeypatch.setenv("AWS_ENDPOINT_URL", env["AWS_ENDPOINT_URL"])
    with pytest.raises(DataError, match=r"no shards there \(NoSuchBucket\)"):
        load_data(_data("stream", "s3://no-such-bucket/x"), 0)
    with pytest.raises(DataError, match="data=stream needs data.uri="):
        load_data(_data("stream", ""), 0)
    (truncated / "finetune.json").write_text("{half")
    with pytest.raises(DataError, match="is not a shard description"):
        load_data(_data("stream", truncated), 0)


DRIVER = """
import os, signal, sys
from finetune.train.module import ClassifierModule
batch_end = ClassifierModule.on_train_batch_end
def kill(self, outputs, batch, batch_idx):
    batch_end(self, outputs, batch, batch_idx)
    if self.global_step == int(os.environ["KILL_AFTER_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
ClassifierModule.on_train_batch_end = kill
from finetune.cli import main
sys.argv = ["finetune", *sys.argv[1:]]
main()
"""


@pytest.mark.slow  # three full fine-tunes from the S3 server, one killed mid-epoch: about 40 s on 2 cores
def test_killed_s3_run_resumes_to_the_same_weights_and_metrics(shards, tmp_path):
    _, _, uri, env = shards
    run = ["+recipe=full_finetune", *TINY, *QUICK, "trainer.max_epochs=2", "data.batch_size=8"]
    run += ["trainer.precision=32-true", "callbacks.checkpoint.min_write_interval_s=0"]
    run += ["data=stream", f"data.uri={uri}", f"data.cache_dir={tmp_path / 'cache'}"]
    whole = run_cli(*run, f"hydra.run.dir={tmp_path / 'a'}", env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run_cli(*run, f"hydra.run.dir={tmp_path / 'b'}", env={**env, "KILL_AFTER_STEP": "4"}, driver=DRIVER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]  # step 4: epoch 2 of 2, its first batch
    resumed = run_cli(*run, f"hydra.run.dir={tmp_path / 'b'}", "resume=true", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary_a, summary_b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert summary_a["history"] == summary_b["history"] and summary_a["metrics"] == summary_b["metrics"]


# Loaded by every Python process of the run (PYTHONPATH): each StreamRow read is written down as
# "rank split row", so the test sees which records each DDP rank read.
READS_HOOK = """
import os
from finetune.data import stream
encoded = stream.StreamRow.encoded
def recorded(self):
    with open(os.environ["READS_LOG"], "a") as log:
        log.write(f"{os.environ.get('LOCAL_RANK', '0')} {self.source[0].rsplit('/', 1)[-1]} {self.row}\\n")
    return encoded(self)
stream.StreamRow.encoded = recorded
"""


@pytest.mark.slow  # 2 DDP processes, 2 epochs of a tiny model on the local shards: about 40 s on 2 cores
def test_ddp_ranks_each_read_their_own_chunks_of_the_shards(shards, tmp_path):
    _, out, _, _ = shards
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(READS_HOOK)
    log = tmp_path / "reads.log"
    run = ["+recipe=full_finetune", *TINY, *QUICK, "trainer.max_epochs=2", "data.batch_size=4"]
    run += ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    run += ["data=stream", f"data.uri={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    paths = [str(hook), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(paths), "READS_LOG": str(log)}
    done = run_cli(*run, env={**env, "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting with 2 processes" in (tmp_path / "run" / "finetune.log").read_text()
    assert done.stdout.count("\nval/acc=") == 1  # rank zero reports
    reads = [line.split() for line in log.read_text().splitlines()]
    train = {rank: [int(row) for r, split, row in reads if r == rank and split == "train"] for rank in ("0", "1")}
    chunks = load_data(_data("stream", out), 0).chunks
    assert len(chunks) > 2
    n = len(train["0"]) // 2  # reads per rank and epoch: equal steps on both ranks
    assert len(train["0"]) == len(train["1"]) == 2 * n >= 24
    for epoch in (0, 1):  # each rank reads its own whole chunks; a shorter share repeats its own rows
        share = {rank: set(rows[n * epoch : n * (epoch + 1)]) for rank, rows in train.items()}
        assert not share["0"] & share["1"] and share["0"] | share["1"] == set(range(24))
        for rows in share.values():
            assert all(set(chunk) <= rows or not set(chunk) & rows for chunk in chunks)  # never part of a chunk
