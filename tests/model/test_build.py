"""Every family of backbone meets one contract, at the default data's image size and at 224 px:
built from a composed config, named layer groups (stem, stage1.., head) holding every parameter
once, freeze=all_but_head leaving only the head trainable, a printable group table, and a real
optimizer step. Fixed-size models (ViT, DeiT, Swin) are created at the run's size; a size their
architecture cannot take is a one-line ConfigError naming data.image_size."""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from finetune.commands import show_groups_command
from finetune.config import compose_config
from finetune.errors import ConfigError
from finetune.model.backbone import build_backbone
from finetune.model.build import backbone_from_config, build_model
from finetune.model.summary import groups_table
from finetune.train.optim import group_lrs

DEFAULT_SIZE = compose_config([]).data.image_size  # the default data's (digits: 64 px)
ALEXNET_GROUPS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "head"]

# (family, backbone.name, layer groups: a list, or the number of stages between stem and head)
FAMILIES = [
    ("resnet", "test_resnet", 4),
    ("convnext", "test_convnext", 4),
    ("efficientnet", "test_efficientnet", 5),
    ("mobilenetv3", "mobilenetv3_small_050", 6),
    ("regnet", "regnetx_002", 4),
    ("vit", "test_vit", 6),
    ("deit", "deit_tiny_patch16_224", 12),
    ("swin", "swin_tiny_patch4_window7_224", 4),  # timm has no Swin smaller than tiny (28M)
    ("torchvision-resnet18", "torchvision:resnet18", 4),
    ("torchvision-alexnet", "torchvision:alexnet", ALEXNET_GROUPS),
]
FIXED_SIZE = {"test_vit", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"}


def _cases():
    for family, name, groups in FAMILIES:
        for size in (DEFAULT_SIZE, 224):
            yield pytest.param(name, groups, size, id=f"{family}-{size}")


def _expected_groups(groups) -> list[str]:
    if isinstance(groups, list):
        return groups
    return ["stem"] + [f"stage{i}" for i in range(1, groups + 1)] + ["head"]


@pytest.mark.parametrize(("name", "groups", "size"), list(_cases()))
def test_family_builds_groups_freezes_and_trains(name, groups, size, capsys):
    torch.manual_seed(0)
    cfg = compose_config([f"backbone.name={name}", "backbone.weights=random", f"data.image_size={size}"])
    backbone = backbone_from_config(cfg)
    model = build_model(backbone, 10, cfg.head, cfg.freeze)

    if name in FIXED_SIZE:  # created at the run's size, and its data config says so
        assert backbone.data_config["input_size"] == (3, size, size)
    names = [g.name for g in model.groups]
    assert names == _expected_groups(groups)
    grouped = [p for g in model.groups for p in g.param_names]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    assert set(model.groups[-1].param_names) >= {f"head.{n}" for n, _ in model.head.named_parameters()}

    table = groups_table(model, group_lrs(model, cfg.optimizer))
    print(table)
    assert [line.split()[0] for line in table.splitlines()[2:-1]] == names
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in capsys.readouterr().out

    # One real optimizer step on two images at the run's size: every layer trains.
    head_before = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, size, size)), torch.tensor([0, 1]))
    assert math.isfinite(loss.item())
    loss.backward()
    stem = dict(model.named_parameters())[model.groups[0].param_names[0]]
    assert stem.grad is not None and stem.grad.abs().sum() > 0  # the gradient reaches the input layer
    optimizer.step()
    assert any(not torch.equal(p, head_before[n]) for n, p in model.head.named_parameters())

    frozen_cfg = compose_config([f"backbone.name={name}", "backbone.weights=random", "freeze=all_but_head"])
    frozen = build_model(backbone, 10, cfg.head, frozen_cfg.freeze)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(frozen.groups[-1].param_names)


def test_a_null_image_size_keeps_the_native_size():
    backbone = build_backbone("test_vit", "random", image_size=None)
    assert backbone.data_config["input_size"] == timm.models.get_pretrained_cfg("test_vit").input_size == (3, 160, 160)
    assert backbone.model.eval()(torch.zeros(1, 3, 160, 160)).shape == (1, backbone.num_features)


def test_convolutional_models_ignore_the_image_size():
    """No img_size reaches a model that takes any size: same weights, same data config, same outputs."""
    torch.manual_seed(0)
    plain = build_backbone("test_resnet", "random")
    torch.manual_seed(0)
    sized = build_backbone("test_resnet", "random", image_size=DEFAULT_SIZE)
    assert plain.data_config == sized.data_config
    assert all(torch.equal(v, sized.model.state_dict()[k]) for k, v in plain.model.state_dict().items())
    x = torch.randn(1, 3, DEFAULT_SIZE, DEFAULT_SIZE)
    assert torch.equal(plain.model.eval()(x), sized.model.eval()(x))


def test_a_size_the_architecture_cannot_take_is_a_config_error_naming_one_that_can():
    cfg = compose_config(["backbone.name=test_vit", "backbone.weights=random", "data.image_size=65"])
    with pytest.raises(ConfigError, match=r"data\.image_size") as caught:
        backbone_from_config(cfg)  # 16 px patches do not tile 65 px
    message = str(caught.value)
    assert "\n" not in message and "65x65" in message
    suggested = int(re.search(r"data\.image_size=(\d+)", message).group(1))
    backbone = build_backbone("test_vit", "random", image_size=suggested)
    assert backbone.model.eval()(torch.zeros(1, 3, suggested, suggested)).shape == (1, backbone.num_features)


def test_a_native_size_weights_file_is_resampled_and_verified(tmp_path):
    source = timm.create_model("test_vit")
    save_file(source.state_dict(), str(tmp_path / "vit.safetensors"))
    backbone = build_backbone("test_vit", str(tmp_path / "vit.safetensors"), image_size=DEFAULT_SIZE)
    state, grid = backbone.model.state_dict(), DEFAULT_SIZE // 16
    expected = timm.layers.resample_abs_pos_embed(source.state_dict()["pos_embed"], (grid, grid), num_prefix_tokens=1)
    assert torch.allclose(state["pos_embed"], expected)  # timm's own resampling of the position grid
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items() if k != "pos_embed" and k in state)
    assert "resampled" in str(backbone.weights) and backbone.weights.verified_tensors > 0

    # A checkpoint of a run at this size (prefixed keys, resized grid) loads as it is.
    torch.save({"state_dict": {f"model.backbone.{k}": v for k, v in state.items()}}, tmp_path / "run.ckpt")
    again = build_backbone("test_vit", str(tmp_path / "run.ckpt"), image_size=DEFAULT_SIZE)
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in state.items())


def test_show_groups_of_a_vit_on_the_default_data(capsys):
    assert show_groups_command(["backbone.name=vit_small_patch16_224", "backbone.weights=random"]) == 0
    out = capsys.readouterr().out
    assert f"at input 3x{DEFAULT_SIZE}x{DEFAULT_SIZE}" in out
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"stem", "stage1", "stage12", "head"} <= rows
