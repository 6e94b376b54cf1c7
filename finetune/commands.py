"""The CLI's subcommands besides training: each takes Hydra overrides and returns an exit code."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from finetune.config import compose_config
from finetune.data.check import NEAR_BLANK_SHARE, check_data, near_blank_share
from finetune.data.images import UnreadableImage, load_rgb
from finetune.data.sources import SPLITS, relabel, scan_class_folders
from finetune.errors import ConfigError
from finetune.export import export
from finetune.inference import expand_inputs, load
from finetune.optim import group_lrs
from finetune.metrics import classification_report, format_report
from finetune.summary import format_table, groups_table
from finetune.train import backbone_from_config, build_model, load_data
from finetune.unfreeze import gradual_unfreezing


def check_data_command(overrides: Sequence[str]) -> int:
    """``finetune check-data data=...``: the pre-run data check, plus a full decode of every file
    (unreadable files are listed as skipped, near-blank placeholders as a warning)."""
    cfg = compose_config(overrides)
    splits = load_data(cfg.data, cfg.seed)
    failures: dict[str, str] = {}
    near_blank = []
    for images, names, _ in _readable_batches([s for split in SPLITS for s in getattr(splits, split)], 64, failures):
        near_blank += [n for image, n in zip(images, names) if near_blank_share(image) >= NEAR_BLANK_SHARE]
    report = check_data(splits)
    report.add_unreadable(failures)
    report.add_near_blank(near_blank)
    print(report.table())
    return 0


def show_groups_command(overrides: Sequence[str]) -> int:
    """``finetune show-groups backbone.name=NAME``: the layer-group table of a run, without
    downloading weights or training (the head is sized for the configured data's classes), then
    each group's output shape, stride, receptive field and multiply-adds at the run's input size."""
    from finetune.anatomy import anatomy, anatomy_table
    from finetune.data.transforms import with_input_size

    cfg = compose_config(overrides)
    classes = load_data(cfg.data, cfg.seed).classes
    backbone = backbone_from_config(cfg, weights="random")
    model = build_model(backbone, len(classes), cfg.head, cfg.freeze)
    print(f"backbone: {cfg.backbone.name}, {len(classes)} classes, freeze: {dict(cfg.freeze)}")
    unfreezing = gradual_unfreezing(model, cfg.freeze.get("unfreeze_every"), cfg.freeze.get("unfreeze_at"))
    print(groups_table(model, group_lrs(model, cfg.optimizer), unfreezing.schedule if unfreezing else None))
    input_size = with_input_size(backbone.data_config, cfg.data.image_size)["input_size"]
    print(f"\nat input {'x'.join(map(str, input_size))} (data.image_size={cfg.data.image_size}):")
    print(anatomy_table(anatomy(model, model.groups, input_size)))
    return 0


COMMANDS = {"check-data": check_data_command, "show-groups": show_groups_command}


# --- using a trained model -------------------------------------------------------------------

def _options(args: Sequence[str], defaults: dict, command: str, data: bool = False) -> dict:
    """``key=value`` arguments of a model command, checked against `defaults` (None: required).
    With `data`, ``data=...`` and ``data.*=...`` are collected as Hydra overrides under "data"."""
    options = dict(defaults)
    if data:
        options["data"] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if key == "hydra.run.dir" and "out" in defaults:  # the run directory, as for training
            key = "out"
        if data and sep and (key == "data" or key.startswith("data.")):
            options["data"].append(arg)
            continue
        if not sep or key not in defaults:
            accepted = " ".join(f"{k}=..." for k in defaults) + (" data=... data.*=..." if data else "")
            raise ConfigError(f"finetune {command}: unexpected argument {arg!r}; it takes {accepted}.")
        options[key] = value
    missing = [k for k, v in options.items() if v is None and k not in ("out", "input")]
    if missing:
        raise ConfigError(f"finetune {command} needs {' '.join(f'{k}=...' for k in missing)}.")
    return options


def _labelled_samples(model, opts: dict) -> tuple[list, list]:
    """Samples labelled with the model's classes, matched by name, and the files skipped: the
    class folders of ``input=DIR``; or the test split (else the validation split) of the data
    that ``data=...`` overrides describe; or, with neither, the validation split the model was
    trained with."""
    if opts.get("input"):
        return _labelled_folder(Path(opts["input"]), model.classes)
    from omegaconf import OmegaConf

    if opts.get("data"):
        cfg = compose_config(opts["data"])
    else:
        cfg = OmegaConf.create(model.config)
    splits = load_data(cfg.data, cfg.seed)
    chosen = relabel(splits.test or splits.val, splits.classes, model.classes, "The data", "the model")
    return chosen, list(splits.skipped)


def _output_dir(out: str | None) -> Path:
    """`out` (or ``hydra.run.dir=``), else a fresh run directory like training's: outputs/DATE/TIME."""
    path = Path(out) if out else Path(compose_config([]).paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _readable_batches(samples: Sequence, size: int, failures: dict[str, str]):
    """Batches ``(images, names, labels)`` of `samples` ((path or array, label) pairs), decoded as
    they are needed so memory holds one batch; unreadable files go to `failures` (path -> reason)."""
    images, names, labels = [], [], []
    for item, label in tqdm(samples, desc="decoding", unit="img", disable=len(samples) < 50):
        if isinstance(item, str):
            try:
                image = load_rgb(item)
            except UnreadableImage as err:
                failures[item] = str(err)
                continue
        else:
            image = item
        images.append(image)
        names.append(item if isinstance(item, str) else type(item).__name__)
        labels.append(label)
        if len(images) == size:
            yield images, names, labels
            images, names, labels = [], [], []
    if images:
        yield images, names, labels


def predict_command(args: Sequence[str]) -> int:
    """``finetune predict ckpt=PATH input=FILE|DIR|GLOB [top_k=5] [batch_size=32] [out=DIR]``."""
    opts = _options(args, {"ckpt": None, "input": None, "top_k": "5", "batch_size": "32", "out": None}, "predict")
    if not opts["input"]:
        raise ConfigError("finetune predict needs input=FILE|DIR|GLOB.")
    model = load(opts["ckpt"])
    failures: dict[str, str] = {}
    predictions = []
    batch = int(opts["batch_size"])
    for images, names, _ in _readable_batches([(p, -1) for p in expand_inputs(opts["input"])], batch, failures):
        predictions += model.predict(images, int(opts["top_k"]), batch, names)
    out = _output_dir(opts["out"])
    rows = [[p.source, p.label, f"{p.probability:.4f}",
             ", ".join(f"{label} {prob:.3f}" for label, prob in p.top_k[1:])] for p in predictions]
    print(format_table(["image", "label", "probability", "next"], rows, "llrl"))
    with (out / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        k = max((len(p.top_k) for p in predictions), default=0)
        writer.writerow(["image"] + [c for i in range(1, k + 1) for c in (f"label_{i}", f"probability_{i}")])
        for p in predictions:
            writer.writerow([p.source] + [v for label, prob in p.top_k for v in (label, f"{prob:.6f}")])
    (out / "predictions.json").write_text(json.dumps(
        {"checkpoint": str(Path(opts["ckpt"]).resolve()), "classes": model.classes,
         "predictions": [{"image": p.source, "top_k": p.top_k} for p in predictions],
         "skipped": failures}, indent=2))
    for path, reason in failures.items():
        print(f"skipped {path}: {reason}")
    print(f"{len(predictions)} images predicted, {len(failures)} skipped\n  predictions: {out / 'predictions.csv'}\n"
          f"  json: {out / 'predictions.json'}")
    return 0


def evaluate_command(args: Sequence[str]) -> int:
    """``finetune evaluate ckpt=PATH input=DIR`` (one folder per class, names as in training; a
    subset is fine) or ``finetune evaluate ckpt=PATH data=folder data.root=DIR`` (its test split,
    else its validation split). Accuracy, loss, per-class metrics and the confusion matrix."""
    opts = _options(args, {"ckpt": None, "input": None, "batch_size": "32", "out": None}, "evaluate", data=True)
    if not opts["input"] and not opts["data"]:
        raise ConfigError("finetune evaluate needs input=DIR (one folder per class) or data=... overrides.")
    model = load(opts["ckpt"])
    samples, skipped = _labelled_samples(model, opts)
    failures: dict[str, str] = {}
    batch = int(opts["batch_size"])
    logits, labels = [torch.empty(0, len(model.classes))], [torch.empty(0, dtype=torch.long)]
    for images, _, batch_labels in _readable_batches(samples, batch, failures):
        logits.append(model.logits(images, batch))
        labels.append(torch.tensor(batch_labels, dtype=torch.long))
    report = classification_report(torch.cat(logits), torch.cat(labels), model.classes)
    report["skipped"] = dict(skipped) | failures
    out = _output_dir(opts["out"])
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"  evaluation: {out / 'evaluation.json'}")
    return 0


def export_command(args: Sequence[str]) -> int:
    """``finetune export ckpt=PATH format=onnx|torchscript|safetensors [out=DIR] [input=IMAGES]``:
    parity is checked on up to 8 images from `input`, else from the training config's data."""
    opts = _options(args, {"ckpt": None, "format": None, "out": None, "input": None, "tolerance": "1e-4"}, "export")
    model = load(opts["ckpt"])
    images, where = _parity_images(model, opts["input"])
    result = export(model, opts["format"], _output_dir(opts["out"]), model.preprocess(images), float(opts["tolerance"]))
    print(f"exported {opts['format']}: {result.path}\n  preprocessing: {result.preprocessing}\n"
          f"  parity on {len(images)} {where}: max |logit difference| = {result.max_abs_diff:.2e}")
    return 0


def _parity_images(model, spec: str | None) -> tuple[list, str]:
    if spec:
        images, _, _ = next(_readable_batches([(p, -1) for p in expand_inputs(spec)[:8]], 8, {}), ([], [], []))
        if images:
            return images, f"images from {spec}"
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(model.config)
        splits = load_data(cfg.data, cfg.seed)
        items = [item for item, _ in splits.val[:8]]
        return [load_rgb(i) if isinstance(i, str) else i for i in items], "validation images of the training data"
    except Exception:  # the training data is not on this machine: random pixels still test parity
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(4)], "random images (training data not found)"


def viz_command(args: Sequence[str]) -> int:
    """``finetune viz ckpt=PATH [input=DIR | data=...] [out=DIR]``: the pictures of a trained
    model, on the images :func:`_labelled_samples` picks."""
    opts = _options(args, {"ckpt": None, "input": None, "out": None, "max_images": "500"}, "viz", data=True)
    from omegaconf import OmegaConf

    from finetune.viz.report import write_pictures

    model = load(opts["ckpt"])
    cfg = OmegaConf.create(model.config)
    samples, _ = _labelled_samples(model, opts)
    summary = Path(opts["ckpt"]).resolve().parent.parent / "summary.json"
    history = json.loads(summary.read_text()).get("history", []) if summary.is_file() else []
    out = _output_dir(opts["out"])
    pictures = write_pictures(model.model, model.classes, samples, model.transform, model.data_config, out, history,
                              cfg.viz.layers if "viz" in cfg else None, max_images=int(opts["max_images"]))
    for picture in pictures:
        print(f"  {picture.name}: {picture.path}")
    print(f"  index: {out / 'index.md'}")
    return 0


def _labelled_folder(directory: Path, classes: list[str]) -> tuple[list, list]:
    """Samples from class folders, labelled by the model's class of the same name, and the
    files skipped while scanning."""
    skipped, sizes = [], {}
    found, samples = scan_class_folders(directory.resolve(), skipped, sizes)
    return relabel(samples, found, classes, str(directory), "the model"), skipped


def _split_options(args: Sequence[str], keys: dict, command: str) -> tuple[dict, list[str]]:
    """(this command's ``key=value`` options, the remaining Hydra overrides)."""
    options, overrides = dict(keys), []
    for arg in args:
        key, sep, value = arg.partition("=")
        if key == "hydra.run.dir":
            key = "out"
        if key in keys and sep:
            options[key] = value
        elif sep:
            overrides.append(arg)
        else:
            raise ConfigError(f"finetune {command}: unexpected argument {arg!r}; it takes "
                              f"{' '.join(f'{k}=...' for k in keys)} and config overrides (key=value).")
    return options, overrides


def _embeddings(opts: dict, overrides: list[str]):
    """Embeddings of the data `overrides` describe: under a checkpoint's fine-tuned backbone
    (``ckpt=``; its own training data when no ``data=`` is given) or a configured one."""
    from omegaconf import OmegaConf

    from finetune.data.transforms import with_input_size
    from finetune.embed import embed

    if opts["ckpt"]:
        model = load(opts["ckpt"])
        cfg = compose_config(overrides) if overrides else OmegaConf.create(model.config)
        if "cache" not in cfg.data:  # checkpoints written before the feature cache existed
            cfg = OmegaConf.merge(cfg, {"data": {"cache": compose_config([]).data.cache}})
        module, data_config, name = model.model.backbone, model.data_config, f"{opts['ckpt']}"
    else:
        cfg = compose_config(overrides)
        torch.manual_seed(cfg.seed)  # backbone.weights=random: the same network on every call
        backbone = backbone_from_config(cfg)
        module, data_config, name = backbone.model, with_input_size(backbone.data_config, cfg.data.image_size), backbone.name
    splits = load_data(cfg.data, cfg.seed)
    embeddings, unreadable = embed(module, data_config, name, cfg, splits)
    return embeddings, {**dict(splits.skipped), **unreadable}


def embed_command(args: Sequence[str]) -> int:
    """``finetune embed [ckpt=PATH] [format=npz|parquet] [out=DIR] backbone.name=... data=...``:
    the pooled features of every image, with labels, paths and splits, in one file."""
    from finetune.embed import FORMATS, save

    opts, overrides = _split_options(args, {"ckpt": None, "format": "npz", "out": None}, "embed")
    if opts["format"] not in FORMATS:
        raise ConfigError(f"format={opts['format']!r}; choose {' or '.join(FORMATS)}.")
    embeddings, skipped = _embeddings(opts, overrides)
    path = save(embeddings, _output_dir(opts["out"]) / f"embeddings.{opts['format']}")
    counts = {s: int((embeddings.splits == s).sum()) for s in SPLITS if (embeddings.splits == s).any()}
    print(f"{len(embeddings.features)} images x {embeddings.features.shape[1]} features "
          f"({', '.join(f'{s} {n}' for s, n in counts.items())}) from {embeddings.backbone}: {path}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable files")
    return 0


def probe_command(args: Sequence[str]) -> int:
    """``finetune probe [embeddings=FILE.npz | ckpt=PATH | backbone.name=... data=...] [C=1] [k=5]``:
    logistic regression and k-NN on the features: the quickest transfer-learning baseline."""
    from finetune.embed import load_embeddings, probe

    opts, overrides = _split_options(args, {"embeddings": None, "ckpt": None, "C": "1.0", "k": "5", "out": None},
                                     "probe")
    try:
        c, k = float(opts["C"]), int(opts["k"])
    except ValueError:
        raise ConfigError(f"C={opts['C']!r} must be a number and k={opts['k']!r} an integer.") from None
    if opts["embeddings"]:
        if overrides or opts["ckpt"]:
            raise ConfigError("embeddings=FILE already holds the features: drop ckpt= and config overrides.")
        embeddings = load_embeddings(Path(opts["embeddings"]))
    else:
        embeddings, _ = _embeddings(opts, overrides)
    scores = probe(embeddings, c=c, k=k)
    print(f"probe on {embeddings.backbone} features ({embeddings.features.shape[1]}-d), "
          f"{int((embeddings.splits == 'train').sum())} training images")
    print(format_table(["method", "split", "accuracy", "fit s"],
                       [[s.method, s.split, f"{s.accuracy:.4f}", f"{s.seconds:.2f}"] for s in scores]))
    out = _output_dir(opts["out"])
    (out / "probe.json").write_text(json.dumps([vars(s) for s in scores], indent=2))
    print(f"  {out / 'probe.json'}")
    return 0


COMMANDS.update({"predict": predict_command, "evaluate": evaluate_command, "export": export_command,
                 "viz": viz_command, "embed": embed_command, "probe": probe_command})
