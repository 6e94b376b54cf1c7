"""Writing streamed shards (``finetune shard data=... out=DIR|s3://bucket/prefix``): any source's
:class:`~finetune.data.samples.DataSplits` to LitData chunks, read back by :mod:`finetune.data.stream`.

Each split goes through LitData's ``optimize`` as records ``{"row": i, "image": encoded bytes}``
(the file's own bytes: nothing is decoded or re-encoded, so a streamed run sees exactly what the
folder run saw), with one writer process, so the records keep the order they were given: the
source's, or for the training split a seeded permutation recorded in ``finetune.json``'s
``order`` (labels and digests there stay in the source's order; each record carries its source
row, checked when it is read). ``finetune.json`` is written last: a folder without it is an
unfinished shard set.
The split between train and val is the source's at shard time (its seed when it splits).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.file_memo import StoredImage, file_digest
from finetune.data.samples import SPLITS, DataSplits
from finetune.data.stream import FORMAT, META, allow_plain_http, s3_client, s3_error
from finetune.errors import ConfigError

log = logging.getLogger(__name__)


def encoded(item) -> bytes:
    """A sample's encoded image: a file's bytes, a dataset row's bytes, an array as PNG."""
    if isinstance(item, np.ndarray):
        buffer = io.BytesIO()
        Image.fromarray(item).save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(item, StoredImage):
        return item.encoded()
    return Path(item).read_bytes()


def _record(pair: tuple) -> dict:
    row, item = pair
    return {"row": row, "image": encoded(item)}


def _digest(item) -> str:
    if isinstance(item, np.ndarray):
        return hashlib.blake2b(encoded(item), digest_size=16).hexdigest()
    return file_digest(item)  # what the data check and the feature cache compute from the bytes


def _refuse_existing(out: str, endpoint: str | None) -> None:
    if not out.startswith("s3://"):
        if Path(out).exists() and any(Path(out).iterdir()):
            raise ConfigError(f"out={out!r} is not empty; choose another folder or add overwrite=true.")
        return
    bucket, _, prefix = out.removeprefix("s3://").partition("/")
    try:
        found = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix.strip("/") + "/", MaxKeys=1)
    except Exception as err:
        raise s3_error(err, out) from None
    if found.get("KeyCount"):
        raise ConfigError(f"out={out!r} already holds objects; choose another prefix or add overwrite=true.")


def _put(out: str, name: str, data: bytes, endpoint: str | None) -> None:
    if not out.startswith("s3://"):
        Path(out, name).write_bytes(data)
        return
    bucket, _, prefix = out.removeprefix("s3://").partition("/")
    try:
        s3_client(endpoint).put_object(Bucket=bucket, Key=f"{prefix.strip('/')}/{name}".lstrip("/"), Body=data)
    except Exception as err:
        raise s3_error(err, out) from None


def write_shards(
    splits: DataSplits,
    out: str,
    chunk_bytes: str = "64MB",
    endpoint: str | None = None,
    overwrite: bool = False,
    *,
    seed: int = 0,
) -> dict:
    """Write `splits` as shards under `out` (a folder or s3://bucket/prefix); the description
    written to ``out/finetune.json``. The training split's records are written in a permutation
    of `seed` (``finetune.json``'s ``order``): training reads a chunk at a time
    (:class:`~finetune.data.epochs.ChunkOrder`), and a source listed class by class (every folder)
    would otherwise fill each chunk, so each batch, with one class. Labels and digests stay in the
    source's order, in which :func:`~finetune.data.stream.load_stream` gives the rows back."""
    out = out.rstrip("/")
    if not out.startswith("s3://"):
        out = str(Path(out).expanduser().resolve())
    if not overwrite:
        _refuse_existing(out, endpoint)
    elif not out.startswith("s3://"):
        Path(out, META).unlink(missing_ok=True)  # unfinished until the new description is written
    allow_plain_http(endpoint)
    labels, digests, order = {}, {}, {}
    fingerprint = hashlib.blake2b(digest_size=16)
    for split in SPLITS:
        samples = getattr(splits, split)
        if not samples:
            continue
        digests[split] = [_digest(item) for item, _ in samples]
        labels[split] = [list(y) if isinstance(y, tuple) else int(y) for _, y in samples]
        fingerprint.update(json.dumps([split, labels[split], digests[split]]).encode())
        written = list(range(len(samples)))
        if split == "train":
            written = order[split] = np.random.default_rng(seed).permutation(len(samples)).tolist()
        _write_split([(row, samples[row][0]) for row in written], f"{out}/{split}", chunk_bytes, endpoint)
    meta = {
        "format": FORMAT,
        "task": splits.task,
        "classes": list(splits.classes),
        "counts": {split: len(rows) for split, rows in labels.items()},
        "description": splits.description,
        "skipped": [list(s) for s in splits.skipped],
        "fingerprint": fingerprint.hexdigest(),
        "labels": labels,
        "digests": digests,
        "order": order,  # split -> source row of each record, where not the source's order
    }
    _put(out, META, json.dumps(meta).encode(), endpoint)
    return meta


def _write_split(records: list[tuple], where: str, chunk_bytes: str, endpoint: str | None) -> None:
    """`records` ((source row, image) pairs, in the order they are stored) as LitData chunks at `where`."""
    from litdata import optimize

    log.info("shard: writing %d images to %s", len(records), where)
    # optimize() sets this process's multiprocessing start method to spawn (force=True) and leaves
    # it so: a library forking with module globals afterwards (cleanlab's label-issue pool) breaks.
    method = multiprocessing.get_start_method(allow_none=True)
    with _library_output_to_log(), _start_method_kept(method):
        optimize(
            fn=_record,
            inputs=records,
            output_dir=where,
            chunk_bytes=chunk_bytes,
            num_workers=1,  # one writer: record i is records[i], as finetune.json's "order" says
            mode="overwrite",
            storage_options={"endpoint_url": endpoint} if endpoint else {},
        )


@contextlib.contextmanager
def _start_method_kept(method: str | None):
    try:
        yield
    finally:
        multiprocessing.set_start_method(method, force=True)


@contextlib.contextmanager
def _library_output_to_log():
    """LitData's ``optimize`` prints a dozen lines and a progress bar per split (an account
    advert, its start method, worker states) from this process and its spawned worker: the file
    descriptors are pointed at a temporary file, whose text goes to the debug log, or to stderr
    when ``optimize`` fails (so nothing that explains a failure is lost)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 1)
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            if failed:
                sys.stderr.write(text[-4000:])
            else:
                log.debug("%s", text)
