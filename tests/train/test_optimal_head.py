"""The head fitted to its optimum on frozen features: the same answer as scikit-learn's logistic
regression, a cross-validated L2 strength, the L-BFGS run path (epochs, checkpoints, calibration
from the cached features) and the choice between L-BFGS and SGD."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK, TINY
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from finetune import fit
from finetune.compute.l2_choice import choose_l2
from finetune.compute.linear_probe import Problem, feature_scale, view_rows
from finetune.compute.linear_probe import fit as fit_head
from finetune.errors import ConfigError


@pytest.fixture(scope="module")
def digits():
    """Real features: scikit-learn's 8x8 digits as 64 pixel values, split 75/25 in a fixed order."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return x[:1350], y[:1350], x[1350:], y[1350:]


@pytest.mark.parametrize("c", [0.05, 1.0])
def test_the_optimal_head_is_scikit_learns_logistic_regression(digits, c):
    x, y, x_val, y_val = digits
    l2 = 1.0 / (c * len(x))  # scikit-learn's C on n rows is l2 = 1 / (C n) of the mean loss
    weight, bias = fit_head(Problem(x.double(), y, 10), l2, max_iter=1000)
    ours = x_val.double() @ weight.double().T + bias.double()
    sklearn = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(x.numpy(), y.numpy())
    assert (ours.argmax(dim=1).numpy() == sklearn.predict(x_val.numpy())).all()
    probabilities = torch.softmax(ours, dim=1).numpy()
    np.testing.assert_allclose(probabilities, sklearn.predict_proba(x_val.numpy()), atol=2e-3)


def test_the_multilabel_head_is_one_logistic_regression_per_label(digits):
    x, y, x_val, _ = digits
    targets = torch.stack([y % 2 == 0, y >= 5, (y == 3) | (y == 8)], dim=1).float()  # three labels
    c = 0.3
    weight, bias = fit_head(Problem(x.double(), targets, 3, multilabel=True), 1.0 / (c * len(x)), max_iter=1000)
    ours = torch.sigmoid(x_val.double() @ weight.double().T + bias.double()).numpy()
    sklearn = OneVsRestClassifier(LogisticRegression(C=c, max_iter=5000, tol=1e-10)).fit(x.numpy(), targets.numpy())
    np.testing.assert_allclose(ours, sklearn.predict_proba(x_val.numpy()), atol=2e-3)


def test_the_fit_solves_around_the_features_mean_so_a_shared_offset_costs_nothing(digits):
    """Pooled activations share a large positive mean; with an unpenalized bias a constant offset
    changes neither the optimum's weights nor its predictions, and solving around the mean keeps
    L-BFGS as quick as on centered features (100 iterations on the raw, offset problem stopped
    short of it: weights off by 0.12, 3 of 447 held-out predictions different)."""
    x, y, x_val, _ = digits
    l2 = 1.0 / (0.5 * len(x))
    reference, reference_bias = fit_head(Problem(x.double(), y, 10), l2, max_iter=1000)
    offset = torch.full((x.shape[1],), 4.0, dtype=torch.float64)  # the mean of 64 pixels that are 0.3 on average
    weight, bias = fit_head(Problem(x.double() + offset, y, 10), l2, max_iter=100)
    np.testing.assert_allclose(weight.numpy(), reference.numpy(), atol=2e-3)
    shifted = (x_val.double() + offset) @ weight.T + bias
    assert torch.equal(shifted.argmax(dim=1), (x_val.double() @ reference.T + reference_bias).argmax(dim=1))


def test_cross_validation_picks_the_best_strength_it_reports(digits):
    x, y, _, _ = digits
    views = torch.stack([x, x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))])
    grid = (1e-1, 1e-2, 1e-3, 1e-4)
    choice = choose_l2(views, y, 10, grid=grid, folds=3, patience=5, refine=False)
    assert choice.grid == grid and len(choice.scores) == len(grid)
    assert choice.score == max(choice.scores) and choice.strength == grid[choice.scores.index(choice.score)]
    assert choice.l2 == pytest.approx(choice.strength * feature_scale(views))
    assert choice.scores[0] < choice.score  # the strongest penalty underfits 8x8 digits
    # Refining tries the half decades beside the best, and keeps whichever scores best.
    refined = choose_l2(views, y, 10, grid=grid, folds=3, patience=5)
    assert len(refined.grid) in (5, 6) and set(grid) < set(refined.grid)
    assert refined.score == max(refined.scores) >= choice.score
    # The walk down the grid stops once the scores have fallen `patience` times.
    stopped = choose_l2(views, y, 10, grid=(1e2, 1e1, 1e0, 1e-1, 1e-2, 1e-3, 1e-4), folds=3, patience=1, refine=False)
    peak = stopped.scores.index(max(stopped.scores))
    assert len(stopped.scores) == min(7, peak + 2)


