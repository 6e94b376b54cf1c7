"""The CLI's subcommands besides training: each takes Hydra overrides and returns an exit code."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from finetune.config import compose_config
from finetune.data.check import check_data
from finetune.data.images import UnreadableImage, load_rgb
from finetune.data.sources import SPLITS
from finetune.optim import param_groups
from finetune.summary import groups_table
from finetune.train import backbone_from_config, build_model, load_data


def check_data_command(overrides: Sequence[str]) -> int:
    """``finetune check-data data=...``: the pre-run data check, plus a full decode of every file."""
    cfg = compose_config(overrides)
    splits = load_data(cfg.data, cfg.seed)
    paths = [item for split in SPLITS for item, _ in getattr(splits, split) if isinstance(item, str)]
    failures = {}
    for path in tqdm(paths, desc="decoding", unit="img", disable=not paths):
        try:
            load_rgb(path)
        except UnreadableImage as err:
            failures[path] = str(err)
    report = check_data(splits)
    report.add_unreadable(failures)
    print(report.table())
    return 0


def show_groups_command(overrides: Sequence[str]) -> int:
    """``finetune show-groups backbone.name=NAME``: the layer-group table of a run, without
    downloading weights or training (the head is sized for the configured data's classes)."""
    cfg = compose_config(overrides)
    classes = load_data(cfg.data, cfg.seed).classes
    backbone = backbone_from_config(cfg, weights="random")
    model = build_model(backbone, len(classes), cfg.head, cfg.freeze)
    groups = param_groups(model, cfg.optimizer.lr, 0.0, cfg.optimizer.get("layer_decay", 1.0))
    print(f"backbone: {cfg.backbone.name}, {len(classes)} classes, freeze: {dict(cfg.freeze)}")
    print(groups_table(model, {g["name"].split("/")[0]: g["lr"] for g in groups}))
    return 0


COMMANDS = {"check-data": check_data_command, "show-groups": show_groups_command}
