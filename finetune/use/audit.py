"""What to look at in a labelled image set: likely label errors, near-duplicates, outliers, and a
k-fold accuracy with its confidence interval. It reads features and labels; it changes nothing.

Every image of every split is pooled. A linear probe (standardized features, logistic regression)
is fitted k times, each time on all folds but one, so every image gets predicted probabilities
from a model that never saw its label: out-of-fold probabilities, the input confident learning
needs (Northcutt et al., 2021, through cleanlab). Features must come from a backbone that was
not trained on these labels (a pretrained one): a fine-tuned backbone has memorized them.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from finetune.errors import ConfigError
from finetune.use.duplicates import SIMILARITY, DuplicatePair, closest_duplicate, near_duplicates
from finetune.use.embed import Embeddings

# Inverse L2 regularization of the probe on standardized features, tried from the strongest up
# (see calibrated_out_of_fold). Too strong a probe gives near-uniform probabilities that confident
# learning cannot read (a hundred images); too weak a one over-fits the noise it should find
# (with 5% flipped labels, hymenoptera's flagged set was 0.76 precise at C=0.001, 0.61 at 0.01).
CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# Outliers: mean cosine distance to the 10 nearest images beyond Q3 + FENCE x IQR of the data's
# distances (Tukey's "far out" fence): none when nothing is unusual, unlike a fixed top share.
NEIGHBOURS = 10
FENCE = 3.0


@dataclass
class Audit:
    """Per image (rows aligned with the embeddings): out-of-fold `probabilities` (N, K), the
    `suggested` class (their argmax), `label_quality` in [0, 1] (cleanlab's self-confidence: the
    out-of-fold probability of the given label; low = suspect), `label_issue` (cleanlab's
    default filter), `outlier_score` in [0, 1] (cleanlab's kNN score; low = atypical),
    `outlier`, and `duplicate_of` (row of its closest near-duplicate, -1: none). Overall: the
    near-duplicate `pairs`, the k-fold accuracy against the given labels with its 95% Wilson
    interval."""

    paths: np.ndarray
    splits: np.ndarray
    labels: np.ndarray
    classes: list[str]
    backbone: str
    probabilities: np.ndarray
    suggested: np.ndarray
    label_quality: np.ndarray
    label_issue: np.ndarray
    outlier_score: np.ndarray
    outlier: np.ndarray
    duplicate_of: np.ndarray
    pairs: list[DuplicatePair]
    folds: int
    accuracy: float
    interval: tuple[float, float]
    similarity: float
    c: float
    log_loss: dict[float, float]
    seconds: dict[str, float] = field(default_factory=dict)

    def suspects(self) -> np.ndarray:
        """Rows flagged as label issues, most suspect (lowest label quality) first."""
        rows = np.flatnonzero(self.label_issue)
        return rows[np.argsort(self.label_quality[rows], kind="stable")]

    def outliers(self) -> np.ndarray:
        """Outliers not already flagged as label issues, most atypical first."""
        rows = np.flatnonzero(self.outlier & ~self.label_issue)
        return rows[np.argsort(self.outlier_score[rows], kind="stable")]

    def rows(self) -> list[dict]:
        """One dict per image, the columns of audit.csv: likely label errors (most suspect first),
        then outliers (most atypical first), then the rest by label quality."""
        flagged = np.concatenate([self.suspects(), self.outliers()])
        rest = np.setdiff1d(np.arange(len(self.labels)), flagged)
        order = np.concatenate([flagged, rest[np.argsort(self.label_quality[rest], kind="stable")]]).astype(int)
        return [
            {
                "path": str(self.paths[i]),
                "split": str(self.splits[i]),
                "given": self.classes[self.labels[i]],
                "suggested": self.classes[self.suggested[i]],
                "label_quality": round(float(self.label_quality[i]), 5),
                "is_label_issue": bool(self.label_issue[i]),
                "outlier_score": round(float(self.outlier_score[i]), 5),
                "is_outlier": bool(self.outlier[i]),
                "duplicate_of": str(self.paths[self.duplicate_of[i]]) if self.duplicate_of[i] >= 0 else "",
            }
            for i in order
        ]

    def summary(self) -> dict:
        """The audit's facts as plain JSON values (audit.json)."""
        return {
            "images": len(self.labels),
            "classes": self.classes,
            "backbone": self.backbone,
            "folds": self.folds,
            "images_per_split": {str(s): int((self.splits == s).sum()) for s in dict.fromkeys(self.splits)},
            "kfold_accuracy": self.accuracy,
            "kfold_accuracy_95ci": list(self.interval),
            "probe_C": self.c,
            "probe_log_loss": {f"{c:g}": round(v, 5) for c, v in self.log_loss.items()},
            "label_issues": int(self.label_issue.sum()),
            "outliers": int(self.outlier.sum()),
            "duplicate_similarity": self.similarity,
            "duplicate_pairs": len(self.pairs),
            "duplicate_pairs_across_splits": sum(self.splits[p.first] != self.splits[p.second] for p in self.pairs),
            "leaks": sum(p.leak for p in self.pairs),
            "pairs": [
                {
                    "first": str(self.paths[p.first]),
                    "second": str(self.paths[p.second]),
                    "splits": [str(self.splits[p.first]), str(self.splits[p.second])],
                    "cosine": round(p.cosine, 5),
                    "similarity": round(p.similarity, 5) if p.similarity is not None else None,
                    "leak": p.leak,
                }
                for p in self.pairs
            ],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def check_folds(folds: object, labels: np.ndarray, classes: list[str]) -> int:
    """`folds` as an int >= 2 that every class can fill (each needs an image in every fold)."""
    try:
        k = int(str(folds))
    except ValueError:
        raise ConfigError(f"folds={folds!r} must be an integer of at least 2 (5 is usual).") from None
    if k < 2:
        raise ConfigError(f"folds={k}: out-of-fold predictions need at least 2 folds (5 is usual).")
    counts = np.bincount(labels, minlength=len(classes))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise ConfigError("The data have fewer than 2 classes with images: there is no label to audit.")
    small = [i for i in present if counts[i] < k]
    if small:
        listed = ", ".join(f"{classes[i]!r} ({counts[i]})" for i in small)
        raise ConfigError(
            f"folds={k}, but classes {listed} have fewer images than folds: every fold needs an image "
            f"of every class. Lower folds= to {max(2, int(counts[small].min()))} or add images."
        )
    return k


def out_of_fold(features: np.ndarray, labels: np.ndarray, folds: int, seed: int, c: float) -> np.ndarray:
    """(N, K) probabilities, each row from a probe fitted on the other folds (stratified, seeded).
    Classes without images get probability 0."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    num_classes = int(labels.max()) + 1
    probabilities = np.zeros((len(labels), num_classes))
    # One BLAS thread: L-BFGS on a few thousand rows is matrix-vector work, and more threads only
    # contend (flowers5 on 2 cores: 0.3 s per fit on one thread, 0.7-4.8 s on two).
    with threadpool_limits(limits=1, user_api="blas"):
        for train, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
            probe.fit(features[train], labels[train])
            probabilities[np.ix_(held_out, probe.classes_)] = probe.predict_proba(features[held_out])
    return probabilities


def calibrated_out_of_fold(
    features: np.ndarray, labels: np.ndarray, folds: int, seed: int, cs: tuple[float, ...] = CS
) -> tuple[np.ndarray, float, dict[float, float]]:
    """(out-of-fold probabilities, the C they came from, mean out-of-fold log loss per C tried).

    Cs go in increasing order until the log loss worsens; the one kept is the most regularized
    whose loss is within one standard error of the lowest (the "one-standard-error rule" of
    Breiman et al. and Hastie et al.): the lowest loss on noisy labels leans towards fitting them.
    The k-fold accuracy is that of a C picked on the same folds among a few: optimistic by far
    less than its interval is wide.
    """
    tried, losses, per_image = [], {}, {}
    rows = np.arange(len(labels))
    for c in cs:
        probabilities = out_of_fold(features, labels, folds, seed, c)
        per_image[c] = -np.log(np.clip(probabilities[rows, labels], 1e-12, 1.0))
        losses[c] = float(per_image[c].mean())
        tried.append((c, probabilities))
        if len(tried) > 1 and losses[c] >= losses[tried[-2][0]]:
            break
    best = min(losses, key=losses.get)
    tolerance = losses[best] + per_image[best].std() / np.sqrt(len(labels))
    c, probabilities = next((c, p) for c, p in tried if losses[c] <= tolerance)
    return probabilities, c, losses


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for the default z)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def outlier_scores(features: np.ndarray, fence: float = FENCE) -> tuple[np.ndarray, np.ndarray]:
    """(cleanlab's out-of-distribution score per image in [0, 1], low = atypical; the outlier
    mask: mean distance to the nearest images beyond the far-out fence)."""
    from cleanlab.outlier import OutOfDistribution

    k = min(NEIGHBOURS, len(features) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = OutOfDistribution(params={"k": k}).fit_score(features=features, verbose=False)
    distance = -np.log(np.clip(scores, 1e-300, None))  # cleanlab's score is exp(-mean distance)
    q1, q3 = np.percentile(distance, [25, 75])
    return scores, distance > q3 + fence * (q3 - q1)


def audit(
    embeddings: Embeddings,
    folds: int | str = 5,
    seed: int = 0,
    similarity: float = SIMILARITY,
    cs: tuple[float, ...] = CS,
) -> Audit:
    """Audit `embeddings` (features from a backbone not trained on their labels): see :class:`Audit`.
    Raises :class:`ConfigError` when `folds` is not an integer >= 2 or a class has fewer images."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(embeddings.labels, dtype=int)
    folds = check_folds(folds, labels, embeddings.classes)
    seconds = {}
    started = time.perf_counter()
    probabilities, c, losses = calibrated_out_of_fold(embeddings.features, labels, folds, seed, cs)
    seconds["probe"] = time.perf_counter() - started
    started = time.perf_counter()
    present = np.flatnonzero(np.bincount(labels, minlength=probabilities.shape[1]))
    # cleanlab wants labels 0..K'-1 over the classes present: a class without images would break it.
    relabel = np.full(probabilities.shape[1], -1)
    relabel[present] = np.arange(len(present))
    dense = probabilities[:, present] / probabilities[:, present].sum(axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        issues = find_label_issues(relabel[labels], dense)
    quality = get_label_quality_scores(relabel[labels], dense)
    seconds["label_issues"] = time.perf_counter() - started
    started = time.perf_counter()
    pairs = near_duplicates(embeddings.features, embeddings.splits, embeddings.paths, similarity)
    seconds["duplicates"] = time.perf_counter() - started
    started = time.perf_counter()
    outlier_score, outlier = outlier_scores(embeddings.features)
    seconds["outliers"] = time.perf_counter() - started
    suggested = probabilities.argmax(axis=1)
    correct = int((suggested == labels).sum())
    return Audit(
        paths=embeddings.paths,
        splits=embeddings.splits,
        labels=labels,
        classes=list(embeddings.classes),
        backbone=embeddings.backbone,
        probabilities=probabilities,
        suggested=suggested,
        label_quality=quality,
        label_issue=issues,
        outlier_score=outlier_score,
        outlier=outlier,
        duplicate_of=closest_duplicate(pairs, len(labels)),
        pairs=pairs,
        folds=folds,
        accuracy=correct / len(labels),
        interval=wilson(correct, len(labels)),
        similarity=similarity,
        c=c,
        log_loss=losses,
        seconds=seconds,
    )


def summary_lines(summary: dict, skipped: dict[str, str]) -> list[str]:
    """One line per fact of an audit's `summary` (see :meth:`finetune.use.audit.Audit.summary`)."""
    per_split = ", ".join(f"{s} {n}" for s, n in summary["images_per_split"].items())
    low, high = summary["kfold_accuracy_95ci"]
    pairs, across, leaks = summary["duplicate_pairs"], summary["duplicate_pairs_across_splits"], summary["leaks"]
    lines = [
        f"audited {summary['images']} images ({per_split}), {len(summary['classes'])} classes, "
        f"{summary['backbone']} features, {summary['folds']}-fold linear probe",
        f"k-fold accuracy {summary['kfold_accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}) against the given labels",
        f"{summary['label_issues']} likely label errors (confident learning)"
        + (": the top rows of audit.csv, suspects.png" if summary["label_issues"] else ""),
        f"{pairs} near-duplicate pairs (thumbnails correlate >= {summary['duplicate_similarity']:g}), "
        f"{across} across splits" + (f", {leaks} of them train <-> val/test leaks" if leaks else ""),
        f"{summary['outliers']} outliers (far from every other image)",
    ]
    if skipped:
        shown = ", ".join(list(skipped)[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        lines.append(f"skipped {len(skipped)} unreadable files: {shown}")
    return lines
