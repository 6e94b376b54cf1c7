"""Near-duplicate images: candidates by the cosine similarity of pooled features, confirmed by
their pixels.

The data check finds byte-identical files; a copy that was re-encoded, resized or lightly cropped
has other bytes. Pooled features alone do not separate such copies from distinct photos of the
same subject: on flowers5 (lite0), a quality-60 JPEG of a photo can score a lower feature cosine
(0.77) than hundreds of pairs of different daisies. So features only propose candidates (each
image's nearest neighbours above a cosine that every planted copy passed), and a pair is a
near-duplicate when the small grey thumbnails of the two images correlate at `similarity` or more,
the one image also compared centre-cropped to 95-80% with the other: copies scored >= 0.995,
distinct photos of the same flower mostly below 0.9 (benchmarks/audit.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.data.images import UnreadableImage, load_rgb

# Thumbnail correlation from which two images count as one picture (the CLI's similarity=).
SIMILARITY = 0.95
# Candidates: cosine of centred, L2-normalized features; every planted copy scored >= 0.75 there
# (lite0 on hymenoptera and flowers5); NEIGHBOURS nearest per image at most, so the pixel check
# stays linear in the number of images.
CANDIDATE = 0.7
NEIGHBOURS = 10
# Rows without a file to read (in-memory arrays): features alone, with a strict cosine.
FEATURES_ONLY = 0.95
THUMBNAIL = 24
CROPS = (1.0, 0.95, 0.9, 0.85, 0.8)
BLOCK = 2048  # rows of the similarity matrix held in memory at once


@dataclass(frozen=True)
class DuplicatePair:
    """Images `first` < `second` (row indices): `cosine` of their features, `similarity` of their
    thumbnails (None: no file to read); `leak`: one is in the training split and the other in
    val or test, so the evaluation scores a training image."""

    first: int
    second: int
    cosine: float
    similarity: float | None
    leak: bool


def normalized(features: np.ndarray) -> np.ndarray:
    """`features` centred on their mean and scaled to unit length (a zero row stays zero).
    Pooled activations are all positive: raw cosines of unrelated images crowd near 1."""
    centred = features.astype(np.float64) - features.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return centred / np.where(norms > 0, norms, 1.0)


def candidates(features: np.ndarray, cosine: float = CANDIDATE, neighbours: int = NEIGHBOURS) -> dict:
    """(i, j) with i < j -> feature cosine, for each row's `neighbours` nearest rows at `cosine` or above."""
    unit = normalized(features)
    found = {}
    k = min(neighbours, len(unit) - 1)
    for start in range(0, len(unit), BLOCK):
        block = unit[start : start + BLOCK] @ unit.T
        for r in range(len(block)):
            i = start + r
            block[r, i] = -np.inf
            for j in np.argpartition(-block[r], k - 1)[:k] if k > 0 else []:
                if block[r, j] >= cosine:
                    found[(min(i, int(j)), max(i, int(j)))] = float(block[r, j])
    return found


def thumbnails(path: str) -> list[np.ndarray] | None:
    """Zero-mean unit-norm grey THUMBNAIL-px views of the image at `path`, one per centre crop of
    CROPS (None: not a readable file)."""
    from PIL import Image

    if not Path(path).is_file():
        return None
    try:
        image = Image.fromarray(load_rgb(path)).convert("L")
    except UnreadableImage:
        return None
    views = []
    for keep in CROPS:
        dx, dy = image.width * (1 - keep) / 2, image.height * (1 - keep) / 2
        view = image.crop((dx, dy, image.width - dx, image.height - dy)).resize(
            (THUMBNAIL, THUMBNAIL), Image.Resampling.BOX
        )
        array = np.asarray(view, np.float64)
        array = array - array.mean()
        views.append(array / max(np.linalg.norm(array), 1e-9))
    return views


def pixel_similarity(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Best correlation of one image's whole thumbnail with the other's crops, both ways round."""
    return max(max(float((a[0] * v).sum()) for v in b), max(float((b[0] * v).sum()) for v in a))


def near_duplicates(
    features: np.ndarray,
    splits: np.ndarray,
    paths: np.ndarray,
    similarity: float = SIMILARITY,
    thumbs: Callable[[str], list[np.ndarray] | None] = thumbnails,
) -> list[DuplicatePair]:
    """Near-duplicate pairs among the rows, most similar first: feature candidates (see
    :func:`candidates`) whose thumbnails correlate at `similarity` or more; rows without a
    readable file need a feature cosine of FEATURES_ONLY instead."""
    cache: dict[int, list[np.ndarray] | None] = {}
    pairs = []
    for (i, j), cosine in candidates(features).items():
        for row in (i, j):
            if row not in cache:
                cache[row] = thumbs(str(paths[row]))
        if cache[i] is None or cache[j] is None:
            score, keep = None, cosine >= FEATURES_ONLY
        else:
            score = pixel_similarity(cache[i], cache[j])
            keep = score >= similarity
        if keep:
            leak = (str(splits[i]) == "train") != (str(splits[j]) == "train")
            pairs.append(DuplicatePair(i, j, cosine, score, leak))
    return sorted(pairs, key=lambda p: (-(p.similarity if p.similarity is not None else p.cosine), p.first, p.second))


def closest_duplicate(pairs: list[DuplicatePair], n: int) -> np.ndarray:
    """Per row, the index of its most similar near-duplicate (-1: none); `pairs` most similar first."""
    best = np.full(n, -1)
    for p in pairs:
        for here, there in ((p.first, p.second), (p.second, p.first)):
            if best[here] < 0:
                best[here] = there
    return best
