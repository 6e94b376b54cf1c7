"""What a loaded model and its predictions look like as a notebook cell's result (``_repr_html_``):
small self-contained HTML tables (:func:`finetune.tables.html_table`)."""

from __future__ import annotations

from collections.abc import Sequence

from finetune.tables import html_table, pairs_table


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


def predictions_html(predictions: Sequence, limit: int = 50) -> str:
    """Predictions (:class:`Prediction` or :class:`LabelSet`) as one table, one row per image."""
    rows = []
    for p in list(predictions)[:limit]:
        if hasattr(p, "top_k"):
            others = ", ".join(f"{c} {v:.2f}" for c, v in p.top_k[1:])
            chosen = ", ".join(c for c, _ in p.prediction_set) if p.prediction_set is not None else ""
            rows.append((p.source, p.label, f"{p.probability:.3f}", others, chosen))
        else:
            rows.append((p.source, ", ".join(f"{c} {v:.2f}" for c, v in p.labels) or "(none)", "", "", ""))
    columns = ["image", "label", "probability", "next", "prediction set"]
    more = f"{len(predictions)} predictions" + (f", the first {limit} shown" if len(predictions) > limit else "")
    return html_table(columns, rows, more)


class Predictions(list):
    """The list :meth:`FinetunedModel.predict` returns, shown as a table in a notebook."""

    def _repr_html_(self) -> str:
        return predictions_html(self)
