"""Use a trained model from the shell: ``finetune predict | evaluate | export | viz ckpt=PATH ...``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from finetune.commands.args import REQUIRED, TRUST_OPTIONS, decision_rule_from, output_dir, parse, readable_batches
from finetune.data.images import load_rgb
from finetune.data.sources import load_data, relabel, scan_class_folders
from finetune.errors import ConfigError
from finetune.tables import format_table
from finetune.use.confidence import format_trust_report, trust_report
from finetune.use.export import export
from finetune.use.load import FinetunedModel, expand_inputs, load
from finetune.use.metrics import classification_report, format_report
from finetune.use.predictions import write_label_sets, write_predictions
from finetune.use.tta import check_tta, tta_log_probabilities


def predict_command(args: Sequence[str]) -> int:
    """``finetune predict ckpt=PATH input=FILE|DIR|GLOB [top_k=5] [batch_size=32] [tta=none] [out=DIR]
    [min_confidence=P | target_precision=P] [coverage=P [conformal=lac|aps]]``
    tta: none, flip, crops or crops_flip (probabilities averaged over 1, 2, 5 or 10 views per image).
    Probabilities are calibrated (the checkpoint's temperature); below min_confidence (or the one
    target_precision picks on the validation split) the label is ``unknown``; coverage adds the
    conformal prediction set holding the true class with that probability."""
    opts, _ = parse(
        args,
        {
            "ckpt": REQUIRED,
            "input": REQUIRED,
            "top_k": "5",
            "batch_size": "32",
            "tta": "none",
            "out": None,
            **TRUST_OPTIONS,
        },
        "predict",
    )
    tta = _tta_summary(opts["tta"])
    model = load(opts["ckpt"])
    rule = decision_rule_from(opts, model)  # before any image is decoded
    failures: dict[str, str] = {}
    predictions = []
    batch = int(opts["batch_size"])
    for images, names, _ in readable_batches([(p, -1) for p in expand_inputs(opts["input"])], batch, failures):
        predictions += model.predict(images, int(opts["top_k"]), batch, names, tta=tta["mode"], rule=rule)
    out = output_dir(opts["out"])
    if model.task == "multilabel":
        _write_label_sets(model, predictions, out, opts["ckpt"], tta, failures)
        return 0
    sets = rule.score is not None
    rows = [
        [p.source, p.label, f"{p.probability:.4f}"]
        + ([_set_text(p.prediction_set)] if sets else [])
        + [", ".join(f"{label} {prob:.3f}" for label, prob in p.top_k[1:])]
        for p in predictions
    ]
    print(
        format_table(
            ["image", "label", "probability"] + (["set"] if sets else []) + ["next"],
            rows,
            "llr" + ("l" if sets else "") + "l",
        )
    )
    write_predictions(predictions, out, opts["ckpt"], model, rule, tta, failures)
    for path, reason in failures.items():
        print(f"skipped {path}: {reason}")
    print(_tta_line(tta))
    print(
        f"{len(predictions)} images predicted{_trust_counts(predictions, rule)}, {len(failures)} skipped\n"
        f"  predictions: {out / 'predictions.csv'}\n  json: {out / 'predictions.json'}"
    )
    return 0


def _set_text(prediction_set: list) -> str:
    return " ".join(c for c, _ in prediction_set) or "(empty)"


def _trust_counts(predictions: list, rule) -> str:
    """ ", 3 unknown (confidence < 0.93), mean set size 1.2 (coverage 0.9)" as the rule applies."""
    parts = []
    if rule.min_confidence is not None:
        picked = f" picked for precision {rule.target_precision}" if rule.target_precision is not None else ""
        parts.append(f"{sum(p.unknown for p in predictions)} unknown (confidence < {rule.min_confidence:.4f}{picked})")
    if rule.score is not None and predictions:
        size = sum(len(p.prediction_set) for p in predictions) / len(predictions)
        parts.append(f"mean set size {size:.2f} ({rule.score} sets, coverage {rule.coverage})")
    return "".join(f", {part}" for part in parts)


def _write_label_sets(
    model: FinetunedModel, predictions: list, out: Path, ckpt: str, tta: dict, failures: dict[str, str]
) -> None:
    """A multi-label model's predictions: the table, ``predictions.csv`` (the label set, then every
    label's probability) and ``predictions.json`` (with the thresholds)."""
    rows = [
        [p.source, " ".join(p.names) or "(none)", ", ".join(f"{c} {v:.3f}" for c, v in p.labels)] for p in predictions
    ]
    print(format_table(["image", "labels", "probabilities"], rows, "lll"))
    write_label_sets(predictions, out, ckpt, model, tta, failures)
    for path, reason in failures.items():
        print(f"skipped {path}: {reason}")
    print(_tta_line(tta))
    print(
        f"{len(predictions)} images predicted (labels at the thresholds tuned on validation), {len(failures)} "
        f"skipped\n  predictions: {out / 'predictions.csv'}\n  json: {out / 'predictions.json'}"
    )


