"""The classifier users get back: pretrained backbone + new head, frozen BatchNorm kept in eval."""

from __future__ import annotations

from torch import Tensor, nn

from finetune.model.groups import LayerGroup


class Classifier(nn.Module):
    """``head(backbone(x))``. Layer groups: the backbone's, and ``head`` (the new classifier plus
    any backbone layers the group matcher leaves after the last block, such as a final norm).

    Norm layers listed in ``frozen_norms`` stay in eval mode across every ``.train()`` call
    (Lightning calls it at each epoch): with ``requires_grad=False`` alone, BatchNorm would
    still update its running statistics and normalize with batch statistics. The model's
    :class:`~finetune.model.freeze.FreezePlan` (``freeze_plan``) is the only writer of that list.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, backbone_groups: list[LayerGroup]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        groups = [LayerGroup(g.name, tuple(f"backbone.{n}" for n in g.param_names)) for g in backbone_groups]
        # The backbone's own head-side layers (a final norm) join the new classifier's group.
        pre_head = groups.pop().param_names if groups and groups[-1].name == "head" else ()
        head_names = pre_head + tuple(f"head.{n}" for n, _ in head.named_parameters())
        self.groups = groups + [LayerGroup("head", head_names)]
        self.frozen_norms: list[str] = []
        self.freeze_plan = None  # set by FreezePlan.apply

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for name in self.frozen_norms:
            self.get_submodule(name).eval()
        return self
