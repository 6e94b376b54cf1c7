"""``finetune shard``: an existing source (folder, CSV, hf, digits) written as streamed shards
(:mod:`finetune.data.shards`) for ``data=stream data.uri=OUT``."""

from __future__ import annotations

from collections.abc import Sequence

from finetune.commands.args import REQUIRED, flag, parse
from finetune.config import compose_config
from finetune.data.sources import SPLITS, load_data
from finetune.errors import ConfigError


def shard_command(args: Sequence[str]) -> int:
    """``finetune shard data=... out=DIR|s3://bucket/prefix [chunk_bytes=64MB] [endpoint_url=URL]
    [overwrite=false]``: every split of the source (the train/val split as the source makes it,
    with ``seed``) written as LitData chunks of the images' own bytes, plus ``finetune.json``
    (classes, labels, digests, the source's skipped files). Train from them with
    ``data=stream data.uri=OUT``."""
    options = {"out": REQUIRED, "chunk_bytes": "64MB", "endpoint_url": None, "overwrite": "false"}
    opts, overrides = parse(args, options, "shard", "all")
    cfg = compose_config(overrides)
    if cfg.data.name == "stream":
        raise ConfigError("finetune shard reads a source (data=folder, csv, hf, digits), not shards already.")
    try:
        from finetune.data.shards import write_shards
    except ImportError:
        raise ConfigError("finetune shard needs LitData: pip install 'finetune[stream]'.") from None
    splits = load_data(cfg.data, cfg.seed, cfg.get("task", "multiclass"))
    meta = write_shards(
        splits, opts["out"], opts["chunk_bytes"], opts["endpoint_url"], flag(opts, "overwrite"), seed=cfg.seed
    )
    counts = ", ".join(f"{split} {meta['counts'][split]}" for split in SPLITS if split in meta["counts"])
    print(f"wrote {counts} images ({len(splits.classes)} classes, {len(splits.skipped)} skipped) to {opts['out']}")
    print(f"train from them with: finetune data=stream data.uri={opts['out']}")
    return 0
