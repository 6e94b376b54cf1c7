"""``finetune audit``: what to look at in a data set before training on it (likely label errors,
near-duplicates, outliers, a k-fold accuracy with its interval). It reads; it changes no file."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from finetune.commands.args import output_dir, parse
from finetune.config import compose_config
from finetune.data.sources import load_data
from finetune.data.transforms import with_input_size
from finetune.errors import ConfigError
from finetune.model.build import backbone_from_config


def audit_command(args: Sequence[str]) -> int:
    """``finetune audit [folds=5] [top=24] [similarity=0.95] [out=DIR] data=... [backbone.name=...]``:
    out-of-fold probabilities of a linear probe on the pretrained backbone's features (k folds over
    every split, through the feature cache), then likely label errors ranked by confident learning
    (cleanlab), near-duplicate pairs (feature neighbours whose grey thumbnails correlate at
    `similarity` or more; train <-> val/test pairs are leaks), outliers, and the k-fold accuracy
    with its 95% interval. Writes audit.csv (one row per image, most suspect first), audit.json,
    suspects.png (given -> suggested label) and duplicates.png. The data are never changed: it
    tells you what to look at."""
    import numpy as np

    from finetune.use.audit import audit, check_folds
    from finetune.use.embed import embed

    opts, overrides = parse(args, {"folds": "5", "top": "24", "similarity": "0.95", "out": None}, "audit", "all")
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

    out = output_dir(opts["out"])
    written = [_write_csv(result.rows(), out / "audit.csv")]
    (out / "audit.json").write_text(json.dumps({**result.summary(), "skipped": skipped}, indent=2))
    written.append(out / "audit.json")
    from finetune.viz import audit as pictures

    written += [
        p
        for p in (
            pictures.suspects(result, out / "suspects.png", top),
            pictures.duplicates(result, out / "duplicates.png"),
        )
        if p is not None
    ]
    print("\n".join(summary_lines(result.summary(), skipped)))
    print(f"wrote {', '.join(p.name for p in written)} to {out}; no data file was changed")
    return 0


def summary_lines(summary: dict, skipped: dict[str, str]) -> list[str]:
    """One line per fact of an audit's `summary` (see :meth:`finetune.use.audit.Audit.summary`)."""
    per_split = ", ".join(f"{s} {n}" for s, n in summary["images_per_split"].items())
    low, high = summary["kfold_accuracy_95ci"]
    pairs, across, leaks = summary["duplicate_pairs"], summary["duplicate_pairs_across_splits"], summary["leaks"]
    lines = [
        f"audited {summary['images']} images ({per_split}), {len(summary['classes'])} classes, "
        f"{summary['backbone']} features, {summary['folds']}-fold linear probe",
        f"k-fold accuracy {summary['kfold_accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}) against the given labels",
        f"{summary['label_issues']} likely label errors (confident learning)"
        + (": the top rows of audit.csv, suspects.png" if summary["label_issues"] else ""),
        f"{pairs} near-duplicate pairs (thumbnails correlate >= {summary['duplicate_similarity']:g}), "
        f"{across} across splits" + (f", {leaks} of them train <-> val/test leaks" if leaks else ""),
        f"{summary['outliers']} outliers (far from every other image)",
    ]
    if skipped:
        shown = ", ".join(list(skipped)[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        lines.append(f"skipped {len(skipped)} unreadable files: {shown}")
    return lines


def _write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
