"""Predictions you can trust: temperature scaling, abstaining, conformal prediction sets (against
MAPIE), and all three through training, finetune.load, the predict/evaluate/export commands and ONNX."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK, TINY, fit_tiny_on_folders
from sklearn.base import BaseEstimator, ClassifierMixin

from finetune import fit, load
from finetune.commands import evaluate_command, export_command, predict_command
from finetune.errors import ConfigError, DataError
from finetune.use.calibration import calibration_scores, fit_temperature, reliability_bins
from finetune.use.confidence import (
    DecisionRule,
    conformal_scores,
    conformal_threshold,
    decision_rule,
    precision_lower_bounds,
    precision_threshold,
    prediction_sets,
)


def synthetic(n: int, classes: int = 5, true_temperature: float = 2.0, seed: int = 0):
    """Logits and labels drawn from softmax(logits / true_temperature): a model over-confident by that factor."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(size=(n, classes)) * 4)
    probabilities = (logits / true_temperature).softmax(1).numpy()
    labels = torch.tensor([rng.choice(classes, p=row) for row in probabilities])
    return logits, labels


def test_temperature_recovers_the_true_one_and_lowers_ece_and_nll():
    logits, labels = synthetic(4000)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.0, rel=0.08)
    before, after = (
        calibration_scores(logits.softmax(1), labels),
        calibration_scores((logits / temperature).softmax(1), labels),
    )
    assert after["ece"] < 0.5 * before["ece"] and after["nll"] < before["nll"] and after["brier"] < before["brier"]
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0
    right = logits.argmax(1)  # no mistake: the NLL has no minimum (T -> 0), so T stays 1
    assert fit_temperature(logits, right) == 1.0 and fit_temperature(logits[:50] / 10, right[:50]) == 1.0


