"""Test-time augmentation: the views each mode makes, averaged probabilities, and the commands
that report how many views ran. A tiny test_resnet trained for a few steps, real images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fit_tiny_on_folders

from finetune import load
from finetune.commands import evaluate_command, predict_command
from finetune.data.images import load_rgb
from finetune.errors import ConfigError
from finetune.use.metrics import classification_report
from finetune.use.tta import (
    TTA_MODES,
    TestTimeAugmentation,
    check_tta,
    evaluate_with_tta,
    tta_log_probabilities,
    tta_probabilities,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model loaded from the checkpoint, checkpoint path, data root): 32 px inputs, crop_pct 0.95,
    so the evaluation resize makes a short side of 33 px (an odd margin around the 32 px crop).

    A few training steps leave the logits of all views within ~0.003 of each other, too close for
    averaging probabilities and averaging logits to differ measurably: the checkpoint's head is
    scaled x30 (a real checkpoint file still, loaded by finetune.load)."""
    root = tmp_path_factory.mktemp("tta")
    result = fit_tiny_on_folders(root, 6, 3, epochs=2)
    checkpoint = torch.load(result.best_checkpoint, weights_only=True)
    for key in ("model.head.1.weight", "model.head.1.bias"):
        checkpoint["state_dict"][key] *= 30
    checkpoint["finetune"]["trust"]["temperature"] = 1.0  # fitted before the x30: uncalibrated, as these tests read it
    sharp = root / "run" / "checkpoints" / "sharp.ckpt"
    torch.save(checkpoint, sharp)
    model = load(sharp)
    assert model.data_config["input_size"] == (3, 32, 32) and model.data_config["crop_pct"] == 0.95
    return model, sharp, root / "data"


