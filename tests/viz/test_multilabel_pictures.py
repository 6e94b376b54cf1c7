"""The multi-label pictures: each draws a readable PNG, and the numbers behind them are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.labels import cardinality
from finetune.viz.multilabel import ap_bars, cooccurrence, cooccurrence_counts, label_mistakes, rank_mistakes


def readable_png(path, min_side: int = 150) -> None:
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and min(image.size) >= min_side


def report(classes: list[str], rng: np.random.Generator) -> dict:
    per_label = {
        c: {"ap": float(rng.uniform()), "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": i + 1}
        for i, c in enumerate(classes)
    }
    per_label[classes[-1]].update(ap=None, support=0)  # no positive example: AP undefined
    defined = [v["ap"] for v in per_label.values() if v["ap"] is not None]
    return {"classes": classes, "map": float(np.mean(defined)), "images": 40, "per_label": per_label}


def synthetic(n: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, 24, 24, 3), dtype=np.uint8)
    targets = torch.from_numpy(rng.uniform(size=(n, c)) < 0.3).float()
    probabilities = torch.from_numpy(rng.uniform(size=(n, c))).float()
    return images, targets, probabilities, torch.full((c,), 0.5)


@pytest.mark.parametrize("labels", [3, 18])
def test_every_picture_is_a_readable_png(tmp_path, labels):
    classes = [f"label_{i}" for i in range(labels)]
    images, targets, probabilities, thresholds = synthetic(12, labels)
    rng = np.random.default_rng(labels)
    readable_png(ap_bars(report(classes, rng), tmp_path / "ap.png"))
    readable_png(cooccurrence(targets.numpy(), classes, tmp_path / "co.png"))
    readable_png(label_mistakes(images, targets, probabilities, thresholds, classes, tmp_path / "mistakes.png"))


def test_ap_bars_takes_labels_that_all_lack_positives(tmp_path):
    per_label = {c: {"ap": None, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for c in ("a", "b")}
    readable_png(
        ap_bars({"classes": ["a", "b"], "map": float("nan"), "images": 3, "per_label": per_label}, tmp_path / "ap.png"),
        min_side=100,
    )


def test_cooccurrence_counts_and_cardinality_are_exact(tmp_path):
    targets = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [0, 1, 1]])
    expected = np.array([[3, 2, 1], [2, 3, 2], [1, 2, 2]])
    for kind in (int, float, bool):
        counts = cooccurrence_counts(targets.astype(kind))
        assert counts.dtype.kind == "i" and np.array_equal(counts, expected)
    assert cardinality([tuple(np.flatnonzero(row)) for row in targets]) == {0: 1, 1: 1, 2: 2, 3: 1}
    assert cooccurrence(np.zeros((0, 3)), ["a", "b", "c"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_mistakes_are_ranked_worst_first_once_per_image():
    thresholds = torch.tensor([0.5, 0.5, 0.2])
    targets = torch.tensor(
        [
            [1, 1, 0],  # 0: misses label 1 (0.10) and label 0 (0.30): worst 0.10
            [1, 0, 0],  # 1: misses label 0 (0.40); false alarm label 2 (0.25 >= 0.2)
            [0, 0, 1],  # 2: misses label 2 (0.05); false alarms label 0 (0.95), 1 (0.60)
            [1, 0, 0],  # 3: right
            [0, 0, 0],
        ]
    ).float()  # 4: false alarm label 1 (0.95): ties image 2, comes after
    probabilities = torch.tensor(
        [[0.30, 0.10, 0.00], [0.40, 0.00, 0.25], [0.95, 0.60, 0.05], [0.90, 0.10, 0.10], [0.00, 0.95, 0.00]]
    )
    missed, alarms = rank_mistakes(targets, probabilities, thresholds, count=8)
    assert [(i, j) for i, j, _ in missed] == [(2, 2), (0, 1), (1, 0)]
    assert [(i, j) for i, j, _ in alarms] == [(2, 0), (4, 1), (1, 2)]
    assert [round(p, 2) for _, _, p in missed] == [0.05, 0.10, 0.40]
    assert [round(p, 2) for _, _, p in alarms] == [0.95, 0.95, 0.25]
    missed, alarms = rank_mistakes(targets, probabilities, thresholds, count=1)
    assert [(i, j) for i, j, _ in missed] == [(2, 2)] and [(i, j) for i, j, _ in alarms] == [(2, 0)]


def test_perfect_predictions_draw_no_mistakes(tmp_path):
    images, targets, _, thresholds = synthetic(6, 4)
    assert rank_mistakes(targets, targets, thresholds, count=8) == ([], [])
    assert label_mistakes(images, targets, targets * 0.9 + 0.05, thresholds, list("abcd"), tmp_path / "m.png") is None
    assert not (tmp_path / "m.png").exists()


def test_only_false_alarms_still_draw(tmp_path):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    probabilities = targets.clone()
    probabilities[1, 2] = 0.7  # the one error: a false alarm on an image with no label
    thresholds = torch.full((3,), 0.5)
    assert rank_mistakes(targets, probabilities, thresholds, count=8) == ([], [(1, 2, pytest.approx(0.7))])
    readable_png(
        label_mistakes(images, targets, probabilities, thresholds, ["x", "y", "z"], tmp_path / "m.png"), min_side=100
    )
