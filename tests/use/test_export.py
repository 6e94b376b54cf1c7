"""Use the model: load + predict in Python, the predict/evaluate/export commands, export parity."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import timm
import torch
from conftest import QUICK, TINY, fit_tiny_on_folders, write_class_folders
from PIL import Image
from safetensors.torch import load_file

from finetune import FinetunedModel, fit, load
from finetune.commands import evaluate_command, export_command, predict_command, viz_command
from finetune.data.images import load_rgb
from finetune.data.transforms import build_transforms
from finetune.errors import ConfigError
from finetune.use.export import export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    return fit_tiny_on_folders(root, 8, 4), root


def test_load_rebuilds_the_model_and_its_preprocessing(trained):
    result, root = trained
    model = load(result.best_checkpoint)
    assert isinstance(model, FinetunedModel) and model.classes == result.classes
    path = sorted((root / "data" / "val" / "bees").glob("*.jpg"))[0]
    batch = model.preprocess([path])
    assert batch.shape == (1, 3, 32, 32)  # data.image_size from the training config, not the backbone's
    data_config = timm.data.resolve_model_data_config(timm.create_model("test_resnet"))
    _, eval_tf = build_transforms(data_config, {}, image_size=32)
    assert torch.equal(batch[0], eval_tf(image=load_rgb(path))["image"])  # the validation pipeline exactly
    with torch.no_grad():
        assert torch.allclose(model.model(batch), result.model(batch), atol=1e-6)


def test_predict_in_python_takes_paths_arrays_and_pil_images(trained):
    result, root = trained
    model = load(result.best_checkpoint)
    path = sorted((root / "data" / "val" / "wasps").glob("*.jpg"))[0]
    as_array, as_pil = load_rgb(path), Image.open(path)
    predictions = model.predict([path, as_array, as_pil], top_k=3)
    assert [len(p.top_k) for p in predictions] == [3, 3, 3]
    assert predictions[0].source == str(path) and predictions[1].source == "ndarray"
    for other in predictions[1:]:
        assert [label for label, _ in other.top_k] == [label for label, _ in predictions[0].top_k]
        assert [p for _, p in other.top_k] == pytest.approx([p for _, p in predictions[0].top_k], abs=1e-6)
    assert sum(prob for _, prob in predictions[0].top_k) == pytest.approx(1.0, abs=1e-5)
    assert model.predict(path)[0].label in model.classes


def test_predict_command_on_a_folder_writes_csv_and_json_and_skips_bad_files(trained, tmp_path, capsys):
    result, root = trained
    inputs = tmp_path / "inputs"
    write_class_folders(inputs, classes=("x",), per_class=3)
    (inputs / "x" / "broken.jpg").write_text("not an image")
    assert predict_command([f"ckpt={result.best_checkpoint}", f"input={inputs}", "top_k=2", f"out={tmp_path}/p"]) == 0
    rows = list(csv.DictReader((tmp_path / "p" / "predictions.csv").open()))
    assert len(rows) == 3 and set(rows[0]) == {"image", "label_1", "probability_1", "label_2", "probability_2"}
    saved = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert list(saved["skipped"]) == [str(inputs / "x" / "broken.jpg")]
    assert "3 images predicted, 1 skipped" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unexpected argument"):
        predict_command([f"ckpt={result.best_checkpoint}", f"input={inputs}", "topk=2"])


def test_evaluate_command_reproduces_the_validation_accuracy(trained, tmp_path):
    result, root = trained
    assert (
        evaluate_command([f"ckpt={result.best_checkpoint}", f"input={root / 'data' / 'val'}", f"out={tmp_path}"]) == 0
    )
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["accuracy"] == pytest.approx(result.metrics["val/acc"], abs=1e-6)
    assert report["loss"] == pytest.approx(result.metrics["val/loss"], rel=1e-4)
    assert np.array(report["confusion"]).sum() == 12 and set(report["per_class"]) == set(result.classes)


def run_exported(fmt: str, directory, batch: torch.Tensor, n_classes: int = 3) -> torch.Tensor:
    """Logits of the exported file in `directory`, run by the runtime a server would use, not by finetune."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0])
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(directory / "model.torchscript.pt"))(batch)[0]  # (logits, probabilities)
    reloaded = timm.create_model(
        "test_resnet",
        num_classes=n_classes,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(directory / "model.safetensors"), num_classes=n_classes),
    ).eval()
    with torch.no_grad():
        return reloaded(batch)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_export_command_matches_pytorch_within_1e4(trained, tmp_path, fmt, capsys):
    result, root = trained
    images = root / "data" / "val"
    assert (
        export_command([f"ckpt={result.best_checkpoint}", f"format={fmt}", f"out={tmp_path}", f"input={images}"]) == 0
    )
    assert "parity on 8 images" in capsys.readouterr().out
    meta = json.loads((tmp_path / "preprocessing.json").read_text())
    assert meta["classes"] == result.classes and meta["input_size"] == [3, 32, 32]
    # Parity checked here, not taken from the command's report: all 12 validation images (a batch
    # size other than the command's 8), through the exported file, against the checkpoint's model.
    model = load(result.best_checkpoint)
    paths = sorted(images.rglob("*.jpg"))
    expected = model.logits(paths)
    assert expected.shape == (12, 3)
    exported = run_exported(fmt, tmp_path, model.preprocess(paths))
    assert exported.shape == expected.shape
    assert (exported - expected).abs().max() < 1e-4


