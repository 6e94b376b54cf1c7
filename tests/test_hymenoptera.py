"""Real photos: head-only fine-tuning of the embedded lite0 on ants vs bees."""

from __future__ import annotations

import pytest

from finetune import fit


@pytest.mark.slow
def test_freeze_all_but_head_reaches_095_on_hymenoptera(hymenoptera, tmp_path):
    result = fit("freeze_all_but_head", data="folder", data__root=hymenoptera, logger="none",
                 trainer__max_epochs=8, hydra__run__dir=tmp_path)
    assert result.classes == ["ants", "bees"]
    assert result.metrics["val/acc"] >= 0.95, result.history
