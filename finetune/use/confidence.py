"""What a multi-class model answers besides its top class: "unknown" below a confidence, and
conformal prediction sets.

**Abstain.** An image whose top (calibrated) probability is below ``min_confidence`` gets the
answer :data:`UNKNOWN`. :func:`precision_threshold` picks that confidence for a target precision
from labelled held-out data (the validation split): the lowest threshold at which the accepted
images are right at least that often with one standard error to spare, so as many images as
possible keep an answer and the precision holds on new images.

**Prediction sets** (split conformal prediction, Vovk et al. 2005; Angelopoulos & Bates 2021,
"A Gentle Introduction to Conformal Prediction"). A conformity score of the true class is
computed on n calibration images never used to train or to pick the model; its
``ceil((n + 1) * coverage)``-th smallest value q makes, for a new exchangeable image, the set
of classes whose score is at most q hold the true class with probability >= coverage.
Scores (:data:`CONFORMAL_SCORES`):

- ``lac``: 1 - p(class) (Sadinle et al. 2019): the smallest sets on average; a set is empty when
  no class is plausible enough (read it as "unknown"); coverage is close to the target, not above.
- ``aps``: the probability mass of the classes ranked at or above the class (Romano et al. 2020),
  randomized on the calibration images only; a set takes classes by falling probability up to
  and including the one whose cumulative mass reaches q: sets adapt to how hard an image is, are
  never empty and cover a little more than the target.

These few lines over numpy are checked against MAPIE's ``SplitConformalClassifier`` (lac, and aps
with ``include_last_label=True``) in tests/use/test_confidence.py; MAPIE wants a scikit-learn estimator, a
torch model's probabilities are simpler to score here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from finetune.errors import ConfigError

UNKNOWN = "unknown"
CONFORMAL_SCORES = ("lac", "aps")


def precision_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """The lowest confidence threshold t such that the images with confidence >= t are right
    `target` of the time with one standard error to spare (the Wilson lower bound of their
    precision, :func:`precision_lower_bounds`, is at least `target`; ties in confidence are
    accepted or refused together), or None when no threshold gets there.

    The margin is there because the threshold with the most answers whose plain precision just
    reaches the target is picked among hundreds: on new images it falls short (benchmarks/trust.py:
    0.94 and 0.96 for a 0.99 target in two of eight runs without it). It also means a small
    validation split cannot promise much: 0.99 needs 99 answered images without a mistake."""
    thresholds, bounds = precision_lower_bounds(confidence, correct)
    reached = np.flatnonzero(bounds >= target - 1e-12)  # 99 / 100 is 0.99 exactly
    return float(thresholds[reached[-1]]) if len(reached) else None


def precision_lower_bounds(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each distinct confidence, from the highest, as a threshold; the Wilson score lower bound,
    z = 1, of the precision of the images at or above it). Wilson (1927) rather than the plain
    share, which says 1.0 for 3 right answers out of 3."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    n = np.arange(1, len(correct) + 1)
    share = np.cumsum(correct) / n
    z2 = 1.0  # z = 1: one standard error
    bounds = (share + z2 / (2 * n) - np.sqrt(share * (1 - share) / n + z2 / (4 * n**2))) / (1 + z2 / n)
    # Only the last image of a run of equal confidences is a threshold (the run goes in whole).
    last_of_tie = np.r_[confidence[1:] != confidence[:-1], True] if len(confidence) else np.zeros(0, bool)
    return confidence[last_of_tie], bounds[last_of_tie]


def conformal_scores(probabilities: np.ndarray, labels: np.ndarray, score: str, seed: int = 0) -> np.ndarray:
    """(N,) conformity score of each calibration image's true class (larger: less conforming).
    ``aps`` draws one uniform U per image from `seed` (numpy's RandomState, as MAPIE does)."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    true_p = probabilities[np.arange(len(labels)), labels]
    if score == "lac":
        return 1.0 - true_p
    if score == "aps":
        # The mass of the classes ranked at or above the true one, less a uniform share of the
        # true class's own (randomized APS): calibration then matches the coverage closely,
        # while sets stay deterministic by keeping the class that crosses the threshold.
        mass = np.where(probabilities >= true_p[:, None], probabilities, 0.0).sum(axis=1)
        return mass - np.random.RandomState(seed).uniform(size=len(labels)) * true_p
    raise ConfigError(f"conformal score {score!r}; choose {' or '.join(CONFORMAL_SCORES)}.")


def conformal_threshold(scores: np.ndarray, coverage: float) -> float:
    """q: the ``ceil((n + 1) * coverage)``-th smallest of the n calibration `scores`
    (the finite-sample correction that makes the coverage guarantee hold); infinite, i.e. every
    class in every set, when n is too small for `coverage` (n < coverage / (1 - coverage))."""
    check_coverage(coverage)
    rank = math.ceil((len(scores) + 1) * coverage)  # the rank-th smallest score
    if rank > len(scores):
        return math.inf
    return float(np.sort(np.asarray(scores, dtype=np.float64))[rank - 1])


def prediction_sets(probabilities: np.ndarray, threshold: float, score: str) -> np.ndarray:
    """(N, C) bool: the classes in each image's set at conformal `threshold`."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if score == "lac":
        return probabilities >= 1.0 - threshold
    if score == "aps":
        order = np.argsort(-probabilities, axis=1, kind="stable")
        ranked = np.take_along_axis(probabilities, order, axis=1)
        mass_before = np.cumsum(ranked, axis=1) - ranked
        chosen = np.zeros_like(probabilities, dtype=bool)
        np.put_along_axis(chosen, order, mass_before < threshold, axis=1)
        return chosen
    raise ConfigError(f"conformal score {score!r}; choose {' or '.join(CONFORMAL_SCORES)}.")


def _images_needed(target: float) -> int:
    """How many answers without a mistake bring the Wilson (z = 1) lower bound to `target`: n / (n + 1)."""
    return math.ceil(target / (1 - target)) if target < 1 else math.inf


def check_coverage(coverage: float) -> None:
    if not 0.0 < coverage < 1.0:
        raise ConfigError(
            f"coverage={coverage}: the share of images whose set holds the true class, between 0 and 1 (e.g. 0.9)."
        )


@dataclass(frozen=True)
class DecisionRule:
    """How probabilities become answers: ``min_confidence`` (None: always answer) and the
    conformal ``score`` with its ``threshold`` (None: no sets). ``describe()`` is what
    ``preprocessing.json`` carries, so any runtime can apply the rule to exported logits."""

    min_confidence: float | None = None
    score: str | None = None
    threshold: float | None = None
    coverage: float | None = None
    target_precision: float | None = None

    def answers(self, probabilities: np.ndarray) -> np.ndarray:
        """(N,) the top class index, or -1 (unknown) where its probability is below min_confidence."""
        probabilities = np.asarray(probabilities)
        top = probabilities.argmax(axis=1) if probabilities.size else np.zeros(len(probabilities), np.int64)
        if self.min_confidence is None:
            return top
        return np.where(probabilities.max(axis=1, initial=0.0) >= self.min_confidence, top, -1)

    def sets(self, probabilities: np.ndarray) -> np.ndarray | None:
        if self.score is None:
            return None
        return prediction_sets(probabilities, self.threshold, self.score)

    def describe(self) -> dict:
        rule = {}
        if self.min_confidence is not None:
            rule["abstain"] = {
                "min_confidence": self.min_confidence,
                "target_precision": self.target_precision,
                "rule": f"answer {UNKNOWN!r} when the top probability < min_confidence",
            }
        if self.score is not None:
            rule["conformal"] = {
                "score": self.score,
                "coverage": self.coverage,
                "threshold": self.threshold,
                "rule": "the classes with 1 - p <= threshold"
                if self.score == "lac"
                else "classes by falling p while the mass of those before < threshold",
            }
        return rule


def decision_rule(
    trust: dict,
    task: str,
    min_confidence: float | None = None,
    target_precision: float | None = None,
    coverage: float | None = None,
    score: str | None = None,
) -> DecisionRule:
    """The rule for a model whose checkpoint stored `trust` (``temperature``; ``val``: the
    validation images' calibrated ``confidence`` and whether each was ``correct``;
    ``calibration``: conformity ``scores`` per score name of the calibration split, and the
    default ``score``). No option: a rule that always answers and makes no sets. Every way an
    option cannot be honoured is a ConfigError saying what to do instead."""
    asked = [
        name
        for name, value in (
            ("min_confidence", min_confidence),
            ("target_precision", target_precision),
            ("coverage", coverage),
        )
        if value is not None
    ]
    if not asked:
        return DecisionRule()
    if task != "multiclass":
        raise ConfigError(
            f"{asked[0]}= applies to multi-class models; a multi-label model decides each label at its "
            f"own threshold (tuned on the validation split)."
        )
    if min_confidence is not None and target_precision is not None:
        raise ConfigError(
            "Give min_confidence= or target_precision= (which picks min_confidence on the validation split), not both."
        )
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"min_confidence={min_confidence}: a probability between 0 and 1.")
    if target_precision is not None:
        min_confidence = _confidence_for(trust, target_precision)
    threshold = None
    if coverage is not None:
        check_coverage(coverage)
        calibration = trust.get("calibration")
        if not calibration:
            raise ConfigError(
                "coverage= needs a calibration split the model was neither trained nor selected on; "
                "this model has none: train with trust.calibration_fraction=0.1 (a stratified tenth of "
                "the training images held out for it)."
            )
        score = score or calibration["score"]
        if score not in calibration["scores"]:
            raise ConfigError(f"conformal score {score!r}; choose {' or '.join(calibration['scores'])}.")
        scores = np.asarray(calibration["scores"][score])
        threshold = conformal_threshold(scores, coverage)
        if math.isinf(threshold):
            needed = next(n for n in range(len(scores) + 1, 10**7) if math.ceil((n + 1) * coverage) <= n)
            raise ConfigError(
                f"coverage={coverage} needs at least {needed} calibration images, this model has "
                f"{len(scores)}: every class would be in every set. Give a lower coverage, or train with "
                f"a larger trust.calibration_fraction."
            )
    return DecisionRule(min_confidence, score if coverage is not None else None, threshold, coverage, target_precision)


def _confidence_for(trust: dict, target: float) -> float:
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target_precision={target}: the share of answered images that are right, e.g. 0.99.")
    val = trust.get("val")
    if not val or not val["confidence"]:
        raise ConfigError(
            "target_precision= picks its threshold on the validation split's predictions, which this "
            "checkpoint lacks (written before calibration or without a validation split): give "
            "min_confidence= instead."
        )
    confidence, correct = np.asarray(val["confidence"]), np.asarray(val["correct"])
    found = precision_threshold(confidence, correct, target)
    if found is None:
        bounds = precision_lower_bounds(confidence, correct)[1]
        raise ConfigError(
            f"target_precision={target} cannot be shown on the {len(confidence)} validation images "
            f"(with one standard error to spare, {target} needs {_images_needed(target)} answered "
            f"without a mistake); the most they support is {bounds.max(initial=0.0):.3f}: give that "
            f"or lower, or min_confidence=."
        )
    return found


def trust_report(logits, labels, temperature: float, rule: DecisionRule) -> dict:
    """What `evaluate` says about trust on labelled images: ``calibration`` (ECE, NLL, Brier of
    the softmax and of the calibrated softmax), ``abstain`` when `rule` abstains (images answered
    and unknown, precision on the answered), ``sets`` when it makes sets (the share holding the true
    class, mean size, empty sets). `logits` (N, C) torch, `labels` (N,)."""
    from finetune.use.calibration import calibration_scores

    calibrated = (logits / temperature).softmax(dim=1)
    report = {
        "calibration": {
            "temperature": temperature,
            "before": calibration_scores(logits.softmax(dim=1), labels),
            "after": calibration_scores(calibrated, labels),
        }
    }
    probabilities, truth = calibrated.numpy(), labels.numpy()
    if rule.min_confidence is not None:
        answers = rule.answers(probabilities)
        answered = answers >= 0
        report["abstain"] = {
            "min_confidence": rule.min_confidence,
            "target_precision": rule.target_precision,
            "answered": int(answered.sum()),
            "unknown": int((~answered).sum()),
            "coverage": float(answered.mean()) if len(truth) else 0.0,
            "precision": float((answers[answered] == truth[answered]).mean()) if answered.any() else 0.0,
        }
    sets = rule.sets(probabilities)
    if sets is not None:
        sizes = sets.sum(axis=1)
        report["sets"] = {
            "score": rule.score,
            "target": rule.coverage,
            "threshold": rule.threshold,
            "coverage": float(sets[np.arange(len(truth)), truth].mean()) if len(truth) else 0.0,
            "mean_size": float(sizes.mean()) if len(truth) else 0.0,
            "empty": int((sizes == 0).sum()),
            "sizes": {int(k): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))},
        }
    return report


def format_trust_report(report: dict) -> list[str]:
    """One line per fact of :func:`trust_report`."""
    calibration = report["calibration"]
    before, after = calibration["before"], calibration["after"]
    lines = [
        f"calibration (temperature {calibration['temperature']:.3f}, fitted on the validation split): "
        + ", ".join(
            f"{name.upper() if name != 'brier' else 'Brier'} {before[name]:.4f} -> {after[name]:.4f}"
            for name in ("ece", "nll", "brier")
        )
    ]
    if "abstain" in report:
        a = report["abstain"]
        picked = (
            f", picked for target precision {a['target_precision']} on the validation split"
            if a["target_precision"] is not None
            else ""
        )
        lines.append(
            f"abstain below confidence {a['min_confidence']:.4f}{picked}: {a['answered']} answered "
            f"({a['coverage']:.1%}) with precision {a['precision']:.4f}, {a['unknown']} {UNKNOWN}"
        )
    if "sets" in report:
        s = report["sets"]
        lines.append(
            f"prediction sets ({s['score']}, coverage {s['target']}): hold the true class for "
            f"{s['coverage']:.1%} of images, mean size {s['mean_size']:.2f}, {s['empty']} empty"
        )
    return lines


__all__ = [
    "CONFORMAL_SCORES",
    "UNKNOWN",
    "DecisionRule",
    "check_coverage",
    "conformal_scores",
    "conformal_threshold",
    "decision_rule",
    "format_trust_report",
    "precision_lower_bounds",
    "precision_threshold",
    "prediction_sets",
    "trust_report",
]
