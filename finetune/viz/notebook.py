"""A run in a notebook: its live panel, its result as HTML, and the pictures a person asks for
(``result.show_batch()``, ``show_mistakes(k)``, ``show_confusion()``, ``show_curves()``).

Every picture is drawn by :mod:`finetune.viz.pictures`, the same functions that write the run's
``viz/*.png`` files; here they draw into a temporary file whose bytes a :class:`Shown` carries
(``_repr_png_``, ``_repr_html_``: an inline PNG, no JavaScript).
"""

from __future__ import annotations

import base64
import random
import tempfile
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path

import numpy as np
import torch

from finetune.errors import ConfigError
from finetune.tables import html_table, pairs_table
from finetune.use.metrics import classification_report
from finetune.viz import pictures

IMG = 'style="max-width:100%;display:block;margin:4px 0"'


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class Shown:
    """A picture for a notebook cell: PNG bytes with a caption; ``save(path)`` writes the file."""

    def __init__(self, png: bytes, caption: str = ""):
        self.png, self.caption = png, caption

    def _repr_png_(self) -> bytes:
        return self.png

    def _repr_html_(self) -> str:
        caption = f'<div style="font-size:12px;color:#555">{escape(self.caption)}</div>' if self.caption else ""
        return f'<div><img src="{data_uri(self.png)}" {IMG}/>{caption}</div>'

    def save(self, path: str | Path) -> Path:
        Path(path).write_bytes(self.png)
        return Path(path)

    def __repr__(self) -> str:
        return f"Shown({self.caption!r}, {len(self.png)} bytes of PNG)"


def drawn(draw: Callable[[Path], Path | None], caption: str = "") -> Shown | None:
    """`draw(path)` (a :mod:`finetune.viz.pictures` function) run into a temporary file, as a
    :class:`Shown`; None when it drew nothing."""
    with tempfile.TemporaryDirectory(prefix="finetune-picture-") as tmp:
        path = draw(Path(tmp) / "picture.png")
        return Shown(path.read_bytes(), caption) if path is not None else None


def epoch_panel(
    setup: Sequence[str],
    columns: Sequence[str],
    rows: Sequence[Sequence],
    after: Sequence[str],
    progress: tuple[str, int, int] | None = None,
) -> str:
    """A run's live panel: the start tables folded away, the table of epochs, a bar within the
    epoch (`progress`: what, done, of; an HTML ``<progress>``), what came after."""
    parts = ['<div class="finetune-run">']
    if setup:
        first = escape(next((line for line in setup if line.strip()), "setup"))
        parts.append(
            f"<details><summary>{first} ... ({len(setup)} lines: data, backbone, layer groups)</summary>"
            f'<pre style="font-size:11px">{escape(chr(10).join(setup))}</pre></details>'
        )
    if columns:
        parts.append(html_table(columns, rows))
    if progress is not None:
        what, done, total = progress
        bar = f'<progress value="{done}" max="{max(total, done)}" style="width:300px"></progress>' if total else ""
        parts.append(
            f'<div style="font-family:monospace;font-size:12px">{bar} {escape(what)}: batch {done}/{total or "?"}</div>'
        )
    if after:
        parts.append(f'<pre style="font-size:11px;margin:4px 0">{escape(chr(10).join(after))}</pre>')
    return "".join(parts) + "</div>"


def picture_of(path: Path | None, caption: str = "") -> Shown | None:
    """The PNG a run wrote at `path`, if it did."""
    return Shown(path.read_bytes(), caption) if path is not None and path.is_file() else None


