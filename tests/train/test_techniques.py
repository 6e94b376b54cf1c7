"""Training techniques: augmentation policies, mixup/cutmix, label smoothing, EMA, stochastic depth,
lr warm-up, the lr finder, end-of-run TTA and +recipe=strong, on real tiny models and images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK, TINY

from finetune import fit, load
from finetune.config import compose_config
from finetune.data.policies import AutoAugmentPolicy
from finetune.data.transforms import augmentation_is_random, build_transforms
from finetune.errors import ConfigError
from finetune.model.backbone import build_backbone
from finetune.train.ema import EMA, ema_update, warmed_decay
from finetune.train.lr_find import KeepGroupRatios
from finetune.train.mixing import batch_mixer, soft_target_cross_entropy

DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.5,) * 3,
    "std": (0.5,) * 3,
    "interpolation": "bilinear",
    "crop_pct": 0.875,
}
IMAGE = (np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)


def run(image_folder, tmp_path, *extra, name="run"):
    return fit(
        overrides=[
            *TINY,
            *QUICK,
            "data=folder",
            f"data.root={image_folder}",
            *extra,
            f"hydra.run.dir={tmp_path / name}",
        ]
    )


@pytest.mark.parametrize("option", ["randaugment", "trivialaugment"])
def test_augment_options_put_a_seeded_policy_into_the_training_pipeline(option):
    augment = compose_config([f"augment={option}"]).augment
    train, evaluation = build_transforms(DATA_CONFIG, augment, seed=0)
    assert any(isinstance(t, AutoAugmentPolicy) for t in train.transforms)
    assert not any(isinstance(t, AutoAugmentPolicy) for t in evaluation.transforms)
    assert augmentation_is_random(augment)
    draws = []
    for seed in (7, 7, 8):
        train.set_random_seed(seed)
        draws.append(train(image=IMAGE)["image"])
    assert torch.equal(draws[0], draws[1])  # a function of the seed (seed, epoch, index in training)
    assert not torch.equal(draws[0], draws[2])


def test_color_jitter_and_erasing_are_config_values_and_bad_policies_are_refused():
    augment = {"policy": "none", "color_jitter": 0.4, "random_erasing": 0.25}
    train, _ = build_transforms(DATA_CONFIG, augment, seed=0)
    names = [type(t).__name__ for t in train.transforms]
    assert "ColorJitter" in names and "Erasing" in names
    with pytest.raises(ConfigError, match="randaugment, trivialaugment"):
        build_transforms(DATA_CONFIG, {"policy": "randaug"})
    with pytest.raises(ConfigError, match="0 to 30"):
        build_transforms(DATA_CONFIG, {"policy": "randaugment", "magnitude": 40})


def test_soft_target_loss_equals_cross_entropy_on_one_hot_targets_with_class_weights():
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    weight = torch.tensor([0.5, 1.0, 2.0])
    one_hot = F.one_hot(labels, 3).float()
    assert soft_target_cross_entropy(logits, one_hot, weight).item() == pytest.approx(
        F.cross_entropy(logits, labels, weight=weight).item(), rel=1e-6
    )
    smoothed = one_hot * 0.9 + 0.1 / 3
    assert soft_target_cross_entropy(logits, smoothed).item() == pytest.approx(
        F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-6
    )


def test_mixup_keeps_odd_batches_and_carries_the_label_smoothing():
    np.random.seed(0)
    mixer = batch_mixer({"alpha": 0.8, "prob": 1.0}, {"alpha": 0.0}, 4, 0.1, on_features=False)
    images, labels = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    original = images.clone()
    mixed, targets = mixer(images, labels)
    assert targets.shape == (5, 4) and torch.allclose(targets.sum(1), torch.ones(5))
    assert torch.equal(mixed[4], original[4])  # the odd one out stays clean ...
    assert targets[4].tolist() == pytest.approx([0.925, 0.025, 0.025, 0.025])  # ... with a smoothed target
    assert not torch.equal(mixed[:4], original[:4])
    assert mixer.active(0) and "mixup alpha 0.8" in mixer.description
    assert batch_mixer({"alpha": 0.0}, {"alpha": 0.0}, 4, 0.0, on_features=False) is None
    stopping = batch_mixer({"alpha": 0.2, "off_epoch": 3}, {"alpha": 0}, 4, 0.0, on_features=False)
    assert [stopping.active(e) for e in range(4)] == [True, True, False, False]  # epochs 1, 2 mix
    with pytest.raises(ConfigError, match="off_epoch"):
        batch_mixer({"alpha": 0.2, "off_epoch": 0}, {"alpha": 0}, 4, 0.0, on_features=False)


def test_on_cached_features_cutmix_becomes_manifold_mixup_and_says_so():
    mixer = batch_mixer({"alpha": 0.0}, {"alpha": 1.0}, 3, 0.0, on_features=True)
    assert "manifold mixup" in mixer.description and "cutmix needs images" in mixer.description
    features, _ = mixer(torch.randn(4, 16), torch.tensor([0, 1, 2, 0]))
    assert features.shape == (4, 16)


def test_ema_decay_warms_up_like_timm_and_updates_in_place():
    assert [round(warmed_decay(0.99, n, True), 4) for n in (0, 1, 90, 10_000)] == [0.1, 0.1818, 0.91, 0.99]
    assert warmed_decay(0.99, 0, False) == 0.99
    averaged, current = [torch.zeros(3)], [torch.ones(3)]
    ema_update(0.9, warmup=False)(averaged, current, torch.tensor(5))
    assert averaged[0].tolist() == pytest.approx([0.1] * 3)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        EMA(1.5)


def test_an_ema_run_validates_saves_and_loads_the_averaged_weights(image_folder, tmp_path):
    result = run(
        image_folder, tmp_path, "trainer.max_epochs=2", "ema.decay=0.9", "optimizer.lr=0.1", "data.batch_size=4"
    )
    checkpoint = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    averaged, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert int(checkpoint["averaging_state"]["n_averaged"]) == checkpoint["global_step"] >= 6  # one per step
    assert not all(torch.equal(averaged[k], current[k]) for k in averaged)
    loaded = load(result.best_checkpoint).model.state_dict()
    assert all(torch.equal(loaded[k.removeprefix("model.")], v) for k, v in averaged.items() if k.startswith("model."))
    log = (result.output_dir / "finetune.log").read_text()
    assert "EMA of the weights, decay 0.9" in log


def test_drop_path_reaches_timm_and_the_classics_refuse_it():
    backbone = build_backbone("test_resnet", "random", drop_path_rate=0.2)
    rates = [m.drop_prob for m in backbone.model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="no residual branches"):
        build_backbone("torchvision:vgg16", "random", drop_path_rate=0.1)


def test_mixup_on_a_frozen_backbone_keeps_the_feature_cache(image_folder, tmp_path):
    result = run(
        image_folder,
        tmp_path,
        "+recipe=freeze_all_but_head",
        "mixup.alpha=0.4",
        "cutmix.alpha=1.0",
        "trainer.max_epochs=2",
    )
    log = (result.output_dir / "finetune.log").read_text()
    assert "feature cache: on" in log
    assert "mixing: mixup of cached features (manifold mixup), alpha 0.4, no cutmix (it needs images)" in log


def test_end_of_run_tta_scores_the_validation_split_and_reports_its_views(image_folder, tmp_path):
    result = run(image_folder, tmp_path, "tta=flip")
    assert result.metrics["tta_views"] == 2
    assert 0 <= result.metrics["val/acc_tta"] <= 1
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["metrics"]["tta_views"] == 2
    assert (
        "test-time augmentation (flip, 2 views per image) on the val split"
        in (result.output_dir / "finetune.log").read_text()
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("tta=flp", "tta='flp': choose none, flip, crops, crops_flip"),
        ("augment.policy=randaug", "augment.policy='randaug': choose none, randaugment"),
        ("ema.decay=1.5", "ema.decay=1.5: a number from 0"),
        ("mixup.alpha=-1", "mixup.alpha=-1: a Beta-distribution alpha"),
        ("loss.label_smoothing=1", "loss.label_smoothing=1: a number from 0"),
        ("backbone.drop_path_rate=2", "backbone.drop_path_rate=2: a rate"),
    ],
)
def test_bad_technique_values_stop_the_cli_before_any_work(override, message):
    from finetune.config import check_values

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_values(compose_config([override]))


def test_the_config_checks_know_every_tta_mode_and_policy():
    from finetune.config import POLICY_CHOICES, TTA_CHOICES
    from finetune.data.policies import POLICIES
    from finetune.use.tta import TTA_MODES

    assert TTA_CHOICES == tuple(TTA_MODES) and POLICY_CHOICES == POLICIES


def test_the_lr_finder_keeps_layer_group_ratios():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD(
        [
            {"params": [parameter], "lr": 0.01, "lr_scale": 1.0},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01, "lr_scale": 0.25},
        ]
    )

    class Trainer:
        optimizers = [optimizer]

    KeepGroupRatios().on_train_batch_start(Trainer(), None, None, 0)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.0025])


def test_the_suggestion_is_a_tenth_of_the_lowest_loss_whatever_the_wiggles():
    from finetune.train.lr_find import suggest_lr

    lrs = [1e-6 * 10 ** (6 * i / 99) for i in range(100)]  # 1e-6 .. 1, exponential like the finder's
    losses = [
        0.7
        - 0.01 * (1e-5 < lr < 2e-5)
        - 0.5 * min(1.0, max(0.0, math.log10(lr / 1e-3) / math.log10(20)))
        + 3 * (lr > 0.02)
        for lr in lrs
    ]  # flat, a tiny dip near 1e-5, a fall from 1e-3 to 0.02, divergence
    lowest = max(lr for lr in lrs if lr <= 0.02)
    assert suggest_lr(lrs, losses) == pytest.approx(lowest / 10)
    # per unit of lr (Lightning's rule) the tiny dip near 1e-5 would win:
    per_lr = torch.gradient(torch.tensor(losses[10:-1]), spacing=[torch.tensor(lrs[10:-1])])[0]
    assert lrs[10 + int(torch.argmin(per_lr))] < 3e-5
    diverging = [loss - 0.3 * (0.5 < lr < 0.6) for lr, loss in zip(lrs, losses)]  # a dip in the exploding tail
    assert suggest_lr(lrs, diverging) == pytest.approx(lowest / 10)
    assert suggest_lr(lrs, [0.7 + 0.01 * i for i in range(100)]) is None  # never falls: no suggestion


def test_lr_find_command_prints_a_suggestion_and_draws_the_curve(image_folder, tmp_path, capsys, monkeypatch):
    import sys

    from finetune.cli import main

    args = [
        "finetune",
        "lr-find",
        "+recipe=freeze_all_but_head",
        *TINY,
        "data=folder",
        f"data.root={image_folder}",
        "trainer.accelerator=cpu",
        "data.num_workers=0",
        "logger=none",
        "steps=30",
        f"out={tmp_path / 'lr'}",
    ]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_code:
        main()
    assert exit_code.value.code == 0
    printed = capsys.readouterr().out
    numbers = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 1000
    assert len(numbers["lr"]) == len(numbers["loss"]) > 5
    if numbers["suggestion"] is not None:
        assert f"optimizer.lr={numbers['suggestion']:.3g}" in printed
    else:
        assert "no suggestion" in printed
    with pytest.raises(ConfigError, match="at least 5 steps"):
        from finetune.commands.lr_find import lr_find_command

        lr_find_command(["steps=2"])


def test_lr_auto_runs_the_finder_first_and_the_checkpoint_keeps_the_lr_it_found(image_folder, tmp_path):
    from finetune.train.run import run as train

    cfg = compose_config(
        [
            *TINY,
            *QUICK,
            "data=folder",
            f"data.root={image_folder}",
            "+recipe=freeze_all_but_head",
            "optimizer.lr=auto",
            "trainer.max_epochs=2",
            "data.batch_size=4",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    result = train(cfg)
    lr = result.config["optimizer"]["lr"]
    assert isinstance(lr, float) and lr > 0
    assert cfg.optimizer.lr == lr  # one config in flight: the lr found is written into the run's config
    log = (result.output_dir / "finetune.log").read_text()
    assert f"lr finder: optimizer.lr={lr:.3g}" in log
    assert (result.output_dir / "viz" / "lr_find.png").exists()
    stored = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["finetune"]["config"]
    assert stored["optimizer"]["lr"] == lr


@pytest.mark.slow
def test_the_strong_recipe_composes_every_technique_and_trains(image_folder, tmp_path):
    result = run(image_folder, tmp_path, "+recipe=strong", "trainer.max_epochs=2", "data.batch_size=8")
    log = (result.output_dir / "finetune.log").read_text()
    for line in (
        "augmentation policy: trivialaugment",
        "mixing: mixup alpha 0.2",
        "label smoothing: 0.1",
        "EMA of the weights, decay 0.99",
        "stochastic depth: drop_path_rate 0.1",
        "lr warm-up: 1 epoch, then cosine (stepped every step)",
    ):
        assert line in log
    assert 0 <= result.metrics["val/acc"] <= 1
