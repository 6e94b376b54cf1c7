"""``finetune audit``: what to look at in a data set before training on it (likely label errors,
near-duplicates, outliers, a k-fold accuracy with its interval). It reads; it changes no file."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from finetune.commands.args import output_dir, parse
from finetune.config import compose_config
from finetune.data.sources import load_data
from finetune.data.transforms import with_input_size
from finetune.errors import ConfigError
from finetune.model.build import backbone_from_config

OPTIONS = {"folds": "5", "top": "24", "similarity": "0.95", "out": None}  # the command's own, not config keys


def audit_command(args: Sequence[str]) -> int:
    """``finetune audit``: see :func:`run_audit`."""
    report = run_audit(args)
    print("\n".join(report.lines()))
    print(f"wrote {', '.join(p.name for p in report.files)} to {report.folder}; no data file was changed")
    return 0


def run_audit(args: Sequence[str]):
    """``finetune audit [folds=5] [top=24] [similarity=0.95] [out=DIR] data=... [backbone.name=...]``:
    out-of-fold probabilities of a linear probe on the pretrained backbone's features (k folds over
    every split, through the feature cache), then likely label errors ranked by confident learning
    (cleanlab), near-duplicate pairs (feature neighbours whose grey thumbnails correlate at
    `similarity` or more; train <-> val/test pairs are leaks), outliers, and the k-fold accuracy
    with its 95% interval. Writes audit.csv (one row per image, most suspect first), audit.json,
    suspects.png (given -> suggested label) and duplicates.png. The data are never changed: it
    tells you what to look at. Returns the :class:`~finetune.viz.audit.AuditReport`."""
    import numpy as np

    from finetune.use.audit import audit, check_folds
    from finetune.use.embed import embed
    from finetune.viz.audit import AuditReport

    opts, overrides = parse(args, OPTIONS, "audit", "all")
    try:
        top, similarity = int(opts["top"]), float(opts["similarity"])
    except ValueError:
        raise ConfigError(
            f"top={opts['top']!r} must be an integer and similarity={opts['similarity']!r} a number between -1 and 1."
        ) from None
    if not -1.0 <= similarity <= 1.0:
        raise ConfigError(f"similarity={similarity}: a correlation lies between -1 and 1 (0.95 is the default).")
    cfg = compose_config(overrides)
    if cfg.get("task") == "multilabel":
        raise ConfigError(
            "finetune audit checks one class per image; multi-label data (task=multilabel) have no "
            "such label. Audit a single-label manifest, or leave task at multiclass."
        )
    splits = load_data(cfg.data, cfg.seed)
    labels = np.array([label for split in (splits.train, splits.val, splits.test) for _, label in split], dtype=int)
    check_folds(opts["folds"], labels, list(splits.classes))  # before minutes of feature extraction
    torch.manual_seed(cfg.seed)  # backbone.weights=random: the same network on every call
    backbone = backbone_from_config(cfg)
    data_config = with_input_size(backbone.data_config, cfg.data.image_size)
    embeddings, unreadable = embed(backbone.model, data_config, backbone.name, cfg, splits)
    skipped = {**dict(splits.skipped), **unreadable}
    result = audit(embeddings, folds=opts["folds"], seed=cfg.seed, similarity=similarity)

    report = AuditReport(result, skipped, top)
    report.save(output_dir(opts["out"]))
    return report
