"""Streamed shards as a source (``data=stream data.uri=DIR|s3://bucket/prefix``): what
``finetune shard`` wrote (:mod:`finetune.data.shards`) read back through LitData.

Design. LitData's ``optimize`` wrote one dataset per split (``URI/train``, ``URI/val``,
``URI/test``: chunk files + ``index.json``) and ``URI/finetune.json`` the rest: classes, task,
every row's label and content digest, the source's skipped files, a fingerprint. Loading reads
those small files only (and lists the chunk files to check their sizes: a truncated or missing
shard is a one-line DataError before any training). A sample is a :class:`StreamRow`, a string
``stream://FINGERPRINT/SPLIT/ROW`` (its row in the source) like :mod:`finetune.data.hf`'s rows, whose bytes come from
LitData's ``StreamingDataset`` by random access (the whole chunk is downloaded once into
``data.cache_dir`` and read locally). So every guarantee of the other sources holds unchanged: the
one image loader decodes it (a bad record is counted and skipped like a bad file), the feature
cache and the data check key on its name and digest, and the training order is finetune's own
function of (seed, epoch), which is what makes ``resume=true`` exact.

Why not LitData's own iteration and its ``state_dict``: its order is a function of its shuffler and
worker layout, not of (seed, epoch, index); the feature cache, the data check and the checkpoint's
exact resume all need random access by index. What LitData's iteration gives (each rank reads its
own chunks) is kept by the order itself: ``DataSplits.chunks`` holds the train split's rows chunk
by chunk and :class:`finetune.data.epochs.ChunkOrder` shuffles chunks, then rows within a chunk, so one
process reads a chunk once per epoch, and under DDP :class:`finetune.data.epochs.ShardShare`
deals whole chunks to ranks.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from finetune.data.file_memo import StoredImage
from finetune.data.samples import SPLITS, DataSplits
from finetune.errors import ConfigError, DataError

META = "finetune.json"
FORMAT = 1
_OPEN: dict[tuple, object] = {}  # (split uri, endpoint, cache) -> StreamingDataset, per process


class StreamRow(StoredImage):
    """Source row `row` of a split, stored as record `index` of the split dataset `source` =
    (split URI, endpoint or None, cache dir)."""

    def __new__(cls, name: str, source: tuple, index: int, digest: str | None = None, row: int | None = None):
        stored = super().__new__(cls, name)
        stored.source, stored.index, stored.digest = source, index, digest
        stored.row = index if row is None else row
        return stored

    streamed = True  # no header was read at load time (the decoded-image cache leaves it alone)

    def __reduce__(self):  # DataLoader workers open their own StreamingDataset
        return StreamRow, (str(self), self.source, self.index, self.digest, self.row)

    def encoded(self) -> bytes:
        item = split_dataset(*self.source)[self.index]
        if item.get("row") != self.row:
            raise ValueError(f"shard record holds row {item.get('row')}, expected {self.row}")
        return item["image"]


def split_dataset(uri: str, endpoint: str | None, cache: str | None):
    """LitData's StreamingDataset of one split, opened once per process."""
    key = (uri, endpoint, cache)
    if key not in _OPEN:
        from litdata import StreamingDataset

        allow_plain_http(endpoint)
        options = {"endpoint_url": endpoint} if endpoint else None
        dataset = StreamingDataset(uri, cache_dir=_cache_for(uri, cache), storage_options=options)
        dataset._on_demand_bytes = False  # LitData private: fetch whole chunks, not one record's byte range
        _OPEN[key] = dataset
    return _OPEN[key]


def _cache_for(uri: str, cache: str | None) -> str | None:
    if not uri.startswith("s3://") or not cache:
        return None
    return str(Path(cache).expanduser() / "stream" / uri.removeprefix("s3://").replace("/", "_"))


def allow_plain_http(endpoint: str | None) -> None:
    """An ``http://`` endpoint (a MinIO or moto server on a private network): LitData's obstore
    client refuses plain HTTP unless told (LitData private: its client options)."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint and endpoint.startswith("http://"):
        from litdata.streaming import downloader

        downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True


def s3_client(endpoint: str | None):
    """A boto3 S3 client that fails fast: 5 s to connect, 2 attempts (AWS_ENDPOINT_URL when
    `endpoint` is None; credentials from the environment or ~/.aws as boto3 finds them)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("data=stream needs LitData and boto3: pip install 'finetune[stream]'.") from None
    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2})
    return boto3.client("s3", endpoint_url=endpoint or None, config=config)