def evaluate_command(args: Sequence[str]) -> int:
    """``finetune evaluate ckpt=PATH input=DIR`` (one folder per class, names as in training; a
    subset is fine) or ``finetune evaluate ckpt=PATH data=folder data.root=DIR`` (its test split,
    else its validation split). Accuracy, loss, per-class metrics and the confusion matrix.
    tta=flip|crops|crops_flip: scores the probabilities averaged over 2, 5 or 10 views per image."""
    opts, data = parse(
        args,
        {"ckpt": REQUIRED, "input": None, "batch_size": "32", "tta": "none", "out": None, **TRUST_OPTIONS},
        "evaluate",
        "data",
    )
    if not opts["input"] and not data:
        raise ConfigError("finetune evaluate needs input=DIR (one folder per class) or data=... overrides.")
    tta = _tta_summary(opts["tta"])
    model = load(opts["ckpt"])
    rule = decision_rule_from(opts, model)
    out = output_dir(opts["out"])
    samples, skipped = _labelled_samples(model, opts["input"], data)
    batch = int(opts["batch_size"])
    if model.task == "multilabel":
        from finetune.use.multilabel import evaluate_multilabel, format_multilabel_report

        report = evaluate_multilabel(
            model.model,
            model.data_config,
            samples,
            model.classes,
            model.thresholds,
            mode=tta["mode"],
            batch_size=batch,
            min_labels=model.min_labels,
            max_labels=model.max_labels,
        )
        failures, text = report.pop("skipped"), format_multilabel_report
    else:
        failures, text = {}, format_report
        logits, labels = [torch.empty(0, len(model.classes))], [torch.empty(0, dtype=torch.long)]
        for images, _, batch_labels in readable_batches(samples, batch, failures):
            logits.append(_evaluation_logits(model, images, batch, tta["mode"]))
            labels.append(torch.tensor(batch_labels, dtype=torch.long))
        logits, labels = torch.cat(logits), torch.cat(labels)
        report = classification_report(logits, labels, model.classes) | trust_report(
            logits, labels, model.temperature, rule
        )
        report["pictures"] = _trust_pictures(logits, labels, model.temperature, rule, out / "viz")
    report["skipped"] = dict(skipped) | failures
    report["tta"] = tta
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    print(text(report))
    if "calibration" in report:
        print("\n".join(format_trust_report(report)))
    print(_tta_line(tta))
    for name, path in report.get("pictures", {}).items():
        print(f"  {name}: {path}")
    print(f"  evaluation: {out / 'evaluation.json'}")
    return 0


def export_command(args: Sequence[str]) -> int:
    """``finetune export ckpt=PATH format=onnx|torchscript|safetensors|hub [out=DIR] [input=IMAGES]
    [min_confidence=P | target_precision=P] [coverage=P [conformal=lac|aps]]``: parity is checked
    on up to 8 images from `input`, else from the training config's data; the decision rule goes
    into ``preprocessing.json`` beside the temperature. format=hub: a folder for the Hugging Face
    Hub that ``timm.create_model("local-dir:DIR", pretrained=True)`` loads (parity checked through
    that load), with a model card (README.md) and the run's pictures; ``finetune push`` uploads it."""
    opts, _ = parse(
        args,
        {"ckpt": REQUIRED, "format": REQUIRED, "out": None, "input": None, "tolerance": "1e-4", **TRUST_OPTIONS},
        "export",
    )
    model = load(opts["ckpt"])
    rule = decision_rule_from(opts, model)
    images, where = _parity_images(model, opts["input"])
    out, sample, tolerance = output_dir(opts["out"]), model.preprocess(images), float(opts["tolerance"])
    if opts["format"] == "hub":
        from finetune.use.hub import hub_folder

        folder = hub_folder(model, opts["ckpt"], out, sample, tolerance, rule)
        result = folder.export
        print(
            f"exported hub: {out} ({', '.join(folder.files)})\n"
            f"  load: timm.create_model('local-dir:{out}', pretrained=True); upload: finetune push ckpt=... repo_id=..."
        )
    else:
        result = export(model, opts["format"], out, sample, tolerance, rule)
        print(f"exported {opts['format']}: {result.path}\n  preprocessing: {result.preprocessing}")
    answer = "label set" if model.thresholds else ("answer (class, unknown, set)" if rule.describe() else "class")
    print(
        f"  parity on {len(images)} {where}: max |logit difference| = {result.max_abs_diff:.2e}, "
        f"{result.same_decisions}/{len(images)} images get the same {answer}"
    )
    return 0