def test_cross_validation_without_copies_chooses_as_with_the_fold_order_copy(digits, monkeypatch):
    """Large caches are cross-validated without a copy (each fit indexes its rows of all the
    logits); the folds, fits and scores are the same as through the fold-order copy."""
    from finetune.compute import l2_choice

    x, y, _, _ = digits
    views = torch.stack([x, x.flip(1)])
    grid = (1e-1, 1e-2, 1e-3)
    copied = choose_l2(views, y, 10, grid=grid, folds=3, refine=False)
    monkeypatch.setattr(l2_choice, "FOLD_ORDER_BYTES", 0)
    indexed = choose_l2(views, y, 10, grid=grid, folds=3, refine=False)
    assert indexed.strength == copied.strength
    assert indexed.scores == pytest.approx(copied.scores, abs=2e-3)


def test_view_rows_keep_every_view_of_the_chosen_images():
    views = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    rows, targets = view_rows(views, torch.tensor([0, 1, 2]), np.array([0, 2]))
    assert rows.tolist() == [[0, 1], [4, 5], [6, 7], [10, 11]] and targets.tolist() == [0, 2, 0, 2]


def _run(tmp_path: Path, image_folder: Path, name: str, *extra: str, recipe: str = "freeze_all_but_head"):
    return fit(
        recipe,
        TINY
        + QUICK
        + [
            "data=folder",
            f"data.root={image_folder}",
            "data.batch_size=8",
            "trainer.max_epochs=4",
            "head.fit.folds=2",
            f"data.cache.dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / name}",
            *extra,
        ],
    )


def test_a_head_only_run_reaches_the_optimum_of_the_cross_validated_strength(tmp_path, image_folder, capsys):
    from safetensors.torch import load_file

    result = _run(tmp_path, image_folder, "lbfgs", "augment=none", "head.fit.iterations=400")
    out = capsys.readouterr().out
    assert "full-batch L-BFGS" in out and "chosen by 2-fold cross-validation" in out and "lbfgs" in out
    assert len(result.history) == 4 and result.best_checkpoint.is_file()
    l2 = json.loads(next((tmp_path / "cache" / "features").glob("*.l2-*.json")).read_text())["l2"]
    stored = load_file(str(next((tmp_path / "cache" / "features").glob("*.safetensors"))))
    rows, targets = view_rows(stored["features.train"], stored["labels.train"])
    weight, bias = fit_head(Problem(rows.double(), targets, 3), l2, max_iter=2000)
    linear = result.model.head[-1]
    val = stored["features.val"].double()
    torch.testing.assert_close(
        torch.softmax(val @ linear.weight.double().T + linear.bias.double(), 1),
        torch.softmax(val @ weight.double().T + bias.double(), 1),
        atol=1e-3,
        rtol=0,
    )

    # A second run on the same features remembers the strength: no cross-validation again.
    _run(tmp_path, image_folder, "again", "augment=none")
    assert "remembered" in capsys.readouterr().out


def test_calibration_from_cached_features_equals_the_image_pass(tmp_path, image_folder):
    from finetune.train import trust

    result = _run(tmp_path, image_folder, "cal", "augment=none", "trainer.precision=32-true")
    stored = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["finetune"]["trust"]

    class Module:  # what calibrate_and_store reads of a module
        model = result.model.eval()
        classes = result.classes

    from omegaconf import OmegaConf

    from finetune.data.sources import load_data
    from finetune.data.transforms import with_input_size
    from finetune.model.build import backbone_from_config

    cfg = OmegaConf.create(result.config)
    splits = load_data(cfg.data, cfg.seed, "multiclass")
    data_config = with_input_size(backbone_from_config(cfg).data_config, cfg.data.image_size)
    metrics, again = trust.calibrate_and_store(Module(), splits, data_config, None, cfg.trust, 8)  # through images
    assert again["temperature"] == pytest.approx(stored["temperature"], rel=1e-3)
    assert metrics["val/nll"] == pytest.approx(result.metrics["val/nll"], rel=1e-4)


def test_a_capped_head_only_run_calibrates_on_the_cached_rows_validation_read(tmp_path, image_folder):
    """12 validation images, one batch of 8 read per epoch: the temperature is fitted on those 8
    cached rows, as a capped run through the images calibrates on its first 8 images."""
    result = _run(tmp_path, image_folder, "capped", "augment=none", "+trainer.limit_val_batches=1")
    trust = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["finetune"]["trust"]
    assert trust["temperature_split"] == "val (8 images)" and len(trust["val"]["confidence"]) == 8


def test_solver_choice_follows_the_head_and_the_techniques(tmp_path, image_folder, capsys):
    _run(tmp_path, image_folder, "mlp", "head=mlp")
    assert "full-batch L-BFGS" not in capsys.readouterr().out
    _run(tmp_path, image_folder, "mixup", "mixup.alpha=0.4")
    assert "not L-BFGS: mixup is on" in capsys.readouterr().out
    _run(tmp_path, image_folder, "sgd", "head.fit.solver=sgd")
    out = capsys.readouterr().out
    assert "L-BFGS" not in out and "0.01" in out
    with pytest.raises(ConfigError, match="head.fit.solver=lbfgs fits a linear head"):
        _run(tmp_path, image_folder, "refused", "head=mlp", "head.fit.solver=lbfgs")
    with pytest.raises(ConfigError, match="head.fit.l2="):
        _run(tmp_path, image_folder, "bad_l2", "head.fit.l2=-1")
    with pytest.raises(ConfigError, match="head.fit.solver="):
        _run(tmp_path, image_folder, "bad_solver", "head.fit.solver=newton")
