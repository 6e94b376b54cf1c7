"""The optimizers and schedules the configs name, and a GPU run where there is one."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import QUICK, TINY

from finetune.errors import ConfigError
from finetune.train.optim import build_optimizer, build_scheduler


def groups():
    return [{"name": "head", "params": [torch.nn.Parameter(torch.zeros(2, 2))], "lr": 0.1, "weight_decay": 0.01}]


def lrs(scheduler, epochs):
    seen = []
    for _ in range(epochs):
        seen.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return seen


def test_sgd_with_step_decay_is_the_classic_recipe():
    optimizer = build_optimizer(groups(), {"name": "sgd", "lr": 0.1, "momentum": 0.9})
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    assert optimizer.param_groups[0]["weight_decay"] == 0.01  # the group's own, not a global one
    scheduler, interval = build_scheduler(optimizer, {"name": "step", "step_size": 2, "gamma": 0.1}, max_epochs=6)
    assert interval == "epoch"
    assert lrs(scheduler, 5) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_adamw_with_warmup_and_cosine():
    optimizer = build_optimizer(groups(), {"name": "adamw", "lr": 0.1})
    assert isinstance(optimizer, torch.optim.AdamW)
    scheduler, _ = build_scheduler(optimizer, {"name": "cosine", "warmup_epochs": 2, "min_lr": 0.0}, max_epochs=6)
    # Linear warmup from lr/(warmup+1) over 2 epochs, then cosine from 0.1 to min_lr over the other 4:
    # lr_e = 0.1 x (1 + cos(pi x (e - 2) / 4)) / 2.
    warmup = [0.1 * (e + 1) / 3 for e in range(2)]
    cosine = [0.1 * (1 + math.cos(math.pi * (e - 2) / 4)) / 2 for e in range(2, 6)]
    assert lrs(scheduler, 6) == pytest.approx(warmup + cosine, rel=1e-9)
    assert warmup + cosine == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.0853553, 0.05, 0.0146447], rel=1e-5)


def test_unknown_optimizer_or_scheduler_names_say_the_choices():
    with pytest.raises(ConfigError, match="sgd or adamw"):
        build_optimizer(groups(), {"name": "lamb", "lr": 0.1})
    optimizer = build_optimizer(groups(), {"name": "sgd", "lr": 0.1})
    with pytest.raises(ConfigError, match="step, cosine or none"):
        build_scheduler(optimizer, {"name": "onecycle"}, max_epochs=3)
    assert build_scheduler(optimizer, {"name": "none"}, max_epochs=3) == (None, "epoch")
    with pytest.raises(ConfigError, match="epoch or step"):
        build_scheduler(optimizer, {"name": "none", "interval": "batch"}, max_epochs=3)
    with pytest.raises(ConfigError, match="interval=step"):
        build_scheduler(optimizer, {"name": "step", "warmup_epochs": 0.5}, max_epochs=3)


def test_every_scheduler_takes_a_linear_warmup_and_the_main_schedule_starts_after_it():
    optimizer = build_optimizer(groups(), {"name": "sgd", "lr": 0.1})
    scheduler, _ = build_scheduler(
        optimizer, {"name": "step", "step_size": 2, "gamma": 0.1, "warmup_epochs": 1}, max_epochs=6
    )
    assert lrs(scheduler, 5) == pytest.approx([0.05, 0.1, 0.1, 0.01, 0.01])
    optimizer = build_optimizer(groups(), {"name": "sgd", "lr": 0.1})
    scheduler, _ = build_scheduler(optimizer, {"name": "none", "warmup_epochs": 3}, max_epochs=6)
    assert lrs(scheduler, 6) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_a_per_step_cosine_counts_optimizer_steps_and_warms_up_for_a_fraction_of_an_epoch():
    optimizer = build_optimizer(groups(), {"name": "adamw", "lr": 0.1})
    scheduler, interval = build_scheduler(
        optimizer,
        {"name": "cosine", "warmup_epochs": 0.5, "min_lr": 0.0, "interval": "step"},
        max_epochs=2,
        steps_per_epoch=4,
    )
    assert interval == "step"
    # 2 warm-up steps (half of 4), then a cosine over the 6 steps left.
    expected = [0.1 / 3, 0.2 / 3] + [0.1 * (1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)]
    assert lrs(scheduler, 8) == pytest.approx(expected, rel=1e-9)


@pytest.mark.gpu
def test_fit_on_gpu_with_bf16(image_folder, tmp_path, monkeypatch):
    from finetune import fit
    from finetune.train.module import ClassifierModule

    seen = set()  # (device, logits dtype) of every forward pass, training and validation
    original = ClassifierModule.forward

    def forward(self, x):
        logits = original(self, x)
        seen.add((logits.device.type, logits.dtype))
        return logits

    monkeypatch.setattr(ClassifierModule, "forward", forward)
    on_gpu = [o for o in QUICK if not o.startswith("trainer.accelerator=")]  # QUICK's cpu would win over trainer=gpu
    result = fit(
        "full_finetune",
        TINY + on_gpu + ["trainer=gpu", "data=folder", f"data.root={image_folder}", f"hydra.run.dir={tmp_path}"],
    )
    assert seen == {("cuda", torch.bfloat16)}  # every step on the GPU, under bf16 autocast
    assert result.metrics["val/acc"] * 12 == pytest.approx(round(result.metrics["val/acc"] * 12))  # k of 12 images
    assert next(result.model.parameters()).dtype == torch.float32  # mixed precision: fp32 master weights
