"""In-memory inputs to predict: PIL images and arrays go through the same loader as files.

A PIL image gives exactly the tensor of the file it came from (EXIF rotation, transparency on
white, 16-bit scaling, palette/CMYK/grayscale to RGB); float arrays in [0, 1] and uint16 arrays
are scaled like images; anything ambiguous is a ValueError naming the expected shape and dtype.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from finetune.data.images import as_rgb_array, load_rgb
from finetune.use.load import FinetunedModel

DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
}


@pytest.fixture(scope="module")
def model() -> FinetunedModel:
    """Mean color -> 3 classes (red, green, blue): a model whose answer depends on the pixels' scale."""
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    with torch.no_grad():
        net[2].weight.copy_(torch.eye(3) * 4)
        net[2].bias.zero_()
    return FinetunedModel(net, ["red", "green", "blue"], DATA_CONFIG, {"backbone": {"name": "mean-color"}})


def _gradient(height: int = 40, width: int = 64) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=2).astype(np.uint8)


def _write_tricky(folder: Path) -> dict[str, Path]:
    """Files whose naive ``convert("RGB")`` differs from what the file loader makes of them."""
    rgb = _gradient()
    rgba = np.dstack([rgb, np.where(np.arange(64) < 32, 0, 128).astype(np.uint8)[None].repeat(40, 0)])
    rgba[:10, :, 3] = 255
    files = {
        name: folder / name
        for name in (
            "rgba.png",
            "exif.jpg",
            "gray16.png",
            "palette.png",
            "palette_transparent.png",
            "cmyk.jpg",
            "la.png",
        )
    }
    Image.fromarray(rgba, "RGBA").save(files["rgba.png"])
    stored = Image.fromarray(rgb)
    exif = stored.getexif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    stored.save(files["exif.jpg"], exif=exif, quality=95)
    wide = (np.arange(40 * 64, dtype=np.uint32).reshape(40, 64) * 25).astype(np.uint16)
    Image.fromarray(wide).save(files["gray16.png"])
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(files["palette.png"])
    palette.save(files["palette_transparent.png"], transparency=3)
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk.jpg"], quality=95)
    Image.fromarray(np.dstack([rgb[..., 0], rgba[..., 3]]), "LA").save(files["la.png"])
    return files


@pytest.fixture(scope="module")
def tricky(tmp_path_factory) -> dict[str, Path]:
    return _write_tricky(tmp_path_factory.mktemp("tricky"))


@pytest.mark.parametrize(
    "name", ["rgba.png", "exif.jpg", "gray16.png", "palette.png", "palette_transparent.png", "cmyk.jpg", "la.png"]
)
def test_a_pil_image_gives_exactly_the_tensor_of_its_file(model, tricky, name):
    from_path = model.preprocess([tricky[name]])
    with Image.open(tricky[name]) as image:
        from_pil = model.preprocess([image])
        assert torch.equal(from_path, from_pil), (
            f"{name} ({image.mode}): max difference {(from_path - from_pil).abs().max():.3f}"
        )
    with Image.open(tricky[name]) as image:
        assert model.predict(image)[0].top_k == model.predict(str(tricky[name]))[0].top_k
        assert np.array_equal(as_rgb_array(image), load_rgb(tricky[name]))


def test_a_pil_image_keeps_its_file_and_mode(tricky):
    """The conversion works on a copy: the caller's image is not rotated or converted in place."""
    with Image.open(tricky["exif.jpg"]) as image:
        size, mode = image.size, image.mode
        as_rgb_array(image)
        assert (image.size, image.mode) == (size, mode)


def test_float_arrays_in_0_1_are_images_like_plt_imread_gives(model):
    rgb = _gradient()
    rgb[..., 1] = 250  # green dominates
    for dtype in (np.float32, np.float64, np.float16):
        scaled = (rgb / 255.0).astype(dtype)
        if dtype is not np.float16:  # float16 cannot hold every k/255 exactly
            assert np.array_equal(as_rgb_array(scaled), rgb)
        torch.testing.assert_close(model.logits([scaled]), model.logits([rgb]), atol=0.02, rtol=0)
    (pred,) = model.predict((rgb / 255.0).astype(np.float32))
    assert pred.label == "green" and pred.probability == pytest.approx(model.predict(rgb)[0].probability, abs=1e-6)


def test_uint16_arrays_are_scaled_as_the_file_loader_scales_them(model, tricky):
    with Image.open(tricky["gray16.png"]) as image:
        wide = np.asarray(image)
    assert wide.dtype == np.uint16 and wide.max() > 255
    assert np.array_equal(as_rgb_array(wide), load_rgb(tricky["gray16.png"]))
    assert torch.equal(model.preprocess([wide]), model.preprocess([tricky["gray16.png"]]))
    rgb = _gradient()
    assert np.array_equal(as_rgb_array(rgb.astype(np.uint16) * 257), rgb)  # 16-bit RGB (tifffile, cv2)


def test_gray_and_rgba_arrays_convert_like_their_files(model, tricky):
    gray = _gradient()[..., 0]
    assert np.array_equal(as_rgb_array(gray), np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(as_rgb_array(gray[..., None]), as_rgb_array(gray))
    with Image.open(tricky["rgba.png"]) as image:
        rgba = np.asarray(image)
    assert rgba.shape[2] == 4
    assert np.array_equal(as_rgb_array(rgba), load_rgb(tricky["rgba.png"]))  # transparent -> white
    assert torch.equal(model.preprocess([rgba]), model.preprocess([tricky["rgba.png"]]))
    assert np.array_equal(as_rgb_array(rgba / 255.0), as_rgb_array(rgba))


@pytest.mark.parametrize(
    "array, words",
    [
        (
            np.random.default_rng(0).random((3, 32, 32), dtype=np.float32),
            ["float32 array of shape (3, 32, 32)", "channels first", "transpose(1, 2, 0)"],
        ),
        (np.zeros((3, 32, 32), dtype=np.uint8), ["uint8 array of shape (3, 32, 32)", "channels first"]),
        (np.full((8, 8, 3), 200.0, dtype=np.float32), ["float32", "[0, 1]", "200"]),
        (np.full((8, 8, 3), -0.5), ["float64", "[0, 1]"]),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), ["NaN or infinite"]),
        (np.full((8, 8, 3), np.inf), ["NaN or infinite"]),
        (np.zeros((8, 8, 2), dtype=np.uint8), ["2 channels"]),
        (np.zeros((8, 8, 5), dtype=np.uint8), ["shape (8, 8, 5)"]),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), ["shape (2, 8, 8, 3)", "list"]),
        (np.zeros(8, dtype=np.uint8), ["shape (8,)"]),
        (np.zeros((8, 8, 3), dtype=np.int64), ["int64", "astype(np.uint8)"]),
        (np.zeros((8, 8, 3), dtype=bool), ["bool"]),
        (np.zeros((0, 8, 3), dtype=np.uint8), ["empty"]),
    ],
)
def test_ambiguous_arrays_are_refused_with_the_expected_shape_and_dtype(model, array, words):
    with pytest.raises(ValueError) as caught:
        model.predict(array)
    message = str(caught.value)
    assert "expected an HxWx3 uint8 array" in message
    for word in words:
        assert word in message, message


def test_other_objects_are_a_type_error():
    with pytest.raises(TypeError, match="path, a PIL image or an HxWx3 uint8 array"):
        as_rgb_array([[0, 1], [2, 3]])