def viz_command(args: Sequence[str]) -> int:
    """``finetune viz ckpt=PATH [input=DIR | data=...] [out=DIR]``: the pictures of a trained
    model, on the images :func:`_labelled_samples` picks, with index.md and the report page
    index.html."""
    from finetune.viz.checkpoint import checkpoint_pictures

    opts, data = parse(args, {"ckpt": REQUIRED, "input": None, "out": None, "max_images": "500"}, "viz", "data")
    model = load(opts["ckpt"])
    samples, _ = _labelled_samples(model, opts["input"], data)
    out = output_dir(opts["out"])
    for picture in checkpoint_pictures(model, opts["ckpt"], out, samples, int(opts["max_images"])):
        print(f"  {picture.name}: {picture.path}")
    print(f"  index: {out / 'index.md'}")
    print(f"  report: {out / 'index.html'} (open it in a browser)")
    return 0


def _trust_pictures(logits: torch.Tensor, labels: torch.Tensor, temperature: float, rule, out: Path) -> dict[str, str]:
    """The reliability diagram and the risk-coverage curve of an evaluation, name -> path."""
    from finetune.viz.report import trust_pictures

    if not len(labels):
        return {}
    drawn = trust_pictures(logits, labels, temperature, out, rule.min_confidence, split="evaluated")
    return {name: str(path) for name, path, _ in drawn}


def _tta_summary(mode: str) -> dict:
    """``{"mode", "views"}`` for the json files; a ConfigError for an unknown mode, before any work."""
    return {"mode": mode, "views": check_tta(mode)}


def _tta_line(tta: dict) -> str:
    views = tta["views"]
    return f"test-time augmentation: {tta['mode']} ({views} view{'s' if views > 1 else ''} per image)"


def _evaluation_logits(model: FinetunedModel, images: list, batch_size: int, tta: str) -> torch.Tensor:
    """What classification_report takes as logits (it applies argmax and F.cross_entropy, a
    log-softmax inside): the model's logits, or with TTA the log of the averaged probabilities,
    whose log-softmax is itself, so accuracy and loss are those of the averaged prediction."""
    if tta == "none":
        return model.logits(images, batch_size)
    return tta_log_probabilities(model.model, images, model.data_config, tta, batch_size)


def _labelled_samples(model: FinetunedModel, folder: str | None, data: list[str]) -> tuple[list, list]:
    """Samples labelled with the model's classes, matched by name, and the files skipped: the
    class folders of `folder`; or the test split (else the validation split) of the data that
    the `data` overrides describe; or, with neither, the validation split the model was trained
    with."""
    if folder and model.task == "multilabel":
        raise ConfigError(
            "A multi-label model is evaluated on a manifest (class folders hold one class per "
            "image): data=csv data.csv=FILE data.label_sep=' ' (its test split, else its val split)."
        )
    if folder:
        skipped, sizes = [], {}
        found, samples = scan_class_folders(Path(folder).resolve(), skipped, sizes)
        return relabel(samples, found, model.classes, folder, "the model"), skipped
    return model.evaluation_samples(data)


def _parity_images(model: FinetunedModel, spec: str | None) -> tuple[list, str]:
    if spec:
        images, _, _ = next(readable_batches([(p, -1) for p in expand_inputs(spec)[:8]], 8, {}), ([], [], []))
        if images:
            return images, f"images from {spec}"
    try:
        cfg = model.run_config()
        items = [item for item, _ in load_data(cfg.data, cfg.seed, cfg.get("task", "multiclass")).val[:8]]
        return [load_rgb(i) if isinstance(i, str) else i for i in items], "validation images of the training data"
    except Exception:  # the training data is not on this machine: random pixels still test parity
        rng = np.random.default_rng(0)
        return [
            rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(4)
        ], "random images (training data not found)"
