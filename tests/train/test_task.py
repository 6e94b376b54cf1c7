"""The task objects (finetune.compute.task, finetune.train.task): the losses, decision rules,
metrics and columns that ClassifierModule and the linear probe's objective ask them for."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finetune.compute import task as loss_task
from finetune.compute.linear_probe import penalized_loss
from finetune.model.build import CHECKPOINT_KEY
from finetune.model.classifier import Classifier
from finetune.train.mixing import batch_mixer, soft_target_cross_entropy
from finetune.train.module import ClassifierModule
from finetune.train.task import MultiClass, MultiLabel, task_for, task_named

WEIGHTS = torch.tensor([0.5, 1.0, 2.0, 1.5])


def _logits_and_labels(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 4, generator=generator)
    indices = torch.randint(0, 4, (8,), generator=generator)
    multi_hot = (torch.rand(8, 4, generator=generator) > 0.5).float()
    return logits, indices, multi_hot


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_multiclass_loss_is_cross_entropy_with_class_weights_and_smoothing(smoothing):
    logits, labels, _ = _logits_and_labels()
    for weights in (None, WEIGHTS):
        got = MultiClass().loss(logits, labels, class_weights=weights, label_smoothing=smoothing)
        torch.testing.assert_close(got, F.cross_entropy(logits, labels, weight=weights, label_smoothing=smoothing))


def test_multiclass_soft_targets_carry_their_own_smoothing():
    logits, labels, _ = _logits_and_labels(1)
    soft = F.one_hot(labels, 4).float() * 0.9 + 0.1 / 4
    expected = soft_target_cross_entropy(logits, soft, WEIGHTS)
    for smoothing in (0.0, 0.3):  # not smoothed twice
        torch.testing.assert_close(
            MultiClass().loss(logits, soft, class_weights=WEIGHTS, label_smoothing=smoothing), expected
        )
    torch.testing.assert_close(
        MultiClass().loss(logits, soft), F.cross_entropy(logits, labels, label_smoothing=0.1), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_multilabel_loss_is_bce_with_logits_summed_over_labels_and_averaged_over_images(smoothing):
    logits, _, targets = _logits_and_labels(2)
    smoothed = targets * (1 - smoothing) + 0.5 * smoothing
    for weights in (None, WEIGHTS):
        got = MultiLabel().loss(logits, targets, class_weights=weights, label_smoothing=smoothing)
        expected = F.binary_cross_entropy_with_logits(logits, smoothed, pos_weight=weights, reduction="sum") / 8
        torch.testing.assert_close(got, expected)


def test_multilabel_loss_runs_half_precision_logits_in_float32():
    logits, _, targets = _logits_and_labels(3)
    half = MultiLabel().loss(logits.half(), targets)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, MultiLabel().loss(logits.half().float(), targets))


def test_decision_rules_probabilities_and_metric_targets():
    logits = torch.tensor([[2.0, -1.0, 0.0], [-3.0, 0.5, 0.4]])
    assert MultiClass().predict(logits).tolist() == [0, 1]
    torch.testing.assert_close(MultiClass().probabilities(logits).sum(dim=1), torch.ones(2))
    assert MultiLabel().predict(logits).tolist() == [[True, False, True], [False, True, True]]  # p >= 0.5
    per_label = torch.tensor([0.9, 0.5, 0.7])
    assert MultiLabel().predict(logits, per_label).tolist() == [[False, False, False], [False, True, False]]
    torch.testing.assert_close(MultiLabel().probabilities(logits), torch.sigmoid(logits))
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    assert MultiLabel().metric_targets(labels).dtype == torch.long
    indices = torch.tensor([2, 0])
    assert MultiClass().metric_targets(indices) is indices


def test_columns_and_metrics_per_split():
    assert MultiClass().columns == ("train/loss", "train/acc", "val/loss", "val/acc")
    assert MultiLabel().columns == ("train/loss", "train/f1_micro", "val/loss", "val/map")
    assert list(MultiClass().metrics("train", 5)) == ["acc"]
    assert list(MultiClass().metrics("val", 5)) == ["acc", "acc_top5"]
    assert list(MultiClass().metrics("test", 4)) == ["acc"]  # top-5 needs 5 classes
    assert list(MultiLabel().metrics("train", 3)) == ["f1_micro"]
    assert list(MultiLabel().metrics("val", 3)) == ["f1_micro", "map", "f1_macro", "exact"]
    accuracy = MultiClass().metrics("val", 3)["acc"]
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    accuracy.update(logits, torch.tensor([0, 1, 0]))
    assert accuracy.compute().item() == pytest.approx(2 / 3)


def test_task_for_and_task_named():
    assert isinstance(task_for(True), MultiLabel) and isinstance(task_for(False), MultiClass)
    assert task_named("multilabel").name == "multilabel" and task_named("multiclass").multilabel is False
    assert isinstance(loss_task.task_for(True), loss_task.MultiLabel)
    with pytest.raises(ValueError, match="multiclass, multilabel"):
        task_named("regression")


@pytest.mark.parametrize("multilabel", [False, True])
def test_penalized_loss_is_the_task_loss_plus_the_penalty(multilabel):
    logits, labels, multi_hot = _logits_and_labels(4)
    targets = multi_hot if multilabel else labels
    weight = torch.randn(4, 6)
    weights = WEIGHTS.double()  # the rows' dtype, as the L-BFGS fits of the tests run them
    got = penalized_loss(logits.double(), targets, weight.double(), 0.3, multilabel, weights, 0.1)
    data = task_for(multilabel).loss(logits.double(), targets, class_weights=weights, label_smoothing=0.1)
    torch.testing.assert_close(got, data + 0.15 * weight.double().pow(2).sum())


def _module(classes: int = 4, **kwargs) -> ClassifierModule:
    model = Classifier(torch.nn.Identity(), torch.nn.Linear(3, classes), [])
    return ClassifierModule(model, [str(c) for c in range(classes)], {"lr": 0.1}, {"name": "none"}, {}, **kwargs)


def test_module_takes_its_options_by_keyword_and_asks_the_task():
    positional = [
        p
        for p in inspect.signature(ClassifierModule.__init__).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    assert len(positional) <= 8
    with pytest.raises(TypeError):
        ClassifierModule(None, ["a"], {}, {}, {}, 0.1)
    module = _module(5, task="multilabel")
    assert isinstance(module.task, MultiLabel) and module.epoch_columns == MultiLabel().columns
    assert list(module.val_metrics) == ["loss", "f1_micro", "map", "f1_macro", "exact"]
    assert list(_module(5).val_metrics) == ["loss", "acc", "acc_top5"]
    assert list(_module(5, task=MultiClass()).train_metrics) == ["loss", "acc"]
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint[CHECKPOINT_KEY] == {"classes": ["0", "1", "2", "3", "4"], "config": {}, "task": "multilabel"}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)[CHECKPOINT_KEY]["task"] == "multilabel"


@pytest.mark.parametrize("multilabel", [False, True])
def test_training_step_loss_is_the_task_loss(multilabel):
    torch.manual_seed(0)
    _, labels, multi_hot = _logits_and_labels(5)
    targets = multi_hot if multilabel else labels
    features = torch.randn(8, 3)
    module = _module(4, task="multilabel" if multilabel else "multiclass", label_smoothing=0.1, class_weights=WEIGHTS)
    module.inputs = "features"
    loss = module.training_step((features, targets), 0)
    logits = module.model.head(features)
    expected = task_for(multilabel).loss(logits, targets, class_weights=WEIGHTS, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    assert module.train_metrics["loss"].update_called


def test_mixed_multiclass_batches_are_smoothed_once():
    torch.manual_seed(0)
    _, labels, _ = _logits_and_labels(6)
    features = torch.randn(8, 3)
    mixer = batch_mixer({"alpha": 0.8, "prob": 1.0}, {"alpha": 0.0}, 4, 0.1, on_features=True)
    module = _module(4, label_smoothing=0.1, mixer=mixer, inputs="features")
    np.random.seed(0)
    loss = module.training_step((features.clone(), labels), 0)
    np.random.seed(0)
    mixed, soft = mixer(features.clone(), labels)
    torch.testing.assert_close(loss, soft_target_cross_entropy(module.model.head(mixed), soft))
