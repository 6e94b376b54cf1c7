"""The one image loader: training, evaluation and prediction decode files the same way."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from finetune.data.file_memo import remembered_per_file

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

# Larger images are refused before decoding: a few-KB "decompression bomb" can claim gigabytes.
MAX_PIXELS = 89_478_485  # PIL's own default threshold (about 9,500 x 9,500)


class UnreadableImage(Exception):
    """The file cannot be used as an image; the message is the reason shown to the user."""


@contextmanager
def _guarded(path):
    """Open `path` with PIL, turning every failure (and a bomb warning) into UnreadableImage."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise UnreadableImage(f"too large to decode safely ({img.width}x{img.height} pixels)")
                yield img
        except UnreadableImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise UnreadableImage(f"refused as a decompression bomb: {err}") from None
        except FileNotFoundError:
            raise UnreadableImage("file not found") from None
        except Exception as err:
            if Path(path).is_file() and Path(path).stat().st_size == 0:
                raise UnreadableImage("empty file") from None
            raise UnreadableImage(f"not a readable image ({type(err).__name__}: {err})") from None


@remembered_per_file
def probe(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding; UnreadableImage if it has none.
    Remembered per file in this process (a sweep's trials probe the same folder)."""
    with _guarded(path) as img:
        return img.size


def load_rgb(path: str | Path, min_short_side: int | None = None) -> np.ndarray:
    """Decode `path` to an upright (EXIF-rotated) HxWx3 uint8 RGB array, or UnreadableImage.

    Grayscale, palette, CMYK and 16-bit images are converted explicitly; transparent pixels
    are composited on white. A truncated file is an error, not a half-gray image.
    `min_short_side`: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (its DCT scaling, far
    cheaper than decoding everything) as long as its short side stays at least this long.
    """
    with _guarded(path) as img:
        if min_short_side and img.format == "JPEG":
            scale = max(1, min(img.size) // int(min_short_side))
            img.draft("RGB", (max(1, img.width // scale), max(1, img.height // scale)))
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I"):  # 16/32-bit integer grayscale: rescale, don't clip
            wide = np.asarray(img, dtype=np.float64)
            top = 65535.0 if wide.max() > 255 else 255.0
            gray = np.clip(wide / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img.convert("RGBA"))
        return np.asarray(img.convert("RGB"))