def s3_error(err: Exception, uri: str) -> DataError:
    """One line for what went wrong reaching `uri`: no server, no or bad credentials, no bucket."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(err, EndpointConnectionError):
        return DataError(f"{uri}: cannot reach the S3 endpoint ({err}); check AWS_ENDPOINT_URL or data.endpoint_url.")
    if isinstance(err, NoCredentialsError):
        return DataError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE).")
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken"):
            return DataError(
                f"{uri}: the S3 server refused these credentials ({code}); check AWS_ACCESS_KEY_ID / ..._KEY."
            )
        if code in ("NoSuchBucket", "NoSuchKey", "404"):
            return DataError(f"{uri}: no shards there ({code}); write them with: finetune shard data=... out={uri}")
        return DataError(f"{uri}: the S3 server said {code or type(err).__name__}: {' '.join(str(err).split())[:200]}")
    return DataError(f"{uri}: {type(err).__name__}: {' '.join(str(err).split())[:200]}")


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def read_small(uri: str, name: str, endpoint: str | None) -> bytes:
    """The bytes of the small file URI/NAME (local or S3); DataError when it is not there."""
    if not uri.startswith("s3://"):
        path = Path(uri) / name
        if not path.is_file():
            raise DataError(f"data.uri={uri!r}: {path} not found; write shards with: finetune shard data=... out={uri}")
        return path.read_bytes()
    bucket, prefix = _bucket_key(uri)
    try:
        return s3_client(endpoint).get_object(Bucket=bucket, Key=f"{prefix}/{name}".lstrip("/"))["Body"].read()
    except Exception as err:
        raise s3_error(err, uri) from None


def _stored_sizes(uri: str, endpoint: str | None) -> dict[str, int]:
    """File name -> size of the files directly in the split folder `uri`."""
    if not uri.startswith("s3://"):
        return {p.name: p.stat().st_size for p in Path(uri).iterdir() if p.is_file()}
    bucket, prefix = _bucket_key(uri)
    sizes, client = {}, s3_client(endpoint)
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            sizes |= {o["Key"].rsplit("/", 1)[-1]: o["Size"] for o in page.get("Contents", [])}
    except Exception as err:
        raise s3_error(err, uri) from None
    return sizes


def chunk_sizes(uri: str, endpoint: str | None, rows: int) -> list[int]:
    """Rows per chunk of the split dataset at `uri`, after checking its index against the chunk
    files there (a missing or truncated shard is a DataError) and against `rows`."""
    try:
        index = json.loads(read_small(uri, "index.json", endpoint))
        chunks = [(c["filename"], int(c["chunk_bytes"]), int(c["chunk_size"])) for c in index["chunks"]]
    except DataError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{uri}/index.json is not a LitData index ({type(err).__name__}: {err}); shard again."
        ) from None
    stored = _stored_sizes(uri, endpoint)
    for name, size, _ in chunks:
        if stored.get(name) != size:
            found = "missing" if name not in stored else f"{stored[name]:,} bytes, the index says {size:,}"
            raise DataError(f"{uri}/{name}: a corrupt shard ({found}); copy it again or shard again.")
    if sum(n for _, _, n in chunks) != rows:
        raise DataError(f"{uri} holds {sum(n for _, _, n in chunks)} records, {META} says {rows}; shard again.")
    return [n for _, _, n in chunks]


def load_stream(cfg, seed: int, task: str = "multiclass") -> DataSplits:
    """The samples of ``data=stream``: `cfg` has uri, endpoint_url, cache_dir."""
    uri = str(cfg.get("uri") or "").rstrip("/")
    if not uri:
        raise DataError("data=stream needs data.uri=DIR or s3://bucket/prefix (written by finetune shard).")
    if not uri.startswith("s3://"):
        local = Path(uri).expanduser()
        if not local.is_dir():
            raise DataError(f"data.uri={uri!r}: {local.absolute()} is not a folder of shards.")
        uri = str(local.resolve())
    endpoint = cfg.get("endpoint_url") or None
    try:
        meta = json.loads(read_small(uri, META, endpoint))
        classes, labels, digests = meta["classes"], meta["labels"], meta["digests"]
        fingerprint, stored_task = meta["fingerprint"], meta["task"]
    except DataError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{uri}/{META} is not a shard description ({type(err).__name__}: {err}); shard again."
        ) from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{uri}: shard format {meta.get('format')!r}, this finetune reads {FORMAT}; shard again.")
    if stored_task != task:
        raise DataError(f"data.uri={uri!r} holds {stored_task} data; set task={stored_task}.")
    samples, chunks = {}, []
    for split in SPLITS:
        if split not in labels:
            continue
        where, n = f"{uri}/{split}", len(labels[split])
        sizes = chunk_sizes(where, endpoint, n)
        written = (meta.get("order") or {}).get(split) or list(range(n))  # record i holds source row written[i]
        if sorted(written) != list(range(n)):
            raise DataError(f"{uri}/{META}: the order of {split} is not a permutation of its {n} rows; shard again.")
        record = {row: i for i, row in enumerate(written)}
        if split == "train":
            ends = list(itertools.accumulate(sizes))
            chunks = [written[end - size : end] for end, size in zip(ends, sizes)]
        source = (where, endpoint, str(cfg.get("cache_dir") or "") or None)
        name = f"stream://{fingerprint}/{split}"
        rows = [StreamRow(f"{name}/{j}", source, record[j], digests[split][j], j) for j in range(n)]
        samples[split] = [(row, tuple(y) if isinstance(y, list) else y) for row, y in zip(rows, labels[split])]
    if not samples.get("train") or not samples.get("val"):
        raise DataError(f"{uri}: shards need a train and a val split; {META} has {sorted(samples)}.")
    return DataSplits(
        classes,
        samples["train"],
        samples["val"],
        f"streamed shards {uri} ({meta.get('description', 'no description')})",
        [tuple(s) for s in meta.get("skipped", [])],
        samples.get("test", []),
        task=stored_task,
        chunks=chunks,
    )
