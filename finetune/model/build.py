"""A run's network from its config: the backbone, a new head, and the freezing plan applied.

Shared by training, by loading a checkpoint (``finetune.load``) and by the inspecting commands,
so that all three build exactly the same module structure.
"""

from __future__ import annotations

from collections.abc import Mapping

from finetune.model.backbone import Backbone, build_backbone
from finetune.model.classifier import Classifier
from finetune.model.freeze import FreezePlan
from finetune.model.head import build_head

# checkpoint[CHECKPOINT_KEY] = {"classes": [...], "config": {...}}: what rebuilds the model.
CHECKPOINT_KEY = "finetune"


def backbone_from_config(cfg: Mapping, weights: str | None = None) -> Backbone:
    """The run's backbone; `weights` overrides ``cfg.backbone.weights`` (``random`` to inspect).

    Built for ``cfg.data.image_size`` (null: the backbone's own size), so that a fixed-size model
    (ViT, Swin, ...) takes the run's images and a checkpoint rebuilds at the size it trained at.
    """
    return build_backbone(
        cfg["backbone"]["name"],
        weights or cfg["backbone"]["weights"],
        cfg["backbone"]["drop_rate"],
        cfg["head"].get("pool"),
        image_size=(cfg.get("data") or {}).get("image_size"),
        drop_path_rate=cfg["backbone"].get("drop_path_rate"),
    )  # absent in older checkpoints


def build_model(backbone: Backbone, num_classes: int, head_cfg: Mapping, freeze_cfg: Mapping) -> Classifier:
    """`backbone` with a new head for `num_classes`, frozen as ``freeze_cfg`` plans it
    (``model.freeze_plan``)."""
    head = build_head(backbone.num_features, num_classes, head_cfg["hidden"], head_cfg["dropout"], head_cfg.get("norm"))
    model = Classifier(backbone.model, head, backbone.groups)
    FreezePlan.from_config(model, freeze_cfg).apply(model)
    return model
