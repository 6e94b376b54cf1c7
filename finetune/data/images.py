"""The one image loader: every split and every command decodes files the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode `path` to an upright (EXIF-rotated) HxWx3 uint8 RGB array.

    Grayscale, palette, CMYK and 16-bit images are converted explicitly; transparent pixels
    are composited on white. Raises OSError (or PIL's errors) when the file cannot be decoded.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I"):  # 16/32-bit integer grayscale: rescale, don't clip
            wide = np.asarray(img, dtype=np.float64)
            top = 65535.0 if wide.max() > 255 else 255.0
            gray = np.clip(wide / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA"):
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img.convert("RGBA"))
        return np.asarray(img.convert("RGB"))
