"""Features out: ``finetune embed`` (pooled features of every image to a file) and ``finetune
probe`` (logistic regression and k-NN on them: the quickest transfer-learning baseline)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from finetune.commands.args import output_dir, parse
from finetune.config import compose_config
from finetune.data.sources import SPLITS, load_data
from finetune.data.transforms import with_input_size
from finetune.errors import ConfigError
from finetune.model.build import backbone_from_config
from finetune.tables import format_table
from finetune.use.load import load


def embed_command(args: Sequence[str]) -> int:
    """``finetune embed [ckpt=PATH] [format=npz|parquet] [out=DIR] backbone.name=... data=...``:
    the pooled features of every image, with labels, paths and splits, in one file."""
    from finetune.use.embed import FORMATS, save

    opts, overrides = parse(args, {"ckpt": None, "format": "npz", "out": None}, "embed", "all")
    if opts["format"] not in FORMATS:
        raise ConfigError(f"format={opts['format']!r}; choose {' or '.join(FORMATS)}.")
    embeddings, skipped = _embeddings(opts["ckpt"], overrides)
    path = save(embeddings, output_dir(opts["out"]) / f"embeddings.{opts['format']}")
    counts = {s: int((embeddings.splits == s).sum()) for s in SPLITS if (embeddings.splits == s).any()}
    print(
        f"{len(embeddings.features)} images x {embeddings.features.shape[1]} features "
        f"({', '.join(f'{s} {n}' for s, n in counts.items())}) from {embeddings.backbone}: {path}"
    )
    if skipped:
        print(f"skipped {len(skipped)} unreadable files")
    return 0


def probe_command(args: Sequence[str]) -> int:
    """``finetune probe [embeddings=FILE.npz | ckpt=PATH | backbone.name=... data=...] [C=1] [k=5]``."""
    from finetune.use.embed import load_embeddings, probe

    opts, overrides = parse(args, {"embeddings": None, "ckpt": None, "C": "1.0", "k": "5", "out": None}, "probe", "all")
    try:
        c, k = float(opts["C"]), int(opts["k"])
    except ValueError:
        raise ConfigError(f"C={opts['C']!r} must be a number and k={opts['k']!r} an integer.") from None
    if opts["embeddings"]:
        if overrides or opts["ckpt"]:
            raise ConfigError("embeddings=FILE already holds the features: drop ckpt= and config overrides.")
        embeddings = load_embeddings(Path(opts["embeddings"]))
    else:
        embeddings, _ = _embeddings(opts["ckpt"], overrides)
    scores = probe(embeddings, c=c, k=k)
    print(
        f"probe on {embeddings.backbone} features ({embeddings.features.shape[1]}-d), "
        f"{int((embeddings.splits == 'train').sum())} training images"
    )
    print(
        format_table(
            ["method", "split", "accuracy", "fit s"],
            [[s.method, s.split, f"{s.accuracy:.4f}", f"{s.seconds:.2f}"] for s in scores],
        )
    )
    out = output_dir(opts["out"])
    (out / "probe.json").write_text(json.dumps([vars(s) for s in scores], indent=2))
    print(f"  {out / 'probe.json'}")
    return 0


def _embeddings(ckpt: str | None, overrides: list[str]):
    """Embeddings of the data `overrides` describe: under a checkpoint's fine-tuned backbone
    (`ckpt`; its own training data when no overrides are given) or a configured one."""
    from finetune.use.embed import embed

    if ckpt:
        model = load(ckpt)
        cfg = model.run_config(overrides)
        module, data_config, name = model.model.backbone, model.data_config, ckpt
    else:
        cfg = compose_config(overrides)
        torch.manual_seed(cfg.seed)  # backbone.weights=random: the same network on every call
        backbone = backbone_from_config(cfg)
        module, data_config, name = (
            backbone.model,
            with_input_size(backbone.data_config, cfg.data.image_size),
            backbone.name,
        )
    if cfg.get("task") == "multilabel" or (ckpt and model.task == "multilabel"):
        raise ConfigError(
            "finetune embed and probe label points with one class each; multi-label data have no "
            "such label. Train with task=multilabel +recipe=freeze_all_but_head: that is the linear probe."
        )
    splits = load_data(cfg.data, cfg.seed)
    embeddings, unreadable = embed(module, data_config, name, cfg, splits)
    return embeddings, {**dict(splits.skipped), **unreadable}
