"""The notebook API: fit() end to end on a tiny real timm model and generated images."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from conftest import QUICK, TINY
from finetune import FitResult, fit
from finetune.config import compose_config, recipe_names


def test_fit_twice_in_one_process_returns_complete_results(image_folder, tmp_path):
    results = []
    for run in range(2):
        result = fit("freeze_all_but_head", overrides=TINY + QUICK + [f"hydra.run.dir={tmp_path}/run{run}"],
                     data="folder", data__root=image_folder, trainer__max_epochs=2)
        assert not GlobalHydra.instance().is_initialized()
        results.append(result)
    for run, result in enumerate(results):
        assert isinstance(result, FitResult)
        assert result.output_dir == tmp_path / f"run{run}"
        assert {"val/acc", "val/loss", "train/loss"} <= set(result.metrics)
        assert 0.0 <= result.metrics["val/acc"] <= 1.0
        assert result.classes == ["ants", "bees", "wasps"]
        assert not result.model.training
        assert result.best_checkpoint.is_file() and result.best_checkpoint.parent.parent == result.output_dir
        summary = json.loads((result.output_dir / "summary.json").read_text())
        assert summary["metrics"]["val/acc"] == result.metrics["val/acc"]
    # Same seed, same data, same augmentation draws: the same numbers.
    assert results[0].metrics == pytest.approx(results[1].metrics, rel=1e-6)


def test_checkpoint_loads_with_weights_only_and_carries_classes_and_config(image_folder, tmp_path):
    result = fit("freeze_all_but_head", TINY + QUICK + ["data=folder", f"data.root={image_folder}",
                                                        f"hydra.run.dir={tmp_path}"])
    checkpoint = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["finetune"]["classes"] == ["ants", "bees", "wasps"]
    assert checkpoint["finetune"]["config"]["backbone"]["name"] == "test_resnet"
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    model_state = result.model.state_dict()
    assert all(torch.equal(state[k], model_state[k]) for k in model_state)


def test_result_model_predicts_what_training_learned(image_folder, tmp_path):
    """Classes differ by their dominant color: 3 epochs of full fine-tuning learn it."""
    result = fit("full_finetune", TINY + QUICK + ["data=folder", f"data.root={image_folder}",
                                                  "trainer.max_epochs=4", "optimizer.lr=0.05",
                                                  "augment=none", f"hydra.run.dir={tmp_path}"])
    assert result.metrics["val/acc"] >= 0.9, result.history


def test_every_recipe_composes_with_the_config_tree():
    assert {"freeze_all_but_head", "full_finetune"} <= set(recipe_names())
    for name in recipe_names():
        cfg = compose_config([f"+recipe={name}"])
        assert cfg.backbone.name and cfg.optimizer.lr > 0
    assert compose_config(["+recipe=freeze_all_but_head"]).freeze.groups == "all"
    assert list(compose_config(["+recipe=full_finetune"]).freeze.groups) == []


def test_output_dirs_of_runs_in_the_same_second_do_not_collide(tmp_path):
    first = compose_config([f"hydra.run.dir={tmp_path}/same"]).paths.output_dir
    (tmp_path / "same").mkdir()
    second = compose_config([f"hydra.run.dir={tmp_path}/same"]).paths.output_dir
    assert first != second


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_runs_a_few_batches(recipe, image_folder, tmp_path):
    result = fit(recipe, TINY + QUICK + ["data=folder", f"data.root={image_folder}", "trainer.max_epochs=2",
                                         "+trainer.limit_train_batches=2", f"hydra.run.dir={tmp_path}"])
    assert len(result.history) == 2 and "val/acc" in result.metrics
