"""The classic networks as backbones: torchvision models and LeNet-5 meet the Backbone contract,
their anatomy (shapes, strides, receptive fields, multiply-adds) matches the literature and a
gradient measurement, their weights load verified, and they train through the real fit()."""

from __future__ import annotations

import math
import urllib.error

import pytest
import torch
from conftest import QUICK, TINY
from safetensors.torch import save_file
from test_pictures import footprint
from torchvision import models as tv_models

import finetune
from finetune.commands import show_groups_command
from finetune.errors import ConfigError, WeightsError
from finetune.model.backbone import build_backbone
from finetune.model.head import build_head
from finetune.model.lenet import C3_TABLE, LeNet5
from finetune.model.torchvision_backbones import torchvision_data_config
from finetune.use.export import export
from finetune.viz import receptive as receptive_module
from finetune.viz.anatomy import anatomy
from finetune.viz.receptive import FieldTraceError, trace_fields

# name -> (small input side the network accepts, group names, feature width). VGG-16 is built
# once (138M parameters, 102M of them in fc6: ~0.5 GB) and never trained through fit() here.
CLASSICS = {
    "torchvision:alexnet": (64, ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"], 4096),
    "torchvision:vgg16": (32, ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"], 4096),
    "torchvision:googlenet": (32, ["stem", "inception3", "inception4", "inception5"], 1024),
    "torchvision:inception_v3": (75, ["stem", "mixed5", "mixed6", "mixed7"], 2048),
    "torchvision:resnet18": (32, ["stem", "stage1", "stage2", "stage3", "stage4"], 512),
    "lenet5": (32, ["c1", "s2", "c3", "s4", "c5", "f6"], 84),
}
_BUILT: dict = {}


def built(name: str):
    """Each classic network with random weights, built once per test session (seeded)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = build_backbone(name, "random")
    return _BUILT[name]


@pytest.mark.parametrize("name", list(CLASSICS))
def test_classic_backbone_contract_forward_backward_and_groups(name):
    size, group_names, width = CLASSICS[name]
    backbone = built(name)
    assert backbone.num_features == width
    assert [g.name for g in backbone.groups] == group_names
    grouped = [n for g in backbone.groups for n in g.param_names]
    assert sorted(grouped) == sorted(n for n, _ in backbone.model.named_parameters())  # each once
    head = build_head(backbone.num_features, 3)
    backbone.model.train()  # GoogLeNet/Inception return a tuple here when aux classifiers remain
    features = backbone.model(torch.randn(2, 3, size, size))
    assert isinstance(features, torch.Tensor) and features.shape == (2, width)
    torch.nn.functional.cross_entropy(head(features), torch.tensor([0, 2])).backward()
    first = backbone.model.get_submodule(backbone.groups[0].param_names[0].rsplit(".", 1)[0])
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0  # gradient reaches the input layer
    backbone.model.zero_grad(set_to_none=True)
    assert set(backbone.data_config) >= {"input_size", "mean", "std", "interpolation", "crop_pct"}


def test_data_config_comes_from_the_weights_transforms():
    inception = torchvision_data_config("inception_v3")
    assert inception["input_size"] == (3, 299, 299) and inception["interpolation"] == "bilinear"
    assert math.floor(299 / inception["crop_pct"]) == 342  # resize 342, crop 299, as torchvision evaluates
    resnet50 = torchvision_data_config("resnet50")  # DEFAULT = IMAGENET1K_V2: resize 232
    assert math.floor(224 / resnet50["crop_pct"]) == 232
    assert math.floor(224 / torchvision_data_config("resnet50", "IMAGENET1K_V1")["crop_pct"]) == 256
    assert torchvision_data_config("alexnet")["mean"] == (0.485, 0.456, 0.406)


# --- anatomy: the literature's numbers, a gradient measurement, torchvision's metadata ----------


def test_alexnet_and_vgg16_receptive_fields_match_the_literature():
    alexnet = anatomy(built("torchvision:alexnet").model, built("torchvision:alexnet").groups, (3, 224, 224))
    rows = {g.name: g for g in alexnet.groups}
    # conv1: 11x11 kernels at stride 4 -> 55x55 maps (torchvision pads 2 at 224 where the paper
    # used 227 without padding; (224 + 4 - 11) // 4 + 1 = 55).
    assert rows["conv1"].shape == (64, 55, 55) and rows["conv1"].stride == "4" and rows["conv1"].receptive_field == "11"
    assert (rows["conv3"].receptive_field, rows["conv3"].stride) == ("99", "16")
    assert (rows["conv5"].receptive_field, rows["conv5"].shape) == ("163", (256, 13, 13))
    assert rows["fc7"].receptive_field == "global" and rows["fc7"].shape == (4096,)

    vgg = built("torchvision:vgg16").model
    rows = {g.name: g for g in anatomy(vgg, built("torchvision:vgg16").groups, (3, 224, 224)).groups}
    assert (rows["conv1"].receptive_field, rows["conv1"].shape) == ("5", (64, 224, 224))  # two 3x3 = one 5x5
    assert (rows["conv3"].receptive_field, rows["conv3"].stride) == ("40", "4")
    assert (rows["conv5"].receptive_field, rows["conv5"].stride, rows["conv5"].shape) == ("196", "16", (512, 14, 14))
    # After pool5: 212 px, effective stride 32, effective padding 90 (Araujo et al., Distill 2019).
    rows_, cols = trace_fields(vgg, ["features.30"], (3, 224, 224))["features.30"]
    assert (rows_.size, rows_.jump, -rows_.lo) == (212, 32, 90) and cols == rows_


@pytest.mark.parametrize(
    "name, layer, size", [("torchvision:resnet18", "layer2", 128), ("torchvision:googlenet", "inception3a", 64)]
)
def test_traced_receptive_fields_equal_the_gradient_footprint(name, layer, size):
    """Residual and Inception branches: the widest path is the field, as autograd sees it."""
    model = built(name).model
    rows, _ = trace_fields(model, [layer], (3, size, size))[layer]
    measured = footprint(model, layer, size)
    assert not measured.clipped
    assert (rows.size, rows.jump) == (measured.size, measured.stride)
    assert (rows.lo + rows.hi) / 2 == measured.offset


@pytest.mark.parametrize("name", ["torchvision:alexnet", "torchvision:googlenet", "torchvision:resnet18"])
def test_multiply_adds_match_torchvision_metadata(name):
    arch = name.split(":")[1]
    backbone = built(name)
    size = backbone.data_config["input_size"]
    result = anatomy(backbone.model, backbone.groups, size)
    classifier = backbone.num_features * 1000  # the ImageNet classifier our backbone has dropped
    expected = tv_models.get_model_weights(arch).DEFAULT.meta["_ops"] * 1e9  # GFLOPS in its docs = G mult-adds
    assert abs(result.macs + classifier - expected) / expected < 0.01
    assert sum(g.macs for g in result.groups) <= result.macs
    assert result.checked_ops >= 5


def test_lenet5_anatomy_is_the_papers():
    model = LeNet5()
    result = anatomy(model, built("lenet5").groups, (3, 32, 32))
    table = {g.name: (g.shape, g.stride, g.receptive_field) for g in result.groups}
    assert table == {
        "c1": ((6, 28, 28), "1", "5"),
        "s2": ((6, 14, 14), "2", "6"),
        "c3": ((16, 10, 10), "2", "14"),
        "s4": ((16, 5, 5), "4", "16"),
        "c5": ((120, 1, 1), "4", "32"),
        "f6": ((84,), "global", "global"),
    }
    # The paper's trainable parameters: C1 156, S2 12, C3 1,516, S4 32, C5 48,120, F6 10,164.
    connected = int(model.c3.mask.sum().item()) * 25 + 16
    assert connected == 1516 and sum(len(inputs) for inputs in C3_TABLE) == 60
    params = {g.name: g.params for g in result.groups}
    assert params == {"c1": 156, "s2": 12, "c3": 2416, "s4": 32, "c5": 48120, "f6": 10164}
    assert int((model.c3.weight != 0).sum()) == 1500  # the unconnected kernels hold zeros


def test_shape_check_is_live(monkeypatch):
    """A wrong formula must be caught by the forward pass, not printed."""
    monkeypatch.setattr(receptive_module, "output_size", lambda size, *a, **k: size)
    with pytest.raises(FieldTraceError, match="arithmetic gives"):
        anatomy(LeNet5(), built("lenet5").groups, (3, 32, 32))


def test_show_groups_prints_the_anatomy(capsys):
    assert show_groups_command(["backbone=lenet5", "data.image_size=32"]) == 0
    out = capsys.readouterr().out
    assert "at input 3x32x32" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["c5", "120x1x1", "4", "32", "48,120", "48K"] in lines
    assert ["c1", "6x28x28", "1", "5", "156", "118K"] in lines
    assert "checked against the forward pass at 5 convolutions/poolings" in out


def test_show_groups_anatomy_works_for_timm_backbones(capsys):
    assert show_groups_command(TINY) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    rows = {line[0]: line for line in lines if len(line) == 6 and line[0] in ("stem", "stage2", "stage4", "head")}
    assert rows["stem"][1:3] == ["32x16x16", "2"] and rows["stage4"][1:3] == ["96x1x1", "32"]  # test_resnet, 32 px
    assert rows["head"][1:4] == ["10", "global", "global"]
    # The printed field is the one autograd measures (at 64 px, where stage2's field fits the image),
    # once the residual branches carry gradient: timm zero-initializes each block's last BatchNorm.
    backbone = build_backbone("test_resnet", "random")
    for module in backbone.model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    measured = footprint(backbone.model, "layer2", 64)
    assert not measured.clipped and rows["stage2"][3] == str(measured.size)


# --- weights -----------------------------------------------------------------------------------


def test_local_weight_files_round_trip_and_aux_tensors_are_ignored(tmp_path):
    torch.manual_seed(3)
    source = tv_models.resnet18()  # torchvision's own layout, ImageNet classifier included
    state = source.state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "resnet18.safetensors")
    for path in (tmp_path / "resnet18.pth", tmp_path / "resnet18.safetensors"):
        torch.manual_seed(4)  # another random init: equality proves loading
        backbone = build_backbone("torchvision:resnet18", str(path))
        loaded = backbone.model.state_dict()
        assert backbone.weights.verified_tensors == len(loaded)
        assert all(torch.equal(loaded[k], state[k]) for k in loaded)
        assert "fc.weight" not in loaded
    # torchvision's GoogLeNet files carry auxiliary classifiers (aux1, aux2): ignored, the rest verified.
    googlenet = tv_models.googlenet(aux_logits=True, init_weights=False)  # torch's default init: fast
    torch.save(googlenet.state_dict(), tmp_path / "googlenet.pth")
    backbone = build_backbone("torchvision:googlenet", str(tmp_path / "googlenet.pth"))
    assert backbone.weights.verified_tensors == len(backbone.model.state_dict())
    assert torch.equal(backbone.model.conv1.conv.weight, googlenet.conv1.conv.weight)


def test_wrong_weight_files_fail_loudly(tmp_path):
    torch.save(tv_models.mobilenet_v3_small().state_dict(), tmp_path / "mobilenet.pth")
    with pytest.raises(WeightsError, match="does not hold weights for this backbone"):
        build_backbone("torchvision:resnet18", str(tmp_path / "mobilenet.pth"))
    state = tv_models.resnet18().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="wrong shape"):
        build_backbone("torchvision:resnet18", str(tmp_path / "bad.pth"))
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(WeightsError, match="Refusing to load|not a readable torch file"):
        build_backbone("torchvision:resnet18", str(tmp_path / "text.pth"))
    with pytest.raises(ConfigError, match="no such file"):
        build_backbone("torchvision:resnet18", str(tmp_path / "missing.pth"))


def test_hub_weights_are_verified_and_offline_says_how_to_pass_a_file(monkeypatch):
    hub = tv_models.resnet18().state_dict()
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda url, **kw: hub)
    backbone = build_backbone("torchvision:resnet18", "pretrained")
    assert str(backbone.weights).startswith("torchvision ResNet18_Weights.IMAGENET1K_V1")
    assert backbone.weights.verified_tensors == len(backbone.model.state_dict())
    assert torch.equal(backbone.model.conv1.weight, hub["conv1.weight"])

    def offline(url, **kw):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"backbone\.weights=/path/to/resnet18-f37072fd\.pth"):
        build_backbone("torchvision:resnet18", "IMAGENET1K_V1")


@pytest.mark.parametrize(
    "name, weights, pool, message",
    [
        ("torchvision:alexnett", "random", None, "Did you mean: torchvision:alexnet"),
        ("torchvision:resnet18", "IMAGENET9K", None, "IMAGENET1K_V1"),
        ("torchvision:resnet18", "VGG16_Weights.IMAGENET1K_V1", None, "IMAGENET1K_V1"),
        ("torchvision:squeezenet1_0", "random", None, "no linear classifier"),
        ("torchvision:alexnet", "random", "max", "Leave head.pool=null"),
        ("lenet5", "pretrained", None, "LeNet-5 has no pretrained weights"),
        ("lenet5", "random", "avg", "Leave head.pool=null"),
    ],
)
def test_config_mistakes_are_config_errors(name, weights, pool, message):
    with pytest.raises(ConfigError, match=message):
        build_backbone(name, weights, global_pool=pool)


@pytest.mark.parametrize("name, side, needed", [("torchvision:inception_v3", 64, 75), ("lenet5", 28, 32)])
def test_too_small_inputs_are_config_errors(name, side, needed):
    with pytest.raises(
        ConfigError, match=f"at least {needed}x{needed} px, got {side}x{side}: set data.image_size={needed}"
    ):
        built(name).model(torch.zeros(1, 3, side, side))


def test_head_pool_replaces_torchvision_global_pooling():
    backbone = build_backbone("torchvision:resnet18", "random", global_pool="catavgmax")
    assert backbone.num_features == 1024
    assert backbone.model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1024)


# --- training through fit() ----------------------------------------------------------------------

FEW_BATCHES = QUICK + ["data.batch_size=16", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2"]


@pytest.mark.parametrize("name", ["torchvision:alexnet", "torchvision:googlenet"])
def test_classic_head_trains_through_fit_and_reloads(name, tmp_path):
    size = CLASSICS[name][0]
    result = finetune.fit(
        "freeze_all_but_head",
        [
            f"backbone.name={name}",
            "backbone.weights=random",
            f"data.image_size={size}",
            f"hydra.run.dir={tmp_path}",
            *FEW_BATCHES,
        ],
    )
    assert math.isfinite(result.metrics["train/loss"]) and 0 <= result.metrics["val/acc"] <= 1
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    # The checkpoint rebuilds the same network (GoogLeNet's transform_input included).
    loaded = finetune.load(result.best_checkpoint)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), result.model.eval()(x), atol=1e-5)
    # Not a timm model: the safetensors export keeps finetune's layout, parity-checked.
    exported = export(loaded, "safetensors", tmp_path / "export", x)
    assert exported.max_abs_diff <= 1e-4 and exported.path.is_file()


def test_lenet5_from_scratch_learns_the_digits(tmp_path):
    result = finetune.fit("lenet_from_scratch", QUICK + ["trainer.max_epochs=3", f"hydra.run.dir={tmp_path}"])
    assert result.metrics["val/acc"] >= 0.9  # chance is 0.1; 10 epochs reach 0.98
    model = result.model.backbone
    assert int((model.c3.weight != 0).sum()) == 1500  # unconnected C3 kernels never trained