def result_html(result) -> str:
    """A :class:`~finetune.train.result.FitResult`: the headline and best epoch, the best epoch's
    metrics, the learning curves and the confusion matrix (multi-label: the average precision per
    label) as inline PNGs, and where the outputs went."""
    m = result.metrics
    best = int(m["epoch"]) if "epoch" in m else "?"
    value = m.get(result.headline)
    head = f"{result.headline}={value:.4f}" if value is not None else f"{result.headline}: n/a"
    parts = [
        f'<div class="finetune-result"><b>FitResult</b>: {escape(head)}, best epoch {best} of {len(result.history)}'
    ]
    shown = [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in m.items() if "/" in k and "_tta" not in k]
    parts.append(pairs_table(shown[:16], "metrics of the best epoch"))
    pictures_dir = result.output_dir / "viz"
    curves = picture_of(pictures_dir / "curves.png") or result.show_curves()
    for picture, title in (
        (curves, "learning curves"),
        (picture_of(pictures_dir / "confusion.png"), "confusion matrix"),
        (picture_of(pictures_dir / "average_precision.png"), "average precision per label"),  # multi-label
    ):
        if picture is not None:
            parts.append(f"<div><b>{title}</b>{picture._repr_html_()}</div>")
    parts.append(pairs_table(((k, str(v)) for k, v in result.outputs.items()), "outputs"))
    return "".join(parts) + "</div>"


def evaluate(model, samples: Sequence, batch_size: int = 32, max_images: int = 500, seed: int = 0):
    """(display images uint8 NxHxWx3, labels, logits) of a :class:`FinetunedModel` on up to
    `max_images` of `samples` (the same pass as the run's pictures)."""
    from finetune.viz.report import _evaluate

    if len(samples) > max_images:
        samples = random.Random(seed).sample(list(samples), max_images)
    images, labels, logits, _, _ = _evaluate(model.model, samples, model.transform, model.data_config, [], batch_size)
    return images, labels, logits


def _multiclass_only(model, what: str) -> None:
    if model.task == "multilabel":
        raise ConfigError(f"{what} is for multi-class runs; a multi-label run's pictures are in its viz/ folder.")


def confusion(model, samples: Sequence, batch_size: int = 32) -> Shown:
    """The confusion matrix of `model` on `samples` (counts, and normalized by true class)."""
    _multiclass_only(model, "show_confusion()")
    _, labels, logits = evaluate(model, samples, batch_size)
    report = classification_report(logits, labels, list(model.classes))
    return drawn(
        lambda path: pictures.confusion(report, path), f"confusion matrix on {report['images']} validation images"
    )


class Note:
    """A line of text for a notebook cell (where a picture has nothing to show)."""

    def __init__(self, text: str):
        self.text = text

    def _repr_html_(self) -> str:
        return f"<p><i>{escape(self.text)}</i></p>"

    def __repr__(self) -> str:
        return self.text


def mistakes(model, samples: Sequence, count: int = 16, batch_size: int = 32) -> Shown | Note:
    """The `count` most confident mistakes of `model` on `samples` (a :class:`Note` when it makes none)."""
    _multiclass_only(model, "show_mistakes()")
    images, labels, logits = evaluate(model, samples, batch_size)
    probabilities = (logits / model.temperature).softmax(1)
    shown = drawn(
        lambda path: pictures.mistakes(images, labels, probabilities, model.classes, path, count),
        "the most confident mistakes on the validation split",
    )
    return shown or Note(f"no mistakes on {len(labels)} validation images")


def batch(samples: Sequence, transform, classes: Sequence[str], count: int = 16, seed: int = 0) -> Shown:
    """`count` training images through the training pipeline `transform` (uint8, not normalized:
    what the network sees before its input is normalized), labelled."""
    from finetune.data.datamodule import ImageDataset, Unreadable

    chosen = random.Random(seed).sample(list(samples), min(count, len(samples)))
    dataset = ImageDataset(chosen, transform)
    images, captions = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, Unreadable):
            continue
        image, label = item[0], item[1]
        image = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        images.append(image.astype(np.uint8))
        names = [classes[j] for j in label] if isinstance(label, (tuple, list)) else [classes[int(label)]]
        captions.append(", ".join(names) or "(none)")
    return drawn(
        lambda path: pictures.batch(np.stack(images), captions, path), "training images as the network sees them"
    )
