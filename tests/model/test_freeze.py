"""Freezing: frozen tensors and BatchNorm statistics stay bit-for-bit; groups and lrs as configured."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune.errors import ConfigError
from finetune.model.backbone import build_backbone
from finetune.model.classifier import Classifier
from finetune.model.freeze import apply_freeze
from finetune.model.head import build_head
from finetune.train.module import ClassifierModule
from finetune.train.optim import param_groups


def tiny_classifier(num_classes: int = 3) -> Classifier:
    torch.manual_seed(0)
    backbone = build_backbone("test_resnet", "random")
    return Classifier(backbone.model, build_head(backbone.num_features, num_classes), backbone.groups)


def train_a_few_steps(model: Classifier, steps: int = 4) -> None:
    torch.manual_seed(0)
    images = torch.randn(8 * steps, 3, 32, 32) * 3 + 1  # far from the BN stats' init: any update shows
    labels = torch.randint(0, 3, (8 * steps,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True)
    module = ClassifierModule(
        model,
        ["a", "b", "c"],
        {"name": "sgd", "lr": 0.1, "weight_decay": 1e-4},
        {"name": "step", "step_size": 1, "gamma": 0.5},
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_head_only_training_leaves_every_backbone_tensor_and_bn_statistic_unchanged():
    model = tiny_classifier()
    result = apply_freeze(model, groups="all")
    assert result.frozen_groups == ("stem", "stage1", "stage2", "stage3", "stage4")
    before_backbone, before_head = snapshot(model.backbone), snapshot(model.head)
    assert any("running_mean" in k for k in before_backbone)

    train_a_few_steps(model)

    after = model.backbone.state_dict()
    changed = [k for k, v in before_backbone.items() if not torch.equal(v, after[k])]
    assert changed == []
    assert not torch.equal(before_head["1.weight"], model.head.state_dict()["1.weight"])


def test_frozen_batchnorm_stays_in_eval_mode_after_train_calls():
    model = tiny_classifier()
    apply_freeze(model, groups="all")
    model.train()
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)
    assert model.head.training


def test_batchnorm_train_policy_lets_statistics_move():
    """The control: without the eval policy the same training does move the statistics."""
    model = tiny_classifier()
    apply_freeze(model, groups="all", batchnorm="train")
    before = snapshot(model.backbone)
    train_a_few_steps(model)
    moved = [k for k, v in before.items() if "running_mean" in k and not torch.equal(v, model.backbone.state_dict()[k])]
    assert moved
    params = dict(model.backbone.named_parameters())
    assert all(torch.equal(before[k], params[k]) for k in params)


def test_trainable_batchnorm_eval_keeps_the_pretrained_statistics_while_every_layer_trains():
    """Full fine-tuning with trainable_batchnorm=eval: weights (norms' scale and shift included)
    move, running statistics stay bit for bit; the default moves them (the control)."""
    for mode, statistics_move in (("eval", False), ("train", True)):
        model = tiny_classifier()
        plan = apply_freeze(model, trainable_batchnorm=mode)
        assert plan.trainable_batchnorm == mode
        before = snapshot(model.backbone)
        train_a_few_steps(model)
        after = model.backbone.state_dict()
        stats = [k for k in before if "running_" in k]
        norm_weights = [k for k in before if k.endswith(".weight") and ".bn" in k]
        assert stats and norm_weights
        assert any(not torch.equal(before[k], after[k]) for k in stats) == statistics_move, mode
        assert all(not torch.equal(before[k], after[k]) for k in norm_weights), mode  # they train either way
        norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert all(m.training != (mode == "eval") for m in model.train().backbone.modules() if m in norms)


def test_batchnorm_frozen_policy_swaps_in_frozen_batchnorm():
    model = tiny_classifier()
    apply_freeze(model, groups="all", batchnorm="frozen")
    names = {type(m).__name__ for m in model.backbone.modules()}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert any(n.startswith("FrozenBatchNorm") for n in names)
    before = snapshot(model.backbone)
    train_a_few_steps(model)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())


def test_freeze_until_a_group_and_by_pattern():
    model = tiny_classifier()
    result = apply_freeze(model, until="stage2")
    assert result.frozen_groups == ("stem", "stage1", "stage2")
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    assert trainable == {"layer3", "layer4"}

    model = tiny_classifier()
    apply_freeze(model, patterns=[r"\.bn\d\."])
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".bn" in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if "conv" in n)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"groups": ["stage9"]}, "unknown groups"),
        ({"until": "nope"}, "not a group"),
        ({"groups": "everything"}, "use `all`"),
        ({"until": "head"}, "nothing would train"),
        ({"batchnorm": "sometimes"}, "freeze.batchnorm"),
        ({"trainable_batchnorm": "frozen"}, "freeze.trainable_batchnorm"),
    ],
)
def test_bad_freeze_settings_say_what_to_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        apply_freeze(tiny_classifier(), **kwargs)


def test_param_groups_one_per_layer_group_with_layer_decay_and_no_decay_for_biases():
    model = tiny_classifier()
    apply_freeze(model, until="stage2")
    groups = param_groups(model, lr=0.1, weight_decay=0.01, layer_decay=0.5)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == pytest.approx(
        {
            "head": 0.1,
            "head/no_decay": 0.1,
            "stage4": 0.05,
            "stage4/no_decay": 0.05,
            "stage3": 0.025,
            "stage3/no_decay": 0.025,
        }
    )
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))
    assert all(p.ndim == 1 for g in groups if g["name"].endswith("no_decay") for p in g["params"])
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


def test_layers_after_the_last_block_train_with_the_head():
    """convnext's final norm is not a block: freeze_all_but_head leaves it trainable with the head."""
    backbone = build_backbone("test_convnext", "random")
    model = Classifier(backbone.model, build_head(backbone.num_features, 3), backbone.groups)
    assert [g.name for g in model.groups] == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    assert "backbone.head.norm.weight" in model.groups[-1].param_names
    apply_freeze(model, groups="all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.groups[-1].param_names)


# --- gradual unfreezing ---------------------------------------------------------------------

from finetune.model.freeze import unfreeze_schedule  # noqa: E402
from finetune.train.unfreeze import gradual_unfreezing  # noqa: E402


def test_unfreeze_schedule_goes_from_the_head_down():
    groups = ["stem", "stage1", "stage2"]
    assert unfreeze_schedule(groups, every=2) == {"stage2": 2, "stage1": 4, "stem": 6}
    assert unfreeze_schedule(groups, at=3) == {"stem": 3, "stage1": 3, "stage2": 3}
    assert unfreeze_schedule(groups) == {}
    with pytest.raises(ConfigError, match="not both"):
        unfreeze_schedule(groups, every=1, at=1)


class RecordEpochs(L.Callback):
    """Per epoch: the gated groups, and which backbone tensors changed during the epoch."""

    def __init__(self, unfreezing):
        self.unfreezing, self.gated, self.changed, self._before = unfreezing, [], [], None

    def on_train_epoch_start(self, trainer, module):
        self.gated.append(sorted(self.unfreezing.gated))
        self._before = snapshot(module.model.backbone)

    def on_train_epoch_end(self, trainer, module):
        after = module.model.backbone.state_dict()
        self.changed.append({k.split(".")[0] for k, v in self._before.items() if not torch.equal(v, after[k])})


def fit_with_unfreezing(model, epochs, ckpt_path=None, save_to=None):
    unfreezing = gradual_unfreezing(model)
    record = RecordEpochs(unfreezing)
    torch.manual_seed(0)
    images, labels = torch.randn(32, 3, 32, 32) * 3 + 1, torch.randint(0, 3, (32,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    module = ClassifierModule(
        model,
        ["a", "b", "c"],
        {"name": "sgd", "lr": 0.1, "weight_decay": 1e-4},
        {"name": "step", "step_size": 1, "gamma": 0.5},
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[unfreezing, record],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    if save_to:
        trainer.save_checkpoint(save_to)
    return record, trainer


def test_gated_groups_stay_bit_exact_until_their_epoch():
    model = tiny_classifier()
    apply_freeze(model, until="stage4", unfreeze_every=1)
    record, _ = fit_with_unfreezing(model, epochs=3)
    assert record.gated == [
        ["stage1", "stage2", "stage3", "stage4", "stem"],
        ["stage1", "stage2", "stage3", "stem"],
        ["stage1", "stage2", "stem"],
    ]
    assert record.changed[0] == set()  # epoch 1: only the head trains, BatchNorm statistics included
    assert record.changed[1] == {"layer4"}  # epoch 2: the top stage joins
    assert record.changed[2] == {"layer3", "layer4"}


class RecordBackward(L.Callback):
    """Per epoch: whether the stem's output carried a gradient graph, and how many backward
    passes reached the stem's convolution."""

    def __init__(self, model):
        self.graph, self.backward = [], []
        model.backbone.conv1.register_forward_hook(lambda m, i, out: self.graph[-1].add(out.requires_grad))
        model.backbone.conv1.register_full_backward_hook(lambda m, gi, go: self._count())

    def _count(self):
        self.backward[-1] += 1

    def on_train_epoch_start(self, trainer, module):
        self.graph.append(set())
        self.backward.append(0)


def test_no_gradient_is_computed_for_a_gated_group():
    model = tiny_classifier()
    apply_freeze(model, groups="all", unfreeze_at=1)
    record = RecordBackward(model)
    unfreezing = gradual_unfreezing(model)
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))), batch_size=8)
    module = ClassifierModule(
        model, ["a", "b", "c"], {"name": "sgd", "lr": 0.1, "weight_decay": 1e-4}, {"name": "none"}
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[unfreezing, record],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    # Epoch 1: the whole backbone is gated: no graph is built through it, no backward reaches it.
    assert record.graph == [{False}, {True}] and record.backward[0] == 0 and record.backward[1] == 2
    assert all(p.requires_grad for p in model.parameters())  # the returned model is as the plan made it


@pytest.mark.parametrize("resume_after", [1, 3])  # epochs done: before / after the unfreeze (epoch index 2)
def test_resume_across_the_unfreeze_epoch_restores_trainable_set_and_optimizer_state(tmp_path, resume_after):
    model = tiny_classifier()
    apply_freeze(model, groups="all", unfreeze_at=2)
    ckpt = tmp_path / "resume.ckpt"
    _, first = fit_with_unfreezing(model, epochs=resume_after, save_to=ckpt)
    saved = first.optimizers[0].state_dict()

    resumed_model = tiny_classifier()
    apply_freeze(resumed_model, groups="all", unfreeze_at=2)
    record, second = fit_with_unfreezing(resumed_model, epochs=4, ckpt_path=str(ckpt))
    gated_then = [] if resume_after >= 2 else ["stage1", "stage2", "stage3", "stage4", "stem"]
    assert record.gated[0] == gated_then
    assert record.changed[-1] == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    assert [len(g["params"]) for g in second.optimizers[0].state_dict()["param_groups"]] == [
        len(g["params"]) for g in saved["param_groups"]
    ]
    has_state = {i for i in saved["state"]}
    head_only = len(has_state) < sum(len(g["params"]) for g in saved["param_groups"])
    assert head_only == (resume_after <= 2)  # gated parameters got no optimizer state


@pytest.mark.parametrize("pool, width", [("avg", 96), ("max", 96), ("avgmax", 96), ("catavgmax", 192)])
def test_head_pooling_options_set_the_feature_width(pool, width):
    backbone = build_backbone("test_resnet", "random", global_pool=pool)
    assert backbone.num_features == width
    model = Classifier(
        backbone.model, build_head(backbone.num_features, 3, hidden=8, norm="layernorm"), backbone.groups
    )
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert isinstance(model.head[1], torch.nn.LayerNorm)