def test_calibration_scores_are_the_textbook_ones():
    logits, labels = synthetic(300, seed=1)
    p = logits.softmax(1)
    scores = calibration_scores(p, labels)
    assert scores["nll"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    assert scores["brier"] == pytest.approx(float(((p - F.one_hot(labels, 5)) ** 2).sum(1).mean()), rel=1e-6)
    bins = reliability_bins(p, labels)
    counted = [b for b in bins if b["count"]]
    assert sum(b["count"] for b in bins) == 300
    # ECE is the count-weighted gap of the same bins
    ece = sum(b["count"] / 300 * abs(b["confidence"] - b["accuracy"]) for b in counted)
    assert scores["ece"] == pytest.approx(ece, abs=1e-5)


class GivenProbabilities(ClassifierMixin, BaseEstimator):
    """A prefit scikit-learn classifier whose inputs are its predicted probabilities (for MAPIE)."""

    def fit(self, X, y):
        self.classes_ = np.arange(X.shape[1])
        return self

    def predict_proba(self, X):
        return np.asarray(X)

    def predict(self, X):
        return np.asarray(X).argmax(1)


@pytest.mark.parametrize("score,include_last", [("lac", None), ("aps", True)])
def test_prediction_sets_equal_mapies(score, include_last):
    from mapie.classification import SplitConformalClassifier

    logits, labels = synthetic(800, seed=2, true_temperature=1.0)
    p, y = (logits / 2).softmax(1).numpy(), labels.numpy()
    cal, new = slice(0, 400), slice(400, 800)
    mapie = SplitConformalClassifier(
        GivenProbabilities().fit(p[cal], y[cal]),
        confidence_level=0.9,
        conformity_score=score,
        prefit=True,
        random_state=0,
    )
    mapie.conformalize(p[cal], y[cal])
    _, theirs = mapie.predict_set(
        p[new], conformity_score_params={"include_last_label": include_last} if include_last is not None else None
    )
    ours = prediction_sets(p[new], conformal_threshold(conformal_scores(p[cal], y[cal], score), 0.9), score)
    assert np.array_equal(ours, theirs[:, :, 0])


def test_conformal_coverage_holds_over_random_resplits():
    logits, labels = synthetic(1000, seed=3, true_temperature=1.0)
    p, y = logits.softmax(1).numpy(), labels.numpy()
    rng = np.random.default_rng(0)
    for score in ("lac", "aps"):
        coverage = []
        for _ in range(100):
            order = rng.permutation(len(y))
            cal, new = order[:500], order[500:]
            sets = prediction_sets(p[new], conformal_threshold(conformal_scores(p[cal], y[cal], score), 0.9), score)
            coverage.append(sets[np.arange(500), y[new]].mean())
        # lac: close to the target; aps keeps the class that crosses the threshold: at or above it
        assert 0.89 <= np.mean(coverage) <= (0.92 if score == "lac" else 1.0)
    assert (prediction_sets(p, conformal_threshold(conformal_scores(p, y, "aps"), 0.9), "aps").sum(1) >= 1).all()


def test_precision_threshold_keeps_one_standard_error_to_spare():
    from scipy.stats import binomtest

    rng = np.random.default_rng(4)
    confidence = np.round(rng.uniform(0.5, 1.0, 400), 2)  # ties: 51 distinct values
    correct = rng.uniform(size=400) < confidence
    thresholds, bounds = precision_lower_bounds(confidence, correct)
    assert len(thresholds) == len(np.unique(confidence)) and (np.diff(thresholds) < 0).all()
    for t, bound in zip(thresholds[::10], bounds[::10]):
        accepted = confidence >= t
        wilson = binomtest(int(correct[accepted].sum()), int(accepted.sum())).proportion_ci(0.682689492, "wilson")
        assert bound == pytest.approx(wilson.low, abs=1e-9)
    chosen = precision_threshold(confidence, correct, 0.9)
    assert bounds[thresholds == chosen][0] >= 0.9 and (bounds[thresholds < chosen] < 0.9).all()
    # 0.99 with one standard error to spare: 99 right answers in a row, not 98
    assert precision_threshold(np.linspace(1, 0.5, 99), np.ones(99, bool), 0.99) == 0.5
    assert precision_threshold(np.linspace(1, 0.5, 98), np.ones(98, bool), 0.99) is None


def test_decision_rule_refuses_what_it_cannot_honour():
    trust = {"temperature": 1.0, "val": {"confidence": [0.9, 0.8], "correct": [False, True]}}
    with pytest.raises(ConfigError, match="calibration split"):
        decision_rule(trust, "multiclass", coverage=0.9)
    with pytest.raises(ConfigError, match="not both"):
        decision_rule(trust, "multiclass", min_confidence=0.5, target_precision=0.9)
    with pytest.raises(
        ConfigError,
        match=r"cannot be shown on the 2 validation images .* needs 99 answered .* "
        r"the most they support is 0.211",
    ):
        decision_rule(trust, "multiclass", target_precision=0.99)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        decision_rule(trust, "multiclass", coverage=1.5)
    with pytest.raises(ConfigError, match="multi-class"):
        decision_rule(trust, "multilabel", min_confidence=0.5)
    with pytest.raises(ConfigError, match="lacks"):
        decision_rule({}, "multiclass", target_precision=0.9)
    small = {"calibration": {"score": "lac", "scores": {"lac": [0.1] * 5, "aps": [0.5] * 5}}}
    with pytest.raises(ConfigError, match="at least 9 calibration images, this model has 5"):
        decision_rule(small, "multiclass", coverage=0.9)
    assert decision_rule(small, "multiclass", coverage=0.8).threshold == 0.1
    assert decision_rule({}, "multiclass") == DecisionRule()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    return fit_tiny_on_folders(root, 16, 6, extra=("trust.calibration_fraction=0.25",)), root


def test_a_run_fits_a_temperature_and_holds_out_a_calibration_split(calibrated):
    result, root = calibrated
    assert result.data_report.images["calibration"] == 12 and result.data_report.images["train"] == 36
    model = load(result.best_checkpoint)
    assert model.temperature == result.metrics["temperature"] > 0
    assert len(model.trust["val"]["confidence"]) == 18 and len(model.trust["calibration"]["scores"]["lac"]) == 12
    images = sorted((root / "data" / "val").glob("*/*.jpg"))
    with torch.no_grad():
        logits = model.model(model.preprocess(images))
    labels = torch.tensor([model.classes.index(p.parent.name) for p in images])
    # the temperature is the one the validation images give through finetune.load's own pipeline
    assert model.temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-5)
    assert torch.allclose(model.probabilities(images), (logits / model.temperature).softmax(1), atol=1e-6)
    for name in ("val/ece", "val/ece_calibrated", "val/nll", "val/nll_calibrated"):
        assert name in result.metrics
    # val/nll_calibrated is the minimum over T of the NLL on val: never above T = 1's
    assert result.metrics["val/nll_calibrated"] <= result.metrics["val/nll"] + 1e-6


