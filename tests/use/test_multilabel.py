"""Multi-label classification end to end: label sets from manifests (and every way they go wrong),
the loss and metrics, thresholds tuned on validation, load / predict / evaluate / export, pictures."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import QUICK, QUICK_WITH_PICTURES, TINY, write_multilabel_manifest
from omegaconf import OmegaConf

from finetune.data.check import check_data
from finetune.data.labels import multi_hot, rarest_label_keys, split_cells
from finetune.data.sources import load_data, load_manifest
from finetune.errors import ConfigError, DataError
from finetune.train.mixing import batch_mixer
from finetune.use.multilabel import PresentLabelsAveragePrecision, multilabel_report, tune_thresholds


def manifest(tmp_path, rows: list[str], header="file,labels"):
    """A manifest over one real image file, listed under several names (paths need not differ)."""
    from PIL import Image

    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    for row in rows:
        name = row.split(",")[0]
        if not (tmp_path / "images" / name).exists():
            Image.new("RGB", (8, 8), (len(name) * 20 % 255, 0, 0)).save(tmp_path / "images" / name)
    path = tmp_path / "labels.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def load(path, task="multilabel", sep=None, columns=None, split_column=None, val_fraction=0.5):
    return load_manifest(
        str(path),
        str(path.parent / "images"),
        "file",
        "labels",
        split_column,
        "{}",
        val_fraction,
        0,
        task=task,
        label_sep=sep,
        label_columns=columns,
    )


# --- data --------------------------------------------------------------------------------------


def test_label_sets_are_parsed_with_any_separator_and_empty_sets_are_kept(tmp_path):
    for n, sep in enumerate((" ", "|", ";")):
        rows = (
            [f"a{i}.png,fire{sep}flying" for i in range(3)]
            + [f"b{i}.png,water" for i in range(3)]
            + [f"c{i}.png," for i in range(2)]
        )
        splits = load(manifest(tmp_path / str(n), rows), sep=sep if sep != " " else None)
        assert splits.classes == ["fire", "flying", "water"]
        labels = sorted(label for _, label in splits.train + splits.val)
        assert labels == [(), (), (0, 1), (0, 1), (0, 1), (2,), (2,), (2,)]
        report = check_data(splits)
        assert sum(report.cardinality["train"].values()) == len(splits.train)
        assert any("carry no label" in w for w in report.warnings)


def test_indicator_columns_are_label_sets(tmp_path):
    rows = [
        f"{name}{i}.png,{flags}"
        for i in range(2)
        for name, flags in (("a", "1,0,1"), ("b", "0,1,0"), ("c", "1,1,0"), ("d", "0,0,0"))
    ]
    path = manifest(tmp_path, rows, header="file,cat,dog,toy")
    splits = load(path, columns=["cat", "dog", "toy"], val_fraction=0.5)
    assert splits.classes == ["cat", "dog", "toy"]
    assert sorted(label for _, label in splits.train) == [(), (0, 1), (0, 2), (1,)]
    bad = manifest(tmp_path / "bad", ["a.png,1,maybe"], header="file,cat,dog")
    with pytest.raises(DataError, match=r"row 2, column 'dog': 'maybe' is not 0 or 1"):
        load(bad, columns=["cat", "dog"])
    with pytest.raises(DataError, match="add task=multilabel"):
        load(path, task="multiclass", columns=["cat", "dog", "toy"])


@pytest.mark.parametrize(
    "rows, sep, message",
    [
        (
            ["a.png,fire|flying", "b.png,water;ice"],
            None,
            r"mixes separators: row 2 'fire\|flying' uses '\|', row 3 'water;ice' uses ';'",
        ),
        (["a.png,fire flying", 'b.png,"water,ice"'], " ", "mixes separators"),
        (
            ["a.png,water", "b.png,fire|flying"],
            ";",
            r"data.label_sep=';', but row 3 'fire\|flying' separates labels with '\|'",
        ),
        (["a.png,", "b.png,"], None, "the label column 'labels' is empty in every row"),
    ],
)
def test_broken_label_columns_are_one_line_errors(tmp_path, rows, sep, message):
    with pytest.raises(DataError, match=message) as error:
        load(manifest(tmp_path, rows), sep=sep)
    assert "\n" not in str(error.value)


def test_a_multilabel_manifest_under_multiclass_says_to_set_the_task(tmp_path):
    rows = (
        [f"a{i}.png,grass poison" for i in range(3)]
        + [f"b{i}.png,grass" for i in range(3)]
        + [f"c{i}.png,poison" for i in range(3)]
    )
    with pytest.raises(
        DataError, match=r"3 rows hold combinations .*'grass poison'.*add task=multilabel data.label_sep=' '"
    ):
        load(manifest(tmp_path, rows), task="multiclass")
    # An explicit separator settles it without guessing; single labels with spaces stay legal.
    with pytest.raises(DataError, match="3 rows hold several labels"):
        load(manifest(tmp_path, rows), task="multiclass", sep=" ")
    names = manifest(
        tmp_path / "names", [f"a{i}.png,red wine" for i in range(3)] + [f"b{i}.png,beer" for i in range(3)]
    )
    assert load(names, task="multiclass").classes == ["beer", "red wine"]


def test_unknown_validation_labels_and_folders_are_refused(tmp_path, image_folder):
    rows = ["a.png,fire,train", "b.png,water,train", "c.png,fire ice,val"]
    path = manifest(tmp_path, rows, header="file,labels,split")
    with pytest.raises(DataError, match=r"labels \['ice'\] appear in val/test but never in train"):
        load(path, split_column="split")
    cfg = OmegaConf.create({"name": "folder", "root": str(image_folder)})
    with pytest.raises(ConfigError, match="task=multilabel needs a manifest"):
        load_data(cfg, 0, "multilabel")


def test_labels_missing_from_validation_are_reported(tmp_path):
    rows = ["a.png,fire,train", "b.png,water,train", "c.png,fire,val", "d.png,fire water,train"]
    report = check_data(load(manifest(tmp_path, rows, header="file,labels,split"), split_column="split"))
    assert any("label 'water' is on no val image" in w for w in report.warnings)
    assert report.images == {"train": 3, "val": 1, "test": 0}
    assert "labels per image (train): 1 label: 2, 2 labels: 1" in report.table()


def test_the_split_keeps_rare_labels_on_both_sides(tmp_path):
    sets = [(0,)] * 40 + [(0, 1)] * 4 + [(2,)] * 2 + [()] * 4
    assert rarest_label_keys(sets)[40] == 1 and rarest_label_keys(sets)[-1] == -1
    rows = [f"i{n}.png,{' '.join('abc'[i] for i in s)}" for n, s in enumerate(sets)]
    splits = load(manifest(tmp_path, rows), sep=" ", val_fraction=0.25)
    for split in (splits.train, splits.val):
        assert {i for _, label in split for i in label} == {0, 1, 2}


def test_the_decision_rule_keeps_answers_within_the_label_counts_of_training():
    from finetune.use.multilabel import decisions

    p = np.array([[0.9, 0.8, 0.7], [0.1, 0.2, 0.05], [0.6, 0.1, 0.1]])
    assert decisions(p, [0.5] * 3).tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert decisions(p, [0.5] * 3, 1, 2).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    thresholds, _ = tune_thresholds(p, p > 0.5, "none")
    assert thresholds.tolist() == [0.5] * 3


def test_multi_hot_and_split_cells():
    assert multi_hot((0, 2), 4).tolist() == [1, 0, 1, 0]
    assert split_cells(["a | b", "c", ""], None, "x") == [("a", "b"), ("c",), ()]
    assert split_cells(["water type|fire type"], None, "x") == [("water type", "fire type")]


def test_the_real_pokemon_manifest(pokemon):
    splits = load_manifest(
        str(pokemon / "labels.csv"),
        str(pokemon / "images"),
        "file",
        "labels",
        None,
        "{}",
        0.2,
        0,
        task="multilabel",
        label_sep=" ",
    )
    every = splits.train + splits.val
    assert len(every) == 1016 and len(splits.classes) == 18 and not splits.skipped
    assert 0.45 < sum(len(label) == 2 for _, label in every) / len(every) < 0.56
    assert all(splits.counts("val")[c] > 0 for c in splits.classes)


# --- scores ------------------------------------------------------------------------------------


def test_map_leaves_out_labels_without_positives_as_sklearn_does():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    probabilities = torch.tensor(rng.random((6, 3)), dtype=torch.float32)
    metric = PresentLabelsAveragePrecision(3)
    metric.update(probabilities, targets)
    expected = np.mean([average_precision_score(targets[:, j], probabilities[:, j]) for j in (0, 1)])
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-6)
    report = multilabel_report(probabilities, targets, ["a", "b", "c"], [0.5] * 3)
    assert report["map"] == pytest.approx(expected) and report["per_label"]["c"]["ap"] is None


def test_tuned_thresholds_fit_each_label_and_beat_one_half_on_their_data():
    rng = np.random.default_rng(1)
    targets = rng.random((400, 4)) < [0.1, 0.3, 0.5, 0.0]
    # Label 0's scores are low even when present, label 2's high even when absent.
    scores = np.clip(targets * 0.25 + rng.normal([0.05, 0.3, 0.6, 0.2], 0.08, (400, 4)), 0, 1)
    thresholds, global_threshold = tune_thresholds(scores, targets)
    assert thresholds[0] < 0.3 and thresholds[2] > 0.6 and thresholds[3] == global_threshold
    tuned = multilabel_report(scores, targets, list("abcd"), thresholds)
    assert tuned["f1_micro"] > tuned["at_0.5"]["f1_micro"] and tuned["exact"] > tuned["at_0.5"]["exact"]
    accurate, _ = tune_thresholds(scores, targets, "accuracy")  # fewer false alarms than F1's
    assert all(a >= f for a, f in zip(accurate, thresholds))
    assert multilabel_report(scores, targets, list("abcd"), accurate)["exact"] >= tuned["exact"]


def test_multi_hot_targets_are_mixed_with_the_images_ratio():
    mixer = batch_mixer({"alpha": 0.4}, {"alpha": 0.0}, 3, 0.1, on_features=False, multi_label=True)
    images = torch.stack([torch.full((3, 4, 4), float(i)) for i in range(5)])
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float)
    np.random.seed(3)
    mixed, targets = mixer(images.clone(), labels)
    lam = 1 - float(mixed[0, 0, 0, 0]) / 3  # image 0 = lam * 0 + (1 - lam) * 3
    assert torch.allclose(targets[0], lam * labels[0] + (1 - lam) * labels[3])
    assert torch.equal(targets[4], labels[4]) and torch.equal(mixed[4], images[4])  # the odd one stays clean


# --- runs --------------------------------------------------------------------------------------


def multilabel_overrides(csv_path) -> list[str]:
    return [
        "task=multilabel",
        "data=csv",
        f"data.csv={csv_path}",
        "data.path_column=file",
        "data.label_column=labels",
        "data.label_sep=' '",
        "data.val_fraction=0.4",
    ]


def test_a_head_only_run_tunes_thresholds_that_load_predict_evaluate_and_export_use(tmp_path, capsys):
    from finetune import fit, load
    from finetune.commands import command

    def main_commands(args):
        return command(args[0])(args[1:])

    csv_path = write_multilabel_manifest(tmp_path / "data")
    result = fit(
        "freeze_all_but_head",
        [
            *TINY,
            *QUICK_WITH_PICTURES,
            *multilabel_overrides(csv_path),
            "trainer.max_epochs=2",
            "viz.layers=[]",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
    )
    assert (
        result.objective == "val/map" and "val/map" in result.metrics and repr(result).startswith("FitResult(val/map=")
    )
    for key in ("val/f1_micro", "val/f1_macro", "val/exact", "val/f1_micro_tuned", "val/exact_tuned"):
        assert 0 <= result.metrics[key] <= 1, key
    summary = json.loads((result.output_dir / "summary.json").read_text())
    thresholds = summary["multilabel"]["thresholds"]
    assert list(thresholds) == ["blue", "green", "red"] and summary["multilabel"]["val"]["per_label"]["red"]["ap"] >= 0
    for picture in ("average_precision", "cooccurrence", "curves"):
        assert (result.output_dir / "viz" / f"{picture}.png").is_file(), picture
    assert not (result.output_dir / "viz" / "confusion.png").exists()

    model = load(result.best_checkpoint)
    assert model.task == "multilabel" and model.thresholds == list(thresholds.values())
    images = sorted((tmp_path / "data" / "images").glob("*.png"))[:4]
    predictions = model.predict([str(p) for p in images])
    probabilities = model.probabilities([str(p) for p in images])
    # The generated sets hold 0 to 2 of the 3 labels: answers hold at most the 2 most probable.
    assert (model.min_labels, model.max_labels) == (0, 2)
    for prediction, row in zip(predictions, probabilities):
        passing = [
            c for c, p, t in sorted(zip(model.classes, row.tolist(), model.thresholds), key=lambda x: -x[1]) if p >= t
        ]
        assert prediction.names == passing[:2]
        assert set(prediction.probabilities) == set(model.classes)

    out = tmp_path / "predicted"
    assert (
        main_commands(
            ["predict", f"ckpt={result.best_checkpoint}", f"input={tmp_path / 'data' / 'images'}", f"out={out}"]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 42 and set(rows[0]) == {"image", "labels", "blue", "green", "red"}
    assert json.loads((out / "predictions.json").read_text())["thresholds"] == thresholds

    data = [
        f"data.csv={csv_path}",
        "data=csv",
        "data.path_column=file",
        "data.label_column=labels",
        "data.label_sep=' '",
        "data.val_fraction=0.4",
    ]
    assert main_commands(["evaluate", f"ckpt={result.best_checkpoint}", f"out={tmp_path / 'ev'}", *data]) == 0
    evaluation = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert evaluation["map"] == pytest.approx(summary["multilabel"]["val"]["map"], abs=0.02)
    assert "mAP=" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="evaluated on a manifest"):
        main_commands(["evaluate", f"ckpt={result.best_checkpoint}", f"input={tmp_path}"])

    assert (
        main_commands(["export", f"ckpt={result.best_checkpoint}", "format=torchscript", f"out={tmp_path / 'x'}"]) == 0
    )
    preprocessing = json.loads((tmp_path / "x" / "preprocessing.json").read_text())
    assert preprocessing["task"] == "multilabel" and preprocessing["thresholds"] == thresholds
    assert "images get the same label set" in capsys.readouterr().out
    assert main_commands(["viz", f"ckpt={result.best_checkpoint}", f"out={tmp_path / 'v'}", *data]) == 0
    assert (tmp_path / "v" / "label_mistakes.png").is_file() or (tmp_path / "v" / "average_precision.png").is_file()


def test_a_full_finetune_with_mixing_smoothing_and_positive_weights(tmp_path):
    from finetune import fit

    csv_path = write_multilabel_manifest(tmp_path / "data")
    result = fit(
        None,
        [
            *TINY,
            *QUICK,
            *multilabel_overrides(csv_path),
            "mixup.alpha=0.4",
            "cutmix.alpha=1.0",
            "loss.label_smoothing=0.1",
            "data.balance=weighted_loss",
            "tta=flip",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
    )
    assert {"val/map", "val/map_tta", "val/f1_micro_tuned", "tta_views"} <= set(result.metrics)
    with pytest.raises(ConfigError, match="data.balance=sampler draws one class per image"):
        fit(
            None,
            [
                *TINY,
                *QUICK,
                *multilabel_overrides(csv_path),
                "data.balance=sampler",
                f"hydra.run.dir={tmp_path / 'run2'}",
            ],
        )


def test_the_monitored_metric_follows_the_task_unless_set():
    from finetune.config import compose_config
    from finetune.search.sweep import SweepSummary
    from finetune.train.history import monitored

    assert monitored(compose_config([])) == "val/acc"
    assert monitored(compose_config(["task=multilabel"])) == "val/map"
    assert monitored(compose_config(["task=multilabel", "callbacks.checkpoint.monitor=val/f1_micro"])) == "val/f1_micro"
    summary = SweepSummary()  # conf/hydra/default.yaml: objective auto
    summary._resolve(compose_config(["task=multilabel"]))
    assert summary.objective == "val/map"
    from finetune.config import TASK_CHOICES, check_types
    from finetune.data.labels import TASKS
    from finetune.use.multilabel import OBJECTIVES

    assert TASK_CHOICES == TASKS  # config.py imports no room: its lists must agree with the rooms'
    for objective in OBJECTIVES:
        check_types(compose_config([f"multilabel.thresholds={objective}"]))
    with pytest.raises(ConfigError, match=r"multilabel.thresholds='f2': choose f1, accuracy or none"):
        check_types(compose_config(["multilabel.thresholds=f2"]))


def test_a_multilabel_run_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path):
    from finetune import fit

    csv_path = write_multilabel_manifest(tmp_path / "data")
    common = [*TINY, *QUICK, *multilabel_overrides(csv_path), "mixup.alpha=0.4"]
    straight = fit(None, [*common, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'straight'}"])
    fit(None, [*common, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'resumed'}"])
    resumed = fit(None, [*common, "trainer.max_epochs=2", "resume=true", f"hydra.run.dir={tmp_path / 'resumed'}"])
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for key in ("val/map", "val/loss", "train/loss"):
        assert resumed.history[-1][key] == pytest.approx(straight.history[-1][key], abs=1e-6), key
    assert (
        json.loads((resumed.output_dir / "summary.json").read_text())["multilabel"]["thresholds"]
        == json.loads((straight.output_dir / "summary.json").read_text())["multilabel"]["thresholds"]
    )