def test_exported_safetensors_reload_with_timm_create_model(trained, tmp_path):
    result, root = trained
    model = load(result.best_checkpoint)
    batch = model.preprocess(sorted((root / "data" / "val").rglob("*.jpg")))
    exported = export(model, "safetensors", tmp_path, batch)
    reloaded = timm.create_model(
        "test_resnet",
        num_classes=3,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(exported.path), num_classes=3),
    ).eval()
    with torch.no_grad():
        assert (reloaded(batch) - model.model(batch)).abs().max() < 1e-4
    assert json.loads((tmp_path / "config.json").read_text())["label_names"] == result.classes


def test_export_rejects_an_unknown_format_and_a_non_finetune_file(trained, tmp_path):
    result, _ = trained
    with pytest.raises(ConfigError, match="format='tflite'"):
        export(load(result.best_checkpoint), "tflite", tmp_path, torch.zeros(1, 3, 32, 32))
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(Exception, match="not a finetune checkpoint"):
        load(tmp_path / "other.ckpt")


def test_mlp_head_exports_in_finetune_layout_with_parity(tmp_path, image_folder):
    result = fit(
        "freeze_all_but_head",
        TINY
        + QUICK
        + ["head=mlp", "head.hidden=16", "data=folder", f"data.root={image_folder}", f"hydra.run.dir={tmp_path}/run"],
    )
    model = load(result.best_checkpoint)
    batch = model.preprocess(sorted(image_folder.rglob("*.jpg"))[:4])
    with torch.no_grad():
        expected = model.model(batch)
    for fmt in ("safetensors", "onnx"):
        export(model, fmt, tmp_path / fmt, batch)
    assert "finetune Classifier" in json.loads((tmp_path / "safetensors" / "config.json").read_text())["format"]
    # Parity computed here: the ONNX file run by onnxruntime, and the safetensors file loaded into
    # a model whose weights were zeroed first (so matching logits prove the file holds them all).
    assert (run_exported("onnx", tmp_path / "onnx", batch) - expected).abs().max() < 1e-4
    fresh = load(result.best_checkpoint).model
    with torch.no_grad():
        for tensor in fresh.state_dict().values():
            tensor.zero_()
        fresh.load_state_dict(load_file(tmp_path / "safetensors" / "model.safetensors"))
        assert (fresh.eval()(batch) - expected).abs().max() < 1e-4


def test_evaluate_and_viz_take_data_overrides_and_map_classes_by_name(trained, tmp_path):
    result, root = trained
    # A labelled set whose folder lists only two of the classes: labels still mean the same thing.
    other = tmp_path / "other"
    write_class_folders(other / "train", classes=("bees", "wasps"), per_class=2)
    write_class_folders(other / "val", classes=("bees", "wasps"), per_class=3, seed=5)
    assert (
        evaluate_command(
            [f"ckpt={result.best_checkpoint}", "data=folder", f"data.root={other}", f"out={tmp_path}/eval"]
        )
        == 0
    )
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["images"] == 6 and report["per_class"]["ants"]["support"] == 0
    assert report["per_class"]["bees"]["support"] == 3
    assert (
        viz_command([f"ckpt={result.best_checkpoint}", "data=folder", f"data.root={other}", f"out={tmp_path}/viz"]) == 0
    )
    assert (tmp_path / "viz" / "confusion.png").is_file()
