"""finetune embed / probe: features of every image in a file, and the linear / k-NN baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import QUICK, TINY

from finetune import fit
from finetune.commands import embed_command, probe_command
from finetune.compute import features as feature_cache
from finetune.errors import ConfigError
from finetune.use.embed import load_embeddings

BACKBONE = ["backbone.name=test_resnet", "backbone.weights=random", "data.image_size=32", "data.num_workers=0"]


def test_embed_writes_features_labels_and_paths_of_every_image(tmp_path, image_folder, capsys, monkeypatch):
    bad = image_folder / "val" / "ants" / "truncated.jpg"
    bad.write_bytes(next((image_folder / "val" / "ants").glob("*.jpg")).read_bytes()[:200])
    cache = tmp_path / "cache"
    args = [*BACKBONE, "data=folder", f"data.root={image_folder}", f"data.cache.dir={cache}", f"out={tmp_path / 'e'}"]
    assert embed_command(args) == 0
    assert "skipped 1 unreadable files" in capsys.readouterr().out
    emb = load_embeddings(tmp_path / "e" / "embeddings.npz")
    assert emb.features.shape == (24 + 12, 96) and emb.features.dtype == np.float32
    assert sorted(set(emb.splits)) == ["train", "val"] and str(bad) not in set(emb.paths)
    for path, label in zip(emb.paths, emb.labels):  # rows stay aligned with their files
        assert Path(path).parent.name == emb.classes[label]
    # The second call reads the cache: no image goes through the backbone again, the file stays as written.
    [cached] = (cache / "features").glob("*.safetensors")
    written = cached.stat().st_mtime_ns

    def extract(*args, **kwargs):
        raise AssertionError("the second embed recomputed features instead of reading the cache")

    monkeypatch.setattr(feature_cache, "extract", extract)
    assert embed_command(args) == 0
    assert "skipped 1 unreadable files" in capsys.readouterr().out  # the skips are cached too
    assert cached.stat().st_mtime_ns == written and list((cache / "features").iterdir()) == [cached]
    assert np.array_equal(load_embeddings(tmp_path / "e" / "embeddings.npz").features, emb.features)


def test_embed_from_a_checkpoint_uses_the_fine_tuned_backbone(tmp_path, image_folder):
    # fp32 (embed uses the run's precision): bf16 features would differ from the fp32 forward below.
    result = fit(
        "full_finetune",
        TINY
        + QUICK
        + [
            "data=folder",
            f"data.root={image_folder}",
            "data.batch_size=8",
            "trainer.precision=32-true",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
    )
    assert embed_command([f"ckpt={result.best_checkpoint}", f"out={tmp_path / 'e'}"]) == 0
    emb = load_embeddings(tmp_path / "e" / "embeddings.npz")
    import torch

    first = emb.paths[emb.splits == "val"][0]
    from finetune.use.load import load

    model = load(result.best_checkpoint)
    expected = model.model.backbone(model.preprocess([first])).detach().numpy()[0]
    np.testing.assert_allclose(emb.features[list(emb.paths).index(first)], expected, atol=1e-4, rtol=1e-4)
    assert torch.is_tensor(model.preprocess([first]))


def test_probe_scores_linear_and_knn_on_separable_features(tmp_path, image_folder, capsys):
    assert probe_command([*BACKBONE, "data=folder", f"data.root={image_folder}", f"out={tmp_path / 'p'}"]) == 0
    out = capsys.readouterr().out
    assert "logistic regression (C=1)" in out and "k-NN (k=5, cosine)" in out
    # the folder's classes are colour-coded: even random conv features separate them
    import json

    scores = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert {s["split"] for s in scores} == {"val"} and max(s["accuracy"] for s in scores) >= 0.9


def test_probe_reads_an_embeddings_file_and_rejects_bad_options(tmp_path, image_folder):
    embed_command([*BACKBONE, "data=folder", f"data.root={image_folder}", f"out={tmp_path / 'e'}"])
    file = tmp_path / "e" / "embeddings.npz"
    assert probe_command([f"embeddings={file}", "k=3", "C=0.5", f"out={tmp_path / 'p'}"]) == 0
    with pytest.raises(ConfigError, match="C='big'"):
        probe_command([f"embeddings={file}", "C=big"])
    with pytest.raises(ConfigError, match="drop ckpt= and config overrides"):
        probe_command([f"embeddings={file}", "data=folder"])
    with pytest.raises(ConfigError, match="does not exist"):
        probe_command([f"embeddings={tmp_path / 'missing.npz'}"])
    with pytest.raises(ConfigError, match="format='csv'"):
        embed_command([*BACKBONE, "format=csv"])
    with pytest.raises(ConfigError, match="unexpected argument 'verbose'"):
        embed_command(["verbose"])
