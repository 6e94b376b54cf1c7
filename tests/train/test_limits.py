"""What a capped run reads: finetune's rule is Lightning's own."""

from __future__ import annotations

import pytest
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches

from finetune.train.limits import capped, decoding_ahead_pays, images_per_epoch, limited_batches


@pytest.mark.parametrize("batches", [1, 3, 10, 47])
@pytest.mark.parametrize("limit", [1, 2, 5, 100, 0.5, 0.25, 1.0])
def test_limited_batches_is_lightnings_rule(batches, limit):
    try:
        expected = _parse_num_batches("train", batches, limit)
    except Exception:  # noqa: BLE001 - Lightning refuses a fraction that leaves no batch; so must finetune
        expected = 0
    assert limited_batches(batches, limit) == expected
    assert limited_batches(batches, None) == batches


def test_images_and_whether_decoding_ahead_pays():
    assert images_per_epoch(100, 32, 2) == 64 and images_per_epoch(100, 32, None) == 100
    assert images_per_epoch(100, 32, 10) == 100  # never more than the split
    assert not capped({"limit_train_batches": 1.0}, "limit_train_batches") and not capped({}, "limit_val_batches")
    assert capped({"limit_train_batches": 0.5}, "limit_train_batches")
    assert capped({"limit_val_batches": 3}, "limit_val_batches") and capped(
        {"limit_val_batches": 0}, "limit_val_batches"
    )
    assert not capped({"limit_val_batches": True}, "limit_val_batches") and not capped(
        {"limit_val_batches": 1.5}, "limit_val_batches"
    )
    sizes = {"train": 20_000, "val": 2_000, "test": 0}
    assert decoding_ahead_pays({"max_epochs": 1}, 32, sizes)  # uncapped: always
    assert not decoding_ahead_pays({"max_epochs": 1, "limit_train_batches": 20, "limit_val_batches": 10}, 32, sizes)
    assert decoding_ahead_pays({"max_epochs": 30, "limit_train_batches": 0.5}, 32, sizes)