def test_predict_abstains_and_gives_sets(calibrated, tmp_path, capsys):
    result, root = calibrated
    model = load(result.best_checkpoint)
    images = sorted((root / "data" / "val").glob("*/*.jpg"))
    everything = model.predict(images, coverage=0.9)
    assert all(p.prediction_set is not None and not p.unknown for p in everything)
    assert all(p.label != "unknown" for p in everything)
    middle = float(np.median([p.probability for p in everything]))
    cautious = model.predict(images, min_confidence=middle)
    assert [p.unknown for p in cautious] == [p.probability < middle for p in everything]
    assert all(p.label == "unknown" for p in cautious if p.unknown) and 0 < sum(p.unknown for p in cautious) < 18
    assert [p.top_k for p in cautious] == [p.top_k for p in everything]  # the probabilities stay
    assert (
        predict_command(
            [
                f"ckpt={result.best_checkpoint}",
                f"input={root / 'data' / 'val'}",
                "coverage=0.9",
                "min_confidence=0.6",
                f"out={tmp_path}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "unknown (confidence < 0.6000)" in printed
        and "mean set size" in printed
        and "(lac sets, coverage 0.9)" in printed
    )
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == 18 and {"answer", "prediction_set"} <= set(rows[0])
    saved = json.loads((tmp_path / "predictions.json").read_text())
    assert saved["temperature"] == model.temperature and saved["conformal"]["coverage"] == 0.9
    for bad, message in (
        ("coverage=2", "between 0 and 1"),
        ("min_confidence=abc", "a number"),
        ("conformal=raps", "choose lac or aps"),
    ):
        with pytest.raises(ConfigError, match=message):
            extra = ["coverage=0.9"] if bad.startswith("conformal") else []
            predict_command(
                [f"ckpt={result.best_checkpoint}", f"input={root / 'data' / 'val'}", bad, *extra, f"out={tmp_path}"]
            )


def test_evaluate_reports_calibration_abstaining_and_coverage(calibrated, tmp_path, capsys):
    result, root = calibrated
    assert (
        evaluate_command(
            [
                f"ckpt={result.best_checkpoint}",
                f"input={root / 'data' / 'val'}",
                "coverage=0.8",
                "min_confidence=0.5",
                f"out={tmp_path}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "calibration (temperature" in printed and "abstain below confidence 0.5000" in printed
    assert "prediction sets (lac, coverage 0.8)" in printed
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["abstain"]["answered"] + report["abstain"]["unknown"] == 18
    assert set(report["calibration"]["before"]) == {"ece", "nll", "brier"}
    assert report["calibration"]["after"]["nll"] == pytest.approx(result.metrics["val/nll_calibrated"], rel=1e-4)
    for picture in ("reliability.png", "risk_coverage.png"):
        assert (tmp_path / "viz" / picture).stat().st_size > 10_000


def test_onnx_export_carries_the_temperature_and_the_rule(calibrated, tmp_path, capsys):
    import onnxruntime as ort

    result, root = calibrated
    assert (
        export_command(
            [
                f"ckpt={result.best_checkpoint}",
                "format=onnx",
                f"input={root / 'data' / 'val'}",
                "coverage=0.9",
                "min_confidence=0.5",
                f"out={tmp_path}",
            ]
        )
        == 0
    )
    assert "8/8 images get the same answer (class, unknown, set)" in capsys.readouterr().out
    model = load(result.best_checkpoint)
    preprocessing = json.loads((tmp_path / "preprocessing.json").read_text())
    assert preprocessing["temperature"] == model.temperature
    assert preprocessing["abstain"]["min_confidence"] == 0.5
    assert preprocessing["conformal"]["threshold"] == model.decision_rule(coverage=0.9).threshold
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    images = sorted((root / "data" / "val").glob("*/*.jpg"))
    logits, probabilities = session.run(None, {"images": model.preprocess(images).numpy()})
    assert np.allclose(probabilities, model.probabilities(images).numpy(), atol=1e-5)
    rule = model.decision_rule(coverage=0.9, min_confidence=0.5)
    assert np.array_equal(rule.sets(probabilities), rule.sets(model.probabilities(images).numpy()))


def test_bad_trust_settings_are_refused(tmp_path, image_folder):
    base = TINY + QUICK + ["data=folder", f"data.root={image_folder}", f"hydra.run.dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match="trust.calibration_fraction"):
        fit(overrides=base + ["trust.calibration_fraction=1.5"])
    with pytest.raises(ConfigError, match="trust.conformal"):
        fit(overrides=base + ["trust.conformal=raps"])


def test_calibration_split_is_refused_for_multilabel(tmp_path):
    from conftest import write_multilabel_manifest

    manifest = write_multilabel_manifest(tmp_path / "data")
    with pytest.raises(DataError, match="multi-label"):
        fit(
            overrides=TINY
            + QUICK
            + [
                "task=multilabel",
                "data=csv",
                f"data.csv={manifest}",
                "data.path_column=file",
                "data.label_column=labels",
                "data.label_sep=' '",
                "trust.calibration_fraction=0.2",
                f"hydra.run.dir={tmp_path / 'run'}",
            ]
        )
