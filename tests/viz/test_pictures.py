"""Pictures of what the network learned: produced, non-trivial, and cropped where they should be."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import QUICK_WITH_PICTURES, TINY
from PIL import Image
from torch import nn

from finetune import fit
from finetune.commands import viz_command
from finetune.viz.pictures import top_patch_crops
from finetune.viz.receptive import ReceptiveField, output_size, patch_fields


def alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(),
    )


def footprint(model: nn.Module, layer: str, side: int, probes: int = 2) -> ReceptiveField:
    """Autograd's answer, independent of the tracer: the input rows with a non-zero gradient for
    the middle unit of `layer`'s output map (summed over channels, on `probes` random images),
    and their shift to the next unit (the stride)."""
    module = model.get_submodule(layer)

    def touched(unit: int | None):
        captured = {}
        handle = module.register_forward_hook(lambda m, inputs, output: captured.setdefault("out", output))
        x = torch.randn(probes, 3, side, side, generator=torch.Generator().manual_seed(0), requires_grad=True)
        try:
            model(x)
        finally:
            handle.remove()
        out = captured["out"]
        unit = out.shape[2] // 2 if unit is None else unit
        out[:, :, unit, unit].sum().backward()
        rows = torch.nonzero((x.grad.abs().sum(dim=(0, 1)) > 0).any(dim=1)).flatten()
        return int(rows.min()), int(rows.max()), unit

    was_training = model.training
    model.eval()  # BatchNorm normalizes with its running statistics: no unit sees the whole batch
    try:
        first, last, unit = touched(None)
        stride = touched(unit + 1)[0] - first
    finally:
        model.train(was_training)
    return ReceptiveField(
        last - first + 1, stride, (first + last) / 2 - unit * stride, clipped=first == 0 or last == side - 1
    )


def test_receptive_fields_match_known_networks_and_autograd():
    alex = alexnet_features()
    assert output_size(224, 11, 4, 2) == 55  # AlexNet conv1: 55x55
    field = patch_fields(alex, ["6"], 224)["6"]
    assert (field.size, field.stride, field.clipped) == (99, 16, False)  # conv3 of AlexNet sees 99x99 pixels, 16 apart
    assert field == footprint(alex, "6", 224)
    vgg = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1)
    )
    field = patch_fields(vgg, ["3"], 64)["3"]
    assert (field.size, field.stride) == (10, 2)  # 3 -> 5 -> 6 -> 10
    assert field == footprint(vgg, "3", 64)


def test_receptive_fields_follow_channels_last_blocks_and_global_gates():
    """ConvNeXt permutes to channels-last around its LayerNorm and MLP: the field survives;
    a squeeze-excitation gate really mixes every position, as autograd agrees."""
    import timm

    torch.manual_seed(0)
    convnext = timm.create_model("test_convnext", num_classes=0)
    field = patch_fields(convnext, ["stages.0"], 64)["stages.0"]
    assert not field.clipped and field == footprint(convnext, "stages.0", 64)

    gated = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), timm.layers.SqueezeExcite(4))
    field = patch_fields(gated, ["1"], 32)["1"]
    assert (field.size, field.clipped) == (32, True)
    assert footprint(gated, "1", 32).size == 32


def test_top_patch_of_a_hand_set_conv_is_the_white_square():
    """Sum-of-pixels filters: the unit that excites most sees exactly the 7x7 white square."""
    net = nn.Sequential(nn.Conv2d(3, 1, 5, bias=False), nn.Conv2d(1, 1, 3, stride=2, bias=False))
    for conv in net:
        nn.init.constant_(conv.weight, 1.0)
    field = patch_fields(net, ["1"], 32)["1"]
    assert (field.size, field.stride, field.clipped) == (7, 2, False)
    images = np.zeros((3, 32, 32, 3), np.uint8)
    squares = [(10, 14), (0, 0), (24, 6)]  # top-left corners, on the stride-2 grid
    for image, (top, left) in zip(images, squares):
        image[top : top + 7, left : left + 7] = 255
    brightness = [1.0, 0.9, 0.8]
    images = (images * np.array(brightness)[:, None, None, None]).astype(np.uint8)
    with torch.no_grad():
        out = net(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    flat = out.flatten(2)
    peaks, index = flat.max(dim=2)
    positions = torch.stack([index // out.shape[3], index % out.shape[3]], dim=2)
    _, crops = top_patch_crops(images, peaks, positions, field, channels=1, top_k=3)
    for crop, level in zip(crops, brightness):
        assert crop.shape == (7, 7, 3) and (crop == int(255 * level)).all()


@pytest.fixture(scope="module")
def run_with_pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz")
    from conftest import write_class_folders

    write_class_folders(root / "data" / "train", per_class=8)
    write_class_folders(root / "data" / "val", per_class=4, seed=1)
    return fit(
        "full_finetune",
        TINY
        + QUICK_WITH_PICTURES
        + ["data=folder", f"data.root={root / 'data'}", "trainer.max_epochs=2", f"hydra.run.dir={root / 'run'}"],
    ), root


def test_every_run_leaves_named_non_trivial_pictures_and_an_index(run_with_pictures):
    result, _ = run_with_pictures
    viz = result.output_dir / "viz"
    names = {p.stem for p in viz.glob("*.png")}
    assert {
        "filters",
        "curves",
        "confusion",
        "patches_stage1",
        "patches_stage4",
    } <= names  # named as the tables name groups
    for png in viz.glob("*.png"):
        pixels = np.asarray(Image.open(png).convert("L"), np.float32)
        assert pixels.shape[0] > 100 and pixels.std() > 10, png.name  # not blank
    index = (viz / "index.md").read_text()
    assert all(f"({name}.png)" in index for name in names)
    assert result.outputs["pictures"] == viz / "index.md"


def test_viz_command_redraws_them_from_a_checkpoint(run_with_pictures, tmp_path):
    result, root = run_with_pictures
    assert viz_command([f"ckpt={result.best_checkpoint}", f"input={root / 'data' / 'val'}", f"out={tmp_path}"]) == 0
    assert {"filters", "curves", "confusion"} <= {p.stem for p in tmp_path.glob("*.png")}


def test_viz_can_be_turned_off(tmp_path, image_folder):
    result = fit(
        None,
        TINY
        + QUICK_WITH_PICTURES
        + ["viz=none", "data=folder", f"data.root={image_folder}", f"hydra.run.dir={tmp_path}"],
    )
    assert not (tmp_path / "viz").exists() and "pictures" not in result.outputs
