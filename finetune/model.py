"""The classifier users get back: pretrained backbone + new head, frozen BatchNorm kept in eval."""

from __future__ import annotations

from torch import Tensor, nn

from finetune.groups import LayerGroup


class Classifier(nn.Module):
    """``head(backbone(x))``. Its layer groups are the backbone's plus ``head``.

    Norm layers listed in ``frozen_norms`` stay in eval mode across every ``.train()`` call
    (Lightning calls it at each epoch): with ``requires_grad=False`` alone, BatchNorm would
    still update its running statistics and normalize with batch statistics.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, backbone_groups: list[LayerGroup]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.groups = [
            LayerGroup(g.name, tuple(f"backbone.{n}" for n in g.param_names)) for g in backbone_groups
        ] + [LayerGroup("head", tuple(f"head.{n}" for n, _ in head.named_parameters()))]
        self.frozen_norms: list[str] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for name in self.frozen_norms:
            self.get_submodule(name).eval()
        return self
