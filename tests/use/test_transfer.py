"""Transferability before training: LogME against its definition, k-fold probes, finetune rank."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import assert_refused, finetune_cli, write_class_folders


def exact_log_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of Bayesian linear regression: y ~ N(0, I / beta + F F^T / alpha)."""
    from scipy.stats import multivariate_normal

    cov = np.eye(len(y)) / beta + f @ f.T / alpha
    return float(multivariate_normal(np.zeros(len(y)), cov).logpdf(y))


@pytest.mark.parametrize("n, d", [(40, 8), (12, 30)])  # more images than dimensions, and fewer
def test_logme_is_the_maximized_evidence_per_image(n, d):
    from scipy.optimize import minimize

    from finetune.use.transfer import logme

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    labels[:3] = [0, 1, 2]
    f = rng.normal(size=(n, d)) + labels[:, None] * 0.7
    best = []
    for k in range(3):
        y = (labels == k).astype(float)
        result = minimize(
            lambda p: -exact_log_evidence(f, y, np.exp(p[0]), np.exp(p[1])),
            x0=[0.0, 0.0],
            method="Nelder-Mead",
            options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000},
        )
        best.append(-result.fun / n)
    assert logme(f, labels) == pytest.approx(np.mean(best), abs=2e-3)


def test_logme_and_probes_prefer_features_that_carry_the_labels():
    from finetune.use.transfer import kendall_tau, transfer_scores

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 30)
    noise = rng.normal(size=(120, 32))
    scores = []
    for signal in (0.0, 0.5, 1.0, 3.0):  # more signal, better features
        means = rng.normal(size=(4, 32)) * signal
        scores.append(transfer_scores(noise + means[labels], labels, folds=5, seed=0))
    assert [round(s.linear, 2) for s in scores][-1] >= 0.95 and scores[0].linear < 0.45
    assert kendall_tau([s.logme for s in scores], [0, 1, 2, 3]) == pytest.approx(1.0)
    assert kendall_tau([s.knn for s in scores], [0, 1, 2, 3]) >= 0.6
    assert all(s.images == 120 for s in scores)


def test_transfer_scores_refuse_what_k_folds_cannot_score():
    from finetune.errors import ConfigError
    from finetune.use.transfer import transfer_scores

    features = np.random.default_rng(0).normal(size=(12, 4))
    with pytest.raises(ConfigError, match="smallest class has 3 images"):
        transfer_scores(features, np.array([0] * 9 + [1] * 3), folds=5)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        transfer_scores(features, np.zeros(12, int))


def test_rank_cli_scores_each_backbone_and_lists_one_it_cannot_have(tmp_path):
    write_class_folders(tmp_path / "data" / "train", per_class=8)
    write_class_folders(tmp_path / "data" / "val", per_class=4, seed=1)
    out = tmp_path / "rank"
    result = finetune_cli(
        "rank",
        "backbones=[test_resnet,test_efficientnet,no_such_net]",
        "folds=3",
        "by=knn",
        "backbone.weights=random",
        "data.image_size=32",
        "data=folder",
        f"data.root={tmp_path / 'data'}",
        "data.num_workers=0",
        f"out={out}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((out / "rank.csv").open()))
    assert [r["backbone"] for r in rows[:2]] in (
        ["test_resnet", "test_efficientnet"],
        ["test_efficientnet", "test_resnet"],
    )
    assert float(rows[0]["knn"]) >= float(rows[1]["knn"])  # by=knn: best first
    for row in rows[:2]:
        assert 0 <= float(row["linear"]) <= 1 and float(row["images_per_second"]) > 0 and not row["error"]
    assert rows[2]["backbone"] == "no_such_net" and rows[2]["error"] and "not ranked: no_such_net" in result.stdout
    summary = json.loads((out / "rank.json").read_text())
    assert summary["images"] == 36 and summary["folds"] == 3 and summary["by"] == "knn"

    again = finetune_cli(
        "rank",
        "backbones=[test_resnet]",
        "folds=3",
        "backbone.weights=random",
        "data.image_size=32",
        "data=folder",
        f"data.root={tmp_path / 'data'}",
        "data.num_workers=0",
        f"out={out}",
    )
    first = next(r for r in rows if r["backbone"] == "test_resnet")
    assert float(next(csv.DictReader((out / "rank.csv").open()))["linear"]) == pytest.approx(float(first["linear"]))
    assert again.returncode == 0  # the same folds and the cached features: the same scores


@pytest.mark.parametrize(
    "args, message",
    [
        (["by=accuracy"], "rank by one of linear, knn, logme"),
        (["folds=1"], "at least 2 folds"),
        (["folds=five"], "must be a whole number"),
        (["backbones=[]"], "give timm names"),
        (["task=multilabel"], "multi-label data"),
    ],
)
def test_rank_cli_refuses_bad_options_in_one_line(args, message):
    assert_refused(finetune_cli("rank", "data=digits", *args), message)


def test_offline_backbones_are_the_installed_embedded_packages():
    import importlib.util

    from finetune.model.weights import EMBEDDED_PACKAGES, offline_backbones

    installed = [n for n, (m, _) in EMBEDDED_PACKAGES.items() if importlib.util.find_spec(m)]
    assert offline_backbones()[: len(installed)] == installed and "tf_efficientnet_lite0" in installed
