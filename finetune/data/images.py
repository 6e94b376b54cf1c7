"""The one image loader: training, evaluation and prediction decode files the same way."""

from __future__ import annotations

import io
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from finetune.data.file_memo import StoredImage, remembered_per_file

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

# Larger images are refused before decoding: a few-KB "decompression bomb" can claim gigabytes.
MAX_PIXELS = 89_478_485  # PIL's own default threshold (about 9,500 x 9,500)


class UnreadableImage(Exception):
    """The file cannot be used as an image; the message is the reason shown to the user."""


class ImageTooLarge(UnreadableImage):
    """The header claims more pixels than allowed, or PIL calls it a decompression bomb."""


@contextmanager
def _guarded(path, max_pixels: int = MAX_PIXELS):
    """Open `path` with PIL, turning every failure (and a bomb warning) into UnreadableImage;
    more than `max_pixels` (from the header, before decoding) is ImageTooLarge. A
    :class:`StoredImage` (a dataset row) is opened from its bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            source = _stored_bytes(path) if isinstance(path, StoredImage) else path
            with Image.open(source) as img:
                if img.width * img.height > max_pixels:
                    raise ImageTooLarge(
                        f"too large to decode safely ({img.width}x{img.height} pixels, more than {max_pixels:,})"
                    )
                yield img
        except UnreadableImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageTooLarge(f"refused as a decompression bomb: {err}") from None
        except FileNotFoundError:
            raise UnreadableImage("file not found") from None
        except Exception as err:
            if isinstance(path, (str, os.PathLike)) and Path(path).is_file() and Path(path).stat().st_size == 0:
                raise UnreadableImage("empty file") from None
            reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", " data", str(err))  # a row's bytes
            raise UnreadableImage(f"not a readable image ({type(err).__name__}: {reason})") from None


def _stored_bytes(image: StoredImage) -> io.BytesIO:
    data = image.encoded()
    if not data:
        raise UnreadableImage("no image in this row")
    return io.BytesIO(data)


@remembered_per_file
def probe(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding; UnreadableImage if it has none.
    Remembered per file in this process (a sweep's trials probe the same folder)."""
    with _guarded(path) as img:
        return img.size


def load_rgb(path, min_short_side: int | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode `path` (or a binary file object) to an upright (EXIF-rotated) HxWx3 uint8 RGB array, or UnreadableImage.

    Grayscale, palette, CMYK and 16-bit images are converted explicitly; transparent pixels
    are composited on white. A truncated file is an error, not a half-gray image.
    `min_short_side`: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (its DCT scaling, far
    cheaper than decoding everything) as long as its short side stays at least this long.
    `max_pixels`: larger images are refused (ImageTooLarge) from the header, before decoding.
    """
    with _guarded(path, max_pixels) as img:
        if min_short_side and img.format == "JPEG":
            scale = max(1, min(img.size) // int(min_short_side))
            img.draft("RGB", (max(1, img.width // scale), max(1, img.height // scale)))
        img.load()
        return _pil_to_rgb(img)


def as_rgb_array(image) -> np.ndarray:
    """A path, a PIL image or an array -> HxWx3 uint8 RGB, the way :func:`load_rgb` decodes files.

    A PIL image is converted exactly as its file would be (EXIF rotation, transparency on white,
    16-bit scaling, palette/CMYK/grayscale to RGB); the caller's image is left untouched.
    Arrays: HxW or HxWx1 are grayscale, HxWx3 RGB, HxWx4 RGBA (composited on white); uint8 as is,
    float in [0, 1] (``plt.imread``) times 255, uint16 scaled like a 16-bit file. Anything else
    (channels first, 2 channels, floats outside [0, 1], NaN, other dtypes) is a ValueError that
    says what was expected; an object of another type a TypeError.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(image)
    if isinstance(image, Image.Image):
        try:
            image.load()
        except Exception as err:
            raise UnreadableImage(f"not a readable image ({type(err).__name__}: {err})") from None
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(f"Expected a path, a PIL image or an HxWx3 uint8 array, got {type(image).__name__}.")


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """The conversion shared by files and in-memory PIL images (`img` already loaded)."""
    img = ImageOps.exif_transpose(img)  # a copy: the caller's image keeps its orientation
    if img.mode.startswith("I"):  # 16/32-bit integer grayscale: rescale, don't clip
        gray = _wide_to_uint8(np.asarray(img))
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return np.asarray(img.convert("RGB"))


def _wide_to_uint8(values: np.ndarray) -> np.ndarray:
    """Integer pixels wider than 8 bits -> uint8: a full 16-bit range when any value exceeds 255
    (values that all fit in 8 bits are taken as 8-bit pixels stored wide, as PIL's mode I does)."""
    wide = values.astype(np.float64)
    top = 65535.0 if wide.size and wide.max() > 255 else 255.0
    return np.clip(wide / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


EXPECTED_ARRAY = (
    "expected an HxWx3 uint8 array (or HxW / HxWx1 grayscale, HxWx4 RGBA; float in [0, 1] or uint16 also accepted)"
)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    got = f"got {array.dtype} array of shape {tuple(array.shape)}"

    def refuse(why: str) -> ValueError:
        return ValueError(f"{EXPECTED_ARRAY}, {got}: {why}.")

    channels = array.shape[2] if array.ndim == 3 else 1
    if array.ndim == 3 and channels not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        raise refuse(
            "this looks like channels first (CxHxW, as torch uses); "
            "pass image.transpose(1, 2, 0) (and a torch tensor as .numpy())"
        )
    if array.ndim == 4:
        raise refuse("one array is one image; pass a batch as a list of HxWx3 arrays")
    if array.ndim not in (2, 3) or channels not in (1, 3, 4):
        if array.ndim == 3 and channels == 2:
            raise refuse("2 channels are ambiguous (gray + alpha, or two bands?); convert to RGB first")
        raise refuse("the rank or number of channels is not an image's")
    if array.size == 0:
        raise refuse("the image is empty")
    if array.dtype == np.uint16:
        array = _wide_to_uint8(array)
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise refuse("it holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise refuse(
                f"float pixels must be in [0, 1], these span [{low:g}, {high:g}]; "
                f"for 0-255 values pass image.astype(np.uint8)"
            )
        array = np.clip(array.astype(np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise refuse(f"{array.dtype} pixels are ambiguous; pass image.astype(np.uint8) for 0-255 values")
    if array.ndim == 2 or channels == 1:
        return np.repeat(array.reshape(array.shape[0], array.shape[1], 1), 3, axis=2)
    if channels == 4:  # composited on white as the file loader does for transparent files
        return _pil_to_rgb(Image.fromarray(np.ascontiguousarray(array), "RGBA"))
    return array
