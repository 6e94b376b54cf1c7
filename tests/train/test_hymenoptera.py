"""Real photos: head-only fine-tuning of the embedded lite0 on ants vs bees."""

from __future__ import annotations

import numpy as np
import pytest

from finetune import fit


@pytest.mark.slow
def test_freeze_all_but_head_reaches_the_tuned_probe_on_hymenoptera(hymenoptera, tmp_path):
    """The head fitted on the cached features is scikit-learn's logistic regression at the L2
    strength the run chose (same predictions, less one image of 153), and within noise of
    scikit-learn's own cross-validated choice of the strength. The two choose on different folds
    (scikit-learn's split an image's views between training and held-out rows; ours hold out whole
    images), and on 245 training images three folds cannot rank strengths closer than about two
    validation images: over the benchmark's seeds the mean gap is 0.2 points
    (benchmarks/head_fit.py), on one seed it has been two images either way."""
    import json

    from safetensors.torch import load_file
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    from finetune.compute.linear_probe import c_of

    result = fit(
        "freeze_all_but_head",
        data="folder",
        data__root=hymenoptera,
        logger="none",
        trainer__max_epochs=8,
        data__cache__dir=tmp_path / "cache",
        hydra__run__dir=tmp_path / "run",
    )
    assert result.classes == ["ants", "bees"]
    (cache,) = (tmp_path / "cache" / "features").glob("*.safetensors")
    (memo,) = (tmp_path / "cache" / "features").glob("*.l2-*.json")
    stored = load_file(str(cache))
    views, labels = stored["features.train"].numpy(), stored["labels.train"].numpy()
    rows, targets = views.reshape(-1, views.shape[2]), np.tile(labels, views.shape[0])
    val_rows, val_labels = stored["features.val"].numpy(), stored["labels.val"].numpy()

    same_strength = LogisticRegression(C=c_of(json.loads(memo.read_text())["l2"], len(rows)), max_iter=5000)
    same_strength.fit(rows, targets)
    assert abs(result.metrics["val/acc"] - same_strength.score(val_rows, val_labels)) <= 1 / 153 + 1e-6

    probe = LogisticRegressionCV(Cs=np.logspace(-3, 2, 6), cv=3, max_iter=1000).fit(rows, targets)
    probe_acc = probe.score(val_rows, val_labels)
    assert result.metrics["val/acc"] >= probe_acc - 3 / 153 - 1e-6, (probe_acc, result.history)
    assert result.metrics["val/acc"] >= 0.94, result.history
