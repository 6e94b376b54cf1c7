"""Every temporary eval pass hands back each module's own train/eval mode: a freeze plan keeps
BatchNorm layers in eval mode inside a model in training mode, and ``model.train(was_training)``
would put them back into training (batch statistics under a head fitted on running statistics)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from finetune.model.backbone import _output_width, build_backbone
from finetune.model.classifier import Classifier
from finetune.model.freeze import apply_freeze
from finetune.model.head import build_head
from finetune.model.modes import evaluating


@pytest.fixture
def planned():
    """A tiny real timm ResNet in training mode whose backbone BatchNorm layers a freeze plan keeps in eval."""
    backbone = build_backbone("test_resnet", "random")
    model = Classifier(backbone.model, build_head(backbone.num_features, 3), backbone.groups)
    apply_freeze(model, trainable_batchnorm="eval")
    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    assert any(modes.values()) and not all(modes.values())
    return model, modes


def modes_of(model):
    return {name: m.training for name, m in model.named_modules()}


def test_evaluating_puts_every_mode_back_after_an_error_too(planned):
    model, modes = planned
    with pytest.raises(RuntimeError, match="inside"):
        with evaluating(model) as inside:
            assert inside is model and not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert modes_of(model) == modes


def test_the_passes_that_evaluate_for_a_moment_keep_the_freeze_plans_modes(planned):
    from finetune.compute.features import _on_device
    from finetune.compute.speed import forward_images_per_second
    from finetune.train.trust import _head_outputs, _image_outputs
    from finetune.viz.receptive import trace_fields

    model, modes = planned
    # The feature pass: a cold LP-FT probe once handed every BatchNorm back in training mode, and
    # its fine-tuning then ran on batch statistics.
    with _on_device(model.backbone, SimpleNamespace(device=torch.device("cpu"), channels_last=False)):
        assert not any(m.training for m in model.backbone.modules())
    assert modes_of(model) == modes
    assert _output_width(model.backbone, (3, 32, 32)) == model.backbone.num_features
    assert modes_of(model) == modes
    speed = SimpleNamespace(device=torch.device("cpu"), channels_last=False, autocast_dtype=None)
    assert forward_images_per_second(model.backbone, (3, 32, 32), speed, seconds=0.01, batch_size=2) > 0
    assert modes_of(model) == modes
    assert trace_fields(model.backbone, ["conv1"], (3, 32, 32))["conv1"] is not None
    assert modes_of(model) == modes
    # The end of a run's calibration: the head on cached features, or the model on images.
    module = SimpleNamespace(model=model, classes=["a", "b", "c"])
    cached = SimpleNamespace(
        features={"val": torch.randn(2, model.backbone.num_features)}, labels={"val": torch.ones(2)}
    )
    assert _head_outputs(module, cached, "val", 2)[0].shape == (2, 3)
    assert modes_of(model) == modes
    data_config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    assert _image_outputs(module, [(image, 1)], data_config | {"crop_pct": 1.0}, 2)[0].shape == (1, 3)
    assert modes_of(model) == modes
