"""The notebook API: fit() end to end on a tiny real timm model and generated images."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import QUICK, TINY
from hydra.core.global_hydra import GlobalHydra

from finetune import FitResult, fit
from finetune.config import compose_config, recipe_names
from finetune.train.optim import build_scheduler


def test_fit_twice_in_one_process_returns_complete_results(image_folder, tmp_path):
    results = []
    for run in range(2):
        result = fit(
            "freeze_all_but_head",
            overrides=TINY + QUICK + [f"hydra.run.dir={tmp_path}/run{run}"],
            data="folder",
            data__root=image_folder,
            trainer__max_epochs=2,
        )
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
    result = fit(
        "freeze_all_but_head", TINY + QUICK + ["data=folder", f"data.root={image_folder}", f"hydra.run.dir={tmp_path}"]
    )
    checkpoint = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["finetune"]["classes"] == ["ants", "bees", "wasps"]
    assert checkpoint["finetune"]["config"]["backbone"]["name"] == "test_resnet"
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    model_state = result.model.state_dict()
    assert all(torch.equal(state[k], model_state[k]) for k in model_state)


def test_result_model_predicts_what_training_learned(image_folder, tmp_path):
    """Classes differ by their dominant color: 3 epochs of full fine-tuning learn it."""
    result = fit(
        "full_finetune",
        TINY
        + QUICK
        + [
            "data=folder",
            f"data.root={image_folder}",
            "trainer.max_epochs=4",
            "optimizer.lr=0.05",
            "augment=none",
            f"hydra.run.dir={tmp_path}",
        ],
    )
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


def first_backbone_epoch(freeze) -> int | None:
    """The first epoch (0-based) in which some backbone parameter trains, as the recipe's
    ``freeze`` group says; None: the backbone never trains."""
    if not freeze.groups and not freeze.until and not freeze.patterns:
        return 0
    if freeze.unfreeze_at is not None:
        return freeze.unfreeze_at
    return freeze.unfreeze_every  # the group next to the head joins first; None: never


def record_backbone_at_epoch_starts(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """epoch -> a copy of the backbone's parameters when that epoch started, for fit() runs
    started after this call."""
    from finetune.train.module import ClassifierModule

    seen: dict[int, dict[str, torch.Tensor]] = {}
    original = ClassifierModule.on_train_epoch_start

    def on_train_epoch_start(self):
        seen[self.current_epoch] = {n: p.detach().clone() for n, p in self.model.backbone.named_parameters()}
        original(self)

    monkeypatch.setattr(ClassifierModule, "on_train_epoch_start", on_train_epoch_start)
    return seen


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_trains_its_own_backbone_from_the_epoch_its_freeze_plan_says(
    recipe, image_folder, tmp_path, monkeypatch, capsys
):
    """Each recipe as written: its own backbone where it names one (lenet_from_scratch trains
    LeNet-5, not TINY's test_resnet), and long enough to pass its unfreezing epoch (lp_ft:
    epochs 0-4 probe, 5 on fine-tune): the backbone's parameters stay put before the epoch its
    freeze plan names and move from it on, and the lr follows the recipe's step schedule."""
    cfg = compose_config([f"+recipe={recipe}"])
    own_backbone = cfg.backbone.name != compose_config([]).backbone.name
    backbone = ["data.image_size=32"] if own_backbone else TINY  # the default lite0 is too slow here
    start = first_backbone_epoch(cfg.freeze)
    epochs = 2 if start is None else start + 2  # epochs 0..start+1: one full epoch past the switch
    seen = record_backbone_at_epoch_starts(monkeypatch)
    result = fit(
        recipe,
        backbone
        + QUICK
        + [
            "data=folder",
            f"data.root={image_folder}",
            f"trainer.max_epochs={epochs}",
            "+trainer.limit_train_batches=2",
            f"hydra.run.dir={tmp_path}",
        ],
    )
    assert result.config["backbone"]["name"] == (cfg.backbone.name if own_backbone else "test_resnet")
    assert len(result.history) == epochs and "val/acc" in result.metrics
    assert sorted(seen) == list(range(epochs)), "fit() did not run the recorded module"
    names = list(seen[0])
    moved = [[n for n in names if not torch.equal(seen[e][n], seen[e + 1][n])] for e in range(epochs - 1)]
    assert [bool(m) for m in moved] == [start is not None and e >= start for e in range(epochs - 1)], (start, moved)
    if cfg.freeze.unfreeze_at is not None:  # LP-FT: every backbone group joins at once
        groups = {g.name: {n.removeprefix("backbone.") for n in g.param_names} for g in result.model.groups[:-1]}
        assert [g for g, params in groups.items() if not params & set(moved[start])] == []
        assert [row["unfrozen_groups"] for row in result.history] == [0.0] * start + [float(len(groups))] * 2
    # The head's lr at each epoch start follows the recipe's schedule, stepped per epoch or per
    # optimizer step: e.g. lp_ft's 0.01 then 0.001 from epoch 5, strong's warm-up.
    steps = min(2, -(-24 // cfg.data.batch_size))  # 24 training images, at most 2 batches an epoch
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    schedule, interval = build_scheduler(probe, cfg.scheduler, epochs, steps_per_epoch=steps)
    expected = []
    for _ in range(epochs):
        expected.append(probe.param_groups[0]["lr"])
        for _ in range(steps if interval == "step" else 1):
            schedule.step()
    if "full-batch L-BFGS" in capsys.readouterr().out:  # a head-only run's L-BFGS steps have no lr to log
        assert all("lr/head" not in row for row in result.history)
        return
    assert [row["lr/head"] for row in result.history] == pytest.approx(expected, rel=1e-6)  # logged as float32