def random_images(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def normalized(model, pixels: np.ndarray) -> torch.Tensor:
    """(x / 255 - mean) / std as CHW, written out here rather than taken from the pipeline."""
    mean, std = (torch.tensor(model.data_config[k]).view(3, 1, 1) for k in ("mean", "std"))
    return (torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255 - mean) / std


def test_mode_none_gives_exactly_the_plain_prediction_probabilities(trained):
    model, _, _ = trained
    images = random_images(7, 48, 61)
    plain = (model.logits(images, batch_size=4) / model.temperature).softmax(dim=1)  # calibrated
    assert torch.equal(model.probabilities(images, batch_size=4), plain)
    assert torch.equal(
        tta_probabilities(model.model, images, model.data_config, "none", batch_size=4, temperature=model.temperature),
        plain,
    )
    default, none = model.predict(images, top_k=3), model.predict(images, top_k=3, tta="none")
    assert [p.top_k for p in default] == [p.top_k for p in none]


def test_flip_on_a_mirror_symmetric_image_gives_the_plain_prediction(trained):
    model, _, _ = trained
    # 33 rows need no resize and 36 columns leave 2 px either side of the 32 px crop: the
    # evaluation view of a symmetric image is itself symmetric.
    half = random_images(3, 33, 18, seed=1)
    symmetric = [np.concatenate([h, h[:, ::-1]], axis=1) for h in half]
    asymmetric = random_images(3, 33, 36, seed=2)
    assert torch.allclose(model.probabilities(symmetric, tta="flip"), model.probabilities(symmetric), atol=1e-5)
    # The check has teeth: the model is not mirror-invariant, so on other images flip changes the output.
    assert (model.probabilities(asymmetric, tta="flip") - model.probabilities(asymmetric)).abs().max() > 1e-4


def test_flip_averages_the_probabilities_of_the_image_and_of_its_mirror(trained):
    model, _, _ = trained
    images = random_images(4, 33, 40, seed=3)  # an even horizontal margin: mirroring commutes with the crop
    mirrored = [np.ascontiguousarray(image[:, ::-1]) for image in images]
    expected = (model.probabilities(images) + model.probabilities(mirrored)) / 2
    flipped = model.probabilities(images, tta="flip")
    assert torch.allclose(flipped, expected, atol=1e-6)
    assert torch.allclose(flipped.sum(dim=1), torch.ones(4), atol=1e-6)
    predictions = model.predict(images, top_k=3, tta="flip")
    assert [p.probability for p in predictions] == pytest.approx(flipped.max(dim=1).values.tolist(), abs=1e-7)


def test_probabilities_are_averaged_over_the_views_not_the_logits(trained):
    model, _, _ = trained
    image = random_images(1, 50, 70, seed=4)[0]
    views = TestTimeAugmentation(model.data_config, "crops_flip").views(image)
    temperature = model.temperature  # each view's softmax is calibrated
    with torch.no_grad():
        per_view = (model.model(views) / temperature).softmax(dim=1)
    averaged = model.probabilities([image], tta="crops_flip")[0]
    assert torch.allclose(averaged, per_view.mean(dim=0), atol=1e-6)
    with torch.no_grad():
        logit_average = (model.model(views) / temperature).mean(dim=0).softmax(dim=0)
    assert (averaged - logit_average).abs().max() > 1e-4  # the two averages differ on this model
    log_averaged = tta_log_probabilities(
        model.model, [image], model.data_config, "crops_flip", temperature=temperature
    )[0]
    assert torch.allclose(log_averaged.exp(), averaged, atol=1e-6)
    assert torch.allclose(log_averaged.softmax(dim=0), averaged, atol=1e-6)  # usable as logits


def test_crops_are_the_four_corners_and_the_center_of_the_evaluation_resize(trained):
    model, _, _ = trained
    # 33 rows: the evaluation resize keeps the image as it is, so the crops can be cut here by hand.
    image = random_images(1, 33, 35, seed=5)[0]
    views = TestTimeAugmentation(model.data_config, "crops").views(image)
    assert views.shape == (5, 3, 32, 32) and views.dtype == torch.float32
    # The center is the evaluation view itself: its odd horizontal margin of 3 px puts 1 column on
    # the left, as albumentations' center crop does (torchvision's center_crop would put 2).
    assert torch.equal(views[0], model.preprocess([image])[0])
    assert torch.allclose(views[0], normalized(model, image[0:32, 1:33]), atol=1e-6)
    corners = [image[0:32, 0:32], image[0:32, 3:35], image[1:33, 0:32], image[1:33, 3:35]]
    for view, corner in zip(views[1:], corners):
        assert torch.allclose(view, normalized(model, corner), atol=1e-6)


def test_crops_flip_adds_the_mirror_of_each_crop(trained):
    model, _, _ = trained
    image = random_images(1, 57, 45, seed=6)[0]  # portrait, resized by area averaging
    crops = TestTimeAugmentation(model.data_config, "crops").views(image)
    ten = TestTimeAugmentation(model.data_config, "crops_flip").views(image)
    assert torch.equal(ten[:5], crops) and torch.equal(ten[5:], crops.flip(-1))
    assert torch.equal(crops[0], model.preprocess([image])[0])
    assert len({tuple(v.flatten()[:50].tolist()) for v in crops}) == 5  # five different places


@pytest.mark.parametrize("mode", ["none", "flip", "crops", "crops_flip"])
def test_each_mode_makes_its_number_of_views(trained, mode):
    model, _, _ = trained
    assert TTA_MODES == {"none": 1, "flip": 2, "crops": 5, "crops_flip": 10}
    views = TestTimeAugmentation(model.data_config, mode).views(random_images(1, 40, 52)[0])
    assert views.shape == (TTA_MODES[mode], 3, 32, 32) == (check_tta(mode), 3, 32, 32)


def test_a_forward_pass_holds_at_most_batch_size_views_and_the_result_does_not_depend_on_it(trained):
    model, _, _ = trained
    images = random_images(7, 40, 44, seed=7)
    seen = []
    hook = model.model.register_forward_pre_hook(lambda _, inputs: seen.append(len(inputs[0])))
    try:
        small = model.probabilities(images, batch_size=12, tta="crops")  # 2 images (10 views) a pass
        one_each = model.probabilities(images, batch_size=3, tta="crops")  # fewer than V: one image a pass
    finally:
        hook.remove()
    assert seen == [10, 10, 10, 5] + [5] * 7
    assert torch.allclose(small, one_each, atol=1e-6)


def test_an_unknown_mode_is_a_config_error_that_lists_the_choices(trained):
    model, checkpoint, _ = trained
    message = r"tta='flp': choose none, flip, crops or crops_flip \(1, 2, 5 or 10 views per image\)"
    with pytest.raises(ConfigError, match=message):
        check_tta("flp")
    with pytest.raises(ConfigError, match=message):
        model.predict(random_images(1, 40, 40), tta="flp")
    with pytest.raises(ConfigError, match="tta='Flip'"):
        tta_probabilities(model.model, [], model.data_config, "Flip")
    with pytest.raises(ConfigError, match=message):
        predict_command([f"ckpt={checkpoint}", "input=nowhere", "tta=flp"])  # before the input is looked at


def test_no_images_give_no_rows(trained):
    model, _, _ = trained
    assert model.probabilities([], tta="crops").shape == (0, 3)
    assert model.predict([], tta="flip") == []


def test_evaluate_command_with_flip_reports_two_views_and_the_averaged_prediction(trained, tmp_path, capsys):
    model, checkpoint, data = trained
    assert (
        evaluate_command([f"ckpt={checkpoint}", f"input={data / 'val'}", "tta=flip", "batch_size=4", f"out={tmp_path}"])
        == 0
    )
    assert "test-time augmentation: flip (2 views per image)" in capsys.readouterr().out
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["tta"] == {"mode": "flip", "views": 2} and report["images"] == 9
    paths = [data / "val" / c / f"{c}_{i}.jpg" for c in model.classes for i in range(3)]
    labels = torch.arange(3).repeat_interleave(3)
    averaged = model.probabilities(paths, tta="flip")
    assert report["accuracy"] == pytest.approx(float((averaged.argmax(1) == labels).float().mean()), abs=1e-9)
    assert report["loss"] == pytest.approx(float(-averaged[torch.arange(9), labels].log().mean()), rel=1e-5)
    assert evaluate_command([f"ckpt={checkpoint}", f"input={data / 'val'}", f"out={tmp_path}/plain"]) == 0
    plain = json.loads((tmp_path / "plain" / "evaluation.json").read_text())
    assert plain["tta"] == {"mode": "none", "views": 1} and plain["loss"] != report["loss"]
    assert "test-time augmentation: none (1 view per image)" in capsys.readouterr().out


def test_predict_command_with_crops_writes_five_views_and_the_averaged_probabilities(trained, tmp_path, capsys):
    model, checkpoint, data = trained
    inputs = data / "val" / "bees"
    assert predict_command([f"ckpt={checkpoint}", f"input={inputs}", "tta=crops", "top_k=3", f"out={tmp_path}"]) == 0
    assert "test-time augmentation: crops (5 views per image)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "predictions.json").read_text())
    assert saved["tta"] == {"mode": "crops", "views": 5} and len(saved["predictions"]) == 3
    for row in saved["predictions"]:
        expected = model.predict(row["image"], top_k=3, tta="crops")[0]
        assert [label for label, _ in row["top_k"]] == [label for label, _ in expected.top_k]
        assert [p for _, p in row["top_k"]] == pytest.approx([p for _, p in expected.top_k], abs=1e-6)
        plain = model.predict(row["image"], top_k=3)[0]
        assert [p for _, p in row["top_k"]] != pytest.approx([p for _, p in plain.top_k], abs=1e-7)


def test_evaluate_with_tta_scores_labelled_samples_and_skips_unreadable_files(trained, tmp_path):
    model, _, data = trained
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    paths = sorted((data / "val").rglob("*.jpg"))
    labels = [model.classes.index(p.parent.name) for p in paths]
    samples = [(str(p), y) for p, y in zip(paths, labels)] + [(str(broken), 0), (load_rgb(paths[0]), labels[0])]
    result = evaluate_with_tta(model.model, model.data_config, samples, model.classes, "crops_flip", batch_size=16)
    assert set(result) == {"acc", "loss", "views", "skipped"} and result["views"] == 10
    assert list(result["skipped"]) == [str(broken)] and "empty" not in result["skipped"][str(broken)]
    images = [str(p) for p in paths] + [load_rgb(paths[0])]
    truth = torch.tensor(labels + [labels[0]])
    averaged = model.probabilities(images, tta="crops_flip")
    assert result["acc"] == pytest.approx(float((averaged.argmax(1) == truth).float().mean()), abs=1e-9)
    assert result["loss"] == pytest.approx(float(-averaged[torch.arange(len(truth)), truth].log().mean()), rel=1e-5)
    # Mode none: the numbers of the plain logits.
    plain = evaluate_with_tta(model.model, model.data_config, samples, model.classes, "none")
    reference = classification_report(model.logits(images), truth, model.classes)
    assert plain["acc"] == pytest.approx(reference["accuracy"], abs=1e-9) and plain["views"] == 1
    assert plain["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    nothing = evaluate_with_tta(model.model, model.data_config, [(str(broken), 0)], model.classes, "flip")
    assert (nothing["acc"], nothing["loss"], nothing["views"], len(nothing["skipped"])) == (0.0, 0.0, 2, 1)
