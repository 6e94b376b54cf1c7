"""What a loaded model and its predictions look like as a notebook cell's result (``_repr_html_``):
small self-contained HTML tables (:func:`finetune.tables.html_table`)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from finetune.tables import HTML, html_table, pairs_table

THUMBNAIL = 64  # px, longest side of a prediction's picture in a notebook table


def model_html(model) -> str:
    """A :class:`~finetune.use.load.FinetunedModel`: backbone, task, classes, input, trust."""
    config = model.config
    height, width = model.data_config["input_size"][1:]
    pairs = [
        ("backbone", config["backbone"]["name"]),
        ("task", model.task),
        (
            "classes",
            f"{len(model.classes)}: " + ", ".join(model.classes[:20]) + (" ..." if len(model.classes) > 20 else ""),
        ),
        ("input", f"{height}x{width}, mean {tuple(round(m, 3) for m in model.data_config['mean'])}"),
    ]
    if model.task == "multilabel":
        pairs.append(("thresholds", ", ".join(f"{c} {t:.2f}" for c, t in zip(model.classes, model.thresholds))))
    else:
        pairs.append(("temperature", f"{model.temperature:.3f}"))
    return pairs_table(pairs, "FinetunedModel")


def thumbnail(image, size: int = THUMBNAIL) -> HTML | str:
    """An inline JPEG of `image` (a path, an HxWx3 uint8 array or a PIL image) at most `size` px
    on its longest side; "" when it cannot be read (the row still shows its name)."""
    from PIL import Image

    from finetune.data.images import UnreadableImage, load_rgb

    try:
        if isinstance(image, (str, Path)):
            picture = Image.fromarray(load_rgb(image))
        elif isinstance(image, np.ndarray):
            picture = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
        else:
            picture = image.convert("RGB")
    except (UnreadableImage, OSError, ValueError, TypeError, AttributeError):
        return ""
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=80)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return HTML(f'<img src="data:image/jpeg;base64,{data}" style="max-height:{size}px"/>')


def predictions_html(predictions: Sequence, limit: int = 50, inputs: Sequence | None = None) -> str:
    """Predictions (:class:`Prediction` or :class:`LabelSet`) as one table, one row per image, each
    with a thumbnail of its input (`inputs`: what was predicted on, in order; default: the
    predictions' sources, which are paths when paths were given)."""
    rows = []
    inputs = list(inputs) if inputs is not None else [p.source for p in predictions[:limit]]
    for p, image in zip(list(predictions)[:limit], inputs):
        picture = thumbnail(image)
        if hasattr(p, "top_k"):
            others = ", ".join(f"{c} {v:.2f}" for c, v in p.top_k[1:])
            chosen = ", ".join(c for c, _ in p.prediction_set) if p.prediction_set is not None else ""
            rows.append((picture, p.source, p.label, f"{p.probability:.3f}", others, chosen))
        else:
            labels = ", ".join(f"{c} {v:.2f}" for c, v in p.labels) or "(none)"
            rows.append((picture, p.source, labels, "", "", ""))
    columns = ["", "image", "label", "probability", "next", "prediction set"]
    more = f"{len(predictions)} predictions" + (f", the first {limit} shown" if len(predictions) > limit else "")
    return html_table(columns, rows, more)


class Predictions(list):
    """The list :meth:`FinetunedModel.predict` returns, shown as a table in a notebook with a
    thumbnail of each image (`inputs`: the images predicted on, when given)."""

    inputs: Sequence | None = None

    def _repr_html_(self) -> str:
        return predictions_html(self, inputs=self.inputs)
