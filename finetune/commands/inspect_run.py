"""Look before training: ``finetune check-data`` and ``finetune show-groups`` (config overrides in)."""

from __future__ import annotations

from collections.abc import Sequence

from finetune.commands.args import readable_batches
from finetune.config import compose_config
from finetune.data.check import NEAR_BLANK_SHARE, check_data, near_blank_share
from finetune.data.sources import SPLITS, load_data
from finetune.data.transforms import with_input_size
from finetune.model.build import backbone_from_config, build_model
from finetune.model.summary import groups_table
from finetune.train.optim import group_lrs


def check_data_command(overrides: Sequence[str]) -> int:
    """``finetune check-data data=...``: the pre-run data check, plus a full decode of every file
    (unreadable files are listed as skipped, near-blank placeholders as a warning)."""
    print(full_check(overrides).table())
    return 0


def full_check(overrides: Sequence[str]):
    """:func:`check_data_command`'s :class:`~finetune.data.check.DataReport` (also
    :func:`finetune.check_data`'s)."""
    cfg = compose_config(overrides)
    splits = load_data(cfg.data, cfg.seed, cfg.get("task", "multiclass"))
    failures: dict[str, str] = {}
    near_blank = []
    for images, names, _ in readable_batches([s for split in SPLITS for s in getattr(splits, split)], 64, failures):
        near_blank += [n for image, n in zip(images, names) if near_blank_share(image) >= NEAR_BLANK_SHARE]
    report = check_data(splits, cfg.data.batch_size)
    report.add_unreadable(failures)
    report.add_near_blank(near_blank)
    return report


def show_groups_command(overrides: Sequence[str]) -> int:
    """``finetune show-groups backbone.name=NAME``: the layer-group table of a run, without
    downloading weights or training (the head is sized for the configured data's classes), then
    each group's output shape, stride, receptive field and multiply-adds at the run's input size."""
    from finetune.viz.anatomy import anatomy, anatomy_table

    cfg = compose_config(overrides)
    classes = load_data(cfg.data, cfg.seed, cfg.get("task", "multiclass")).classes
    backbone = backbone_from_config(cfg, weights="random")
    model = build_model(backbone, len(classes), cfg.head, cfg.freeze)
    print(f"backbone: {cfg.backbone.name}, {len(classes)} classes, freeze: {dict(cfg.freeze)}")
    print(groups_table(model, group_lrs(model, cfg.optimizer)))
    input_size = with_input_size(backbone.data_config, cfg.data.image_size)["input_size"]
    print(f"\nat input {'x'.join(map(str, input_size))} (data.image_size={cfg.data.image_size}):")
    print(anatomy_table(anatomy(model, model.groups, input_size)))
    return 0
