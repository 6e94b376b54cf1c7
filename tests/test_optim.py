"""The optimizers and schedules the configs name, and a GPU run where there is one."""

from __future__ import annotations

import pytest
import torch

from conftest import QUICK, TINY
from finetune.errors import ConfigError
from finetune.optim import build_optimizer, build_scheduler


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
    scheduler = build_scheduler(optimizer, {"name": "step", "step_size": 2, "gamma": 0.1}, max_epochs=6)
    assert lrs(scheduler, 5) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_adamw_with_warmup_and_cosine():
    optimizer = build_optimizer(groups(), {"name": "adamw", "lr": 0.1})
    assert isinstance(optimizer, torch.optim.AdamW)
    scheduler = build_scheduler(optimizer, {"name": "cosine", "warmup_epochs": 2, "min_lr": 0.0}, max_epochs=6)
    seen = lrs(scheduler, 6)
    assert seen[0] < seen[1] < seen[2] == pytest.approx(0.1)
    assert seen[2] > seen[3] > seen[4] > seen[5] > 0.0


def test_unknown_optimizer_or_scheduler_names_say_the_choices():
    with pytest.raises(ConfigError, match="sgd or adamw"):
        build_optimizer(groups(), {"name": "lamb", "lr": 0.1})
    optimizer = build_optimizer(groups(), {"name": "sgd", "lr": 0.1})
    with pytest.raises(ConfigError, match="step, cosine or none"):
        build_scheduler(optimizer, {"name": "onecycle"}, max_epochs=3)
    assert build_scheduler(optimizer, {"name": "none"}, max_epochs=3) is None


@pytest.mark.gpu
def test_fit_on_gpu_with_bf16(image_folder, tmp_path):
    from finetune import fit

    result = fit("full_finetune", TINY + QUICK + ["trainer=gpu", "data=folder", f"data.root={image_folder}",
                                                  f"hydra.run.dir={tmp_path}"])
    assert 0.0 <= result.metrics["val/acc"] <= 1.0
