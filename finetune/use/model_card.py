"""The model card of a Hub folder: ``README.md`` with the YAML front matter the Hugging Face Hub
reads (library, tags, pipeline, base model), and the run's pictures beside it.

Contract: every number on the card comes from the run's own files: the checkpoint (classes,
config, temperature, thresholds) and, in the run folder RUN that holds ``checkpoints/CKPT``,
``RUN/summary.json`` (data counts, the best epoch's metrics) and ``RUN/viz/*.png``. What those
files lack is said to be missing, never estimated: no summary.json, no data or metrics section;
a checkpoint other than the run's best, no metrics (summary.json's are the best epoch's). The
only derived numbers are exact functions of stored ones: correct counts (accuracy x images) and
their Wilson 95% intervals. Local paths are not published: files are named by their base name.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from finetune.use.card_results import RunFiles, calibration_section, limitations_section, metrics_section, monitor_name
from finetune.use.load import FinetunedModel

# The run's pictures the card shows: name -> (caption, whether it describes the best checkpoint
# rather than the whole run). Pictures of the images themselves (mistakes, patches) stay home:
# a card is public, the data may not be.
PICTURES = {
    "curves": ("Learning curves: loss and accuracy per epoch, train and validation.", False),
    "confusion": ("Confusion matrix on the validation split, with per-class precision and recall.", True),
    "reliability": ("Reliability: accuracy against confidence, before and after temperature scaling.", True),
    "risk_coverage": ("Risk-coverage: the error among the images answered when only the most confident are.", True),
}
SHOWN_CLASSES = 30
_FOLDERS = re.compile(r"(?<![\w.~])(?:[A-Za-z]:)?(?:[/\\][^/\\\s,;:'\"]+)+[/\\]")  # the directories of an absolute path


@dataclass(frozen=True)
class ModelCard:
    readme: Path
    pictures: list[Path] = field(default_factory=list)


def read_run(ckpt: str | Path) -> RunFiles:
    """The run folder of `ckpt` (RUN for RUN/checkpoints/CKPT) and its summary.json."""
    ckpt = Path(ckpt).resolve()
    run_dir = ckpt.parent.parent
    path = run_dir / "summary.json"
    if ckpt.parent.name != "checkpoints":
        return RunFiles(ckpt.parent, None, f"{ckpt.name} is not in a run's checkpoints/ folder")
    if not path.is_file():
        return RunFiles(run_dir, None, "the run folder has no summary.json (the run did not finish)")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return RunFiles(run_dir, None, f"its summary.json cannot be read ({type(err).__name__})")
    best = summary.get("best_checkpoint")
    return RunFiles(run_dir, summary, None, is_best=best is not None and Path(best).name == ckpt.name)


def write_model_card(model: FinetunedModel, ckpt: str | Path, out_dir: Path, repo_id: str | None = None) -> ModelCard:
    """Copy the run's pictures (:data:`PICTURES`, those that exist) into `out_dir` and write
    ``README.md`` there; `repo_id` (ORG/NAME) names the model and its ``hf-hub:`` load line."""
    run = read_run(ckpt)
    copied = []
    for name, (_, of_best) in PICTURES.items():
        source = run.run_dir / "viz" / f"{name}.png"
        if source.is_file() and (run.is_best or not of_best):
            copied.append(Path(shutil.copyfile(source, out_dir / source.name)))
    readme = out_dir / "README.md"
    readme.write_text(model_card(model, run, repo_id, [p.name for p in copied]), encoding="utf-8")
    return ModelCard(readme, copied)


def model_card(model: FinetunedModel, run: RunFiles, repo_id: str | None, pictures: list[str]) -> str:
    """The card's markdown: front matter, then what it classifies, the data, the recipe, the
    metrics, calibration, the pictures (`pictures`: file names beside the card), limitations
    and how to load it."""
    arch = model.config["backbone"]["name"]
    title = repo_id.split("/")[-1] if repo_id else f"{arch} fine-tuned for {len(model.classes)} classes"
    classes = ", ".join(f"`{c}`" for c in model.classes[:SHOWN_CLASSES])
    if len(model.classes) > SHOWN_CLASSES:
        classes += f" and {len(model.classes) - SHOWN_CLASSES} more (all in `config.json`, `label_names`)"
    kind = (
        "which of its labels apply to an image (multi-label)" if model.task == "multilabel" else "one class per image"
    )
    parts = [
        front_matter(model),
        f"# {title}\n",
        f"An image classifier fine-tuned with finetune from timm's `{arch}`. It predicts "
        f"{kind} among {len(model.classes)}: {classes}.\n",
        *_data(run),
        *_recipe(model, run),
        *metrics_section(model, run),
        *calibration_section(model, run),
        *_pictures(pictures),
        *limitations_section(model, run),
        *_usage(model, repo_id),
    ]
    return "\n".join(parts)


def front_matter(model: FinetunedModel) -> str:
    """YAML the Hub reads: timm as the library, tags, the pipeline, and ``base_model`` when the
    backbone started from timm's Hub weights (not from an embedded package, a file or random).
    No license: the owner of the data and the model decides it."""
    lines = [
        "---",
        "library_name: timm",
        "tags:",
        "- image-classification",
        "- timm",
        "- finetune",
        "pipeline_tag: image-classification",
    ]
    base = base_model(model.config)
    if base:
        lines += ["base_model:", f"- {base}"]
    return "\n".join(lines + ["---", ""])


def base_model(config: dict) -> str | None:
    """timm's Hub id of the weights the backbone started from, when they came from the Hub:
    ``backbone.weights=hub``, or ``pretrained`` for a backbone without embedded weights."""
    import timm

    from finetune.model.weights import EMBEDDED_PACKAGES

    name, weights = config["backbone"]["name"], str(config["backbone"].get("weights", "pretrained"))
    if weights != "hub" and not (weights == "pretrained" and name not in EMBEDDED_PACKAGES):
        return None
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    return cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else None


def _weights(config: dict) -> str:
    from finetune.model.weights import EMBEDDED_PACKAGES

    name, weights = config["backbone"]["name"], str(config["backbone"].get("weights", "pretrained"))
    if weights == "random":
        return "random initialization (no pretrained weights)"
    if weights in ("pretrained", "embedded") and name in EMBEDDED_PACKAGES:
        return f"ImageNet weights from the pip package {EMBEDDED_PACKAGES[name][1]}"
    if weights in ("pretrained", "hub"):
        base = base_model(config)
        return (
            f"timm's pretrained weights [{base}](https://huggingface.co/{base})"
            if base
            else "timm's pretrained weights"
        )
    return f"weights from a local file ({Path(weights).name})"


def _data(run: RunFiles) -> list[str]:
    data = (run.summary or {}).get("data")
    if not data:
        why = run.missing or "summary.json has no data report"
        return ["## Data\n", f"Not stated: {why}.\n"]
    counts = {s: c for s, c in data.get("counts", {}).items() if sum(c.values()) or s in ("train", "val")}
    each = " (an image counts under each of its labels)" if data.get("cardinality") else ""
    lines = [
        "## Data\n",
        f"Images per class and split, as the run counted them{each}:\n",
        "| class | " + " | ".join(counts) + " |",
        "|---|" + "---:|" * len(counts),
    ]
    lines += [
        f"| {c} | " + " | ".join(str(counts[s].get(c, 0)) for s in counts) + " |" for c in data.get("classes", [])
    ]
    lines += ["| **images** | " + " | ".join(str(run.images(s)) for s in counts) + " |", ""]
    if "calibration" in counts:
        lines.append("- The calibration images were held out of training, for conformal prediction sets.")
    size = data.get("size_range")
    if size:
        lines.append(f"- Image sizes: {size[0]}x{size[1]} px (smallest) to {size[2]}x{size[3]} px (largest).")
    lines.append(
        _listed(
            "Skipped files (unreadable or not images)",
            [f"{Path(p).name}: {_local(r)}" for p, r in data.get("skipped", [])],
        )
    )
    lines.append(
        _listed(
            "Duplicates across splits (a training image with an identical copy in val/test)",
            [f"{Path(a).name} = {Path(b).name}" for a, b in data.get("duplicates", [])],
        )
    )
    lines.append(
        _listed(
            "Identical training images with different labels",
            [f"{Path(a).name} = {Path(b).name}" for a, b in data.get("conflicts", [])],
        )
    )
    lines += [f"- warning: {_local(w)}" for w in data.get("warnings", [])]
    return lines + [""]


def _local(text: str) -> str:
    """`text` with every absolute path cut to its file name."""
    return _FOLDERS.sub("", str(text))


def _listed(what: str, items: list[str], shown: int = 5) -> str:
    more = f", and {len(items) - shown} more" if len(items) > shown else ""
    return f"- {what}: {len(items)}" + (f" ({'; '.join(items[:shown])}{more})" if items else "")


def _recipe(model: FinetunedModel, run: RunFiles) -> list[str]:
    c = model.config
    opt, sched, aug, head, freeze = (
        c["optimizer"],
        c.get("scheduler") or {},
        c.get("augment") or {},
        c["head"],
        c["freeze"],
    )
    dc = model.data_config
    epochs = f"{c['trainer']['max_epochs']} at most"
    if run.summary and run.is_best and "epoch" in run.summary.get("metrics", {}):
        epochs += f"; best epoch {int(run.summary['metrics']['epoch'])} by {monitor_name(c)}"
    crop = (
        "random resized crop (scale {}, ratio {})".format(aug.get("scale"), aug.get("ratio"))
        if aug.get("random_resized_crop")
        else "resize and center crop"
    )
    rows = [
        ("backbone", f"`{c['backbone']['name']}`, {_weights(c)}"),
        ("head", f"linear (dropout {head.get('dropout')})" if not head.get("hidden") else f"MLP ({head['hidden']})"),
        ("frozen", f"groups={freeze.get('groups') or 'none'}, BatchNorm {freeze.get('batchnorm')}"),
        (
            "optimizer",
            f"{opt.get('name')}, lr {opt.get('lr')}, weight decay {opt.get('weight_decay')}"
            + "".join(f", {k} {opt[k]}" for k in ("momentum", "layer_decay") if k in opt),
        ),
        ("schedule", ", ".join([str(sched.get("name"))] + [f"{k} {v}" for k, v in sched.items() if k != "name"])),
        ("epochs", epochs),
        ("batch size", c["data"].get("batch_size")),
        (
            "image size",
            f"{dc['input_size'][-1]}x{dc['input_size'][-2]} px, {dc['interpolation']}, crop_pct {dc['crop_pct']}",
        ),
        (
            "augmentation",
            f"{crop}, horizontal flip p={aug.get('hflip')}, policy {aug.get('policy')}, "
            f"color jitter {aug.get('color_jitter')}, random erasing {aug.get('random_erasing')}",
        ),
        ("seed", c.get("seed")),
    ]
    if run.summary and "seconds" in run.summary:
        rows.append(("training time", f"{run.summary['seconds']} s"))
    return ["## Training recipe\n", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _pictures(pictures: list[str]) -> list[str]:
    if not pictures:
        return []
    lines = ["## Pictures\n"]
    for file in pictures:
        caption = PICTURES[Path(file).stem][0]
        lines += [f"{caption}\n", f"![{Path(file).stem}]({file})\n"]
    return lines


def _usage(model: FinetunedModel, repo_id: str | None) -> list[str]:
    dc = model.data_config
    resize = math.floor(min(dc["input_size"][-2:]) / dc["crop_pct"])
    if model.task == "multilabel":
        decide = "probabilities = logits.sigmoid()  # a label applies at its threshold (preprocessing.json)"
    else:
        decide = f"probabilities = (logits / {model.temperature:.4f}).softmax(dim=1)  # calibrated (temperature T)"
    name = repo_id or "ORG/NAME"
    return [
        "## How to use\n",
        "```python",
        "import timm, torch",
        "from PIL import Image",
        "",
        f'model = timm.create_model("hf-hub:{name}", pretrained=True).eval()  # or "local-dir:FOLDER"',
        "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)",
        "with torch.no_grad():",
        '    logits = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))',
        decide,
        'labels = model.pretrained_cfg["label_names"]',
        "```",
        "",
        f"Preprocessing (`preprocessing.json` holds it exactly, with the temperature and the decision rule): "
        f"resize the shorter side to {resize} px ({dc['interpolation']}), center-crop "
        f"{dc['input_size'][-1]}x{dc['input_size'][-2]}, RGB / 255, then (x - mean) / std with mean "
        f"{_numbers(dc['mean'])} and std {_numbers(dc['std'])}. Training and validation resized with OpenCV's "
        f"{dc['interpolation']} interpolation, which does not antialias; timm's eval transform "
        f"resizes with PIL, which antialiases: on images much larger than {resize} px the pixels differ, enough to "
        f"change some answers near the decision boundary. To reproduce the validation numbers, resize as training "
        f"did.\n",
        'The training checkpoint (not in this folder) loads with `finetune.load("best.ckpt")`, which '
        "`finetune predict` and `finetune evaluate` use.\n",
    ]


def _numbers(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
