"""How well a frozen backbone's features suit a data set, in seconds, before any fine-tuning.

Three estimators on the pooled features of the labelled images (train and val pooled; a test
split stays unseen): the k-fold accuracy of a logistic-regression probe and of a cosine k-NN
(stratified folds, the same folds for every backbone), and LogME (You et al., "LogME: Practical
Assessment of Pre-trained Models for Transfer Learning", ICML 2021), the log marginal evidence
of a Bayesian linear model from the features to the labels. ImageNet accuracy predicts transfer
only on average (Kornblith et al., 2019), so the ranking is made on the user's own data.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from finetune.errors import ConfigError


@dataclass(frozen=True)
class TransferScores:
    """One backbone's scores: k-fold ``linear`` and ``knn`` accuracy (with the standard deviation
    over folds), ``logme`` (per image; higher is better), ``images`` scored and the seconds it took."""

    linear: float
    linear_std: float
    knn: float
    knn_std: float
    logme: float
    images: int
    seconds: float


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of (N, D) `features` for integer `labels`: the maximized log evidence per image of a
    Bayesian linear regression onto each class's one-hot column, averaged over classes.

    Hand-written (no maintained package ships it; the authors' reference code is a script): one
    SVD, then the paper's fixed-point iteration for the prior precision alpha and noise precision
    beta per class, in the singular basis so that each step is O(min(N, D)).
    """
    f = np.asarray(features, np.float64)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2  # eigenvalues of F^T F (the other D - r are 0)
    evidences = []
    for k in np.unique(labels):
        y = (labels == k).astype(np.float64)
        z = u.T @ y
        outside = max(float(y @ y - z @ z), 0.0)  # |y|^2 outside the span of F
        alpha, beta = 1.0, 1.0
        for _ in range(100):
            shrink = beta * sigma / (alpha + beta * sigma)
            gamma = shrink.sum()
            m2 = float(((beta * s * z / (alpha + beta * sigma)) ** 2).sum())  # |posterior mean|^2
            residual = outside + float(((z * alpha / (alpha + beta * sigma)) ** 2).sum())  # |y - F m|^2
            new_alpha, new_beta = gamma / (m2 + 1e-10), (n - gamma) / (residual + 1e-10)
            converged = abs(new_alpha / new_beta - alpha / beta) <= 1e-3 * alpha / beta
            alpha, beta = new_alpha, new_beta
            if converged:
                break
        shrink = beta * sigma / (alpha + beta * sigma)
        m2 = float(((beta * s * z / (alpha + beta * sigma)) ** 2).sum())
        residual = outside + float(((z * alpha / (alpha + beta * sigma)) ** 2).sum())
        log_det = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * math.log(alpha)
        evidence = (
            d / 2 * math.log(alpha)
            + n / 2 * math.log(beta)
            - beta / 2 * residual
            - alpha / 2 * m2
            - log_det / 2
            - n / 2 * math.log(2 * math.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def transfer_scores(
    features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0, k: int = 10, c: float = 1.0
) -> TransferScores:
    """The k-fold probe accuracies and LogME of `features` (N, D) for `labels` (N,)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    labels = np.asarray(labels)
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    if len(counts) < 2:
        raise ConfigError("Ranking backbones needs images of at least 2 classes.")
    if counts.min() < folds:
        raise ConfigError(
            f"folds={folds}: the smallest class has {counts.min()} images; every fold needs one "
            f"of each class. Use folds={max(2, int(counts.min()))} or fewer."
        )
    started = time.perf_counter()
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    linear = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
    knn = make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=min(k, int(counts.min()))))
    linear_acc = cross_val_score(linear, features, labels, cv=split)
    knn_acc = cross_val_score(knn, features, labels, cv=split)
    evidence = logme(features, labels)
    return TransferScores(
        float(linear_acc.mean()),
        float(linear_acc.std()),
        float(knn_acc.mean()),
        float(knn_acc.std()),
        evidence,
        len(labels),
        time.perf_counter() - started,
    )


def kendall_tau(a, b) -> float:
    """Kendall's tau-b between two score lists (scipy's); NaN when either is constant."""
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)
