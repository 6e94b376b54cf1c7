"""Pictures of what the network learned: produced, non-trivial, and cropped where they should be."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import QUICK, QUICK_WITH_PICTURES, TINY
from finetune import fit
from finetune.commands import viz_command
from finetune.viz.pictures import top_patch_crops
from finetune.viz.receptive import conv_arithmetic, measure, output_size


def alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
    )


def test_receptive_field_arithmetic_matches_known_networks_and_autograd():
    alex = alexnet_features()
    assert output_size(224, 11, 4, 2) == 55  # AlexNet conv1: 55x55
    field = conv_arithmetic(list(alex))
    assert (field.size, field.stride) == (99, 16)  # conv3 of AlexNet sees 99x99 pixels, 16 apart
    assert measure(alex, alex[6], 224) == field
    vgg = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1))
    assert (conv_arithmetic(list(vgg)).size, conv_arithmetic(list(vgg)).stride) == (10, 2)  # 3 -> 5 -> 6 -> 10
    assert measure(vgg, vgg[3], 64) == conv_arithmetic(list(vgg))


def test_top_patch_of_a_hand_set_conv_is_the_white_square():
    """Sum-of-pixels filters: the unit that excites most sees exactly the 7x7 white square."""
    net = nn.Sequential(nn.Conv2d(3, 1, 5, bias=False), nn.Conv2d(1, 1, 3, stride=2, bias=False))
    for conv in net:
        nn.init.constant_(conv.weight, 1.0)
    field = measure(net, net[1], 32)
    assert (field.size, field.stride, field.clipped) == (7, 2, False)
    images = np.zeros((3, 32, 32, 3), np.uint8)
    squares = [(10, 14), (0, 0), (24, 6)]  # top-left corners, on the stride-2 grid
    for image, (top, left) in zip(images, squares):
        image[top:top + 7, left:left + 7] = 255
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
    return fit("full_finetune", TINY + QUICK_WITH_PICTURES + ["data=folder", f"data.root={root / 'data'}", "trainer.max_epochs=2",
                                                f"hydra.run.dir={root / 'run'}"]), root


def test_every_run_leaves_named_non_trivial_pictures_and_an_index(run_with_pictures):
    result, _ = run_with_pictures
    viz = result.output_dir / "viz"
    names = {p.stem for p in viz.glob("*.png")}
    assert {"filters", "curves", "confusion", "patches_layer1", "patches_layer4"} <= names
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
    result = fit(None, TINY + QUICK_WITH_PICTURES + ["viz=none", "data=folder", f"data.root={image_folder}", f"hydra.run.dir={tmp_path}"])
    assert not (tmp_path / "viz").exists() and "pictures" not in result.outputs
