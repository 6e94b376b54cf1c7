"""The parts of ``viz/index.html`` (:mod:`finetune.viz.html_report`), each as an HTML fragment:
metrics, data report, layer groups, pictures and config; a part whose source is missing says so.
Every text that comes from a run is escaped here."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from finetune.data.check import COUNTED, split_images
from finetune.data.labels import describe_cardinality

HALF = ' class="half"'


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def anchor(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in str(name))


def _missing(text: str) -> str:
    return f'<p class="missing">{escape(text)}</p>'


def _number(value) -> str:
    """Integers as they are; a score with 4 decimals (as the closing block prints it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 1e4 else str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.3g}"


def _headline(metrics: Mapping) -> str:
    return "val/map" if "val/map" in metrics else "val/acc"


def headline_text(summary: Mapping | None) -> str:
    metrics = (summary or {}).get("metrics") or {}
    key = _headline(metrics)
    if key not in metrics:
        return ""
    images = split_images(summary.get("data") or {}, "val")
    return f"{key} {_number(metrics[key])}" + (f" on {images} validation images" if images is not None else "")


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence],
    numeric: Sequence[bool],
    row_classes: Sequence[str] = (),
    table_id: str = "",
) -> str:
    def cells(tag, row):
        return "".join(f"<{tag}{numeric_mark if n else ''}>{escape(c)}</{tag}>" for c, n in zip(row, numeric))

    numeric_mark = ' class="n"'
    marks = [f' class="{escape(c)}"' if c else "" for c in row_classes] + [""] * len(rows)
    body = "".join(f"<tr{marks[i]}>{cells('td', row)}</tr>\n" for i, row in enumerate(rows))
    opening = f'<table id="{table_id}">' if table_id else "<table>"
    return f"{opening}\n<thead><tr>{cells('th', header)}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _no_summary(summary_path: Path | None, what: str) -> str:
    where = f" (looked for {summary_path})" if summary_path else ""
    return _missing(
        f"Not available: no summary.json{where}, so there is no {what} here. A training run writes "
        f"RUN/summary.json when it ends; finetune viz reads it for a checkpoint in RUN/checkpoints/."
    )


def metrics_part(summary: Mapping | None, config: Mapping | None, summary_path: Path | None) -> str:
    metrics = (summary or {}).get("metrics")
    if not metrics:
        return _no_summary(summary_path, "metrics") if summary is None else _missing("summary.json holds no metrics.")
    headline = _headline(metrics)
    splits = ("val/", "test/", "train/")
    keys = [k for k in metrics if k != "epoch"]
    keys.sort(
        key=lambda k: (
            k != headline,
            next((i for i, s in enumerate(splits) if k.startswith(s)), len(splits)),
            k.startswith("lr/"),
        )
    )
    monitor = ((config or {}).get("callbacks") or {}).get("checkpoint", {}).get("monitor") or headline
    epochs = len(summary.get("history") or [])
    epoch = f"{_number(metrics['epoch'])} of {epochs}" if "epoch" in metrics else "?"
    images = split_images(summary.get("data") or {}, "val")
    facts = [
        f"Best epoch {epoch} (chosen by {monitor})",
        f"validation: {images} images" if images is not None else "validation size: not recorded",
        *([f"wall time {summary['seconds']:g} s"] if isinstance(summary.get("seconds"), (int, float)) else []),
    ]
    parts = [
        f"<p>{escape('; '.join(facts))}.</p>",
        _table(
            ["metric", "value"],
            [[k, _number(metrics[k])] for k in keys],
            [False, True],
            ["headline" if k == headline else "" for k in keys],
            "metrics-table",
        ),
    ]
    if summary.get("best_checkpoint"):
        parts.append(f'<p class="sub">best checkpoint: <code>{escape(summary["best_checkpoint"])}</code></p>')
    thresholds = (summary.get("multilabel") or {}).get("thresholds")
    if isinstance(thresholds, Mapping) and thresholds:
        parts.append("<h3>Decision thresholds per label (tuned on the validation split)</h3>")
        parts.append(_table(["label", "threshold"], [[k, _number(v)] for k, v in thresholds.items()], [False, True]))
    return "\n".join(parts)


def pictures_part(pictures: Sequence, out_dir: Path) -> str:
    if not pictures:
        return _missing("No pictures were drawn into this folder.")
    figures = []
    for picture in pictures:
        path = Path(picture.path)
        half = 0 < _width(path) <= 640  # two narrow pictures side by side
        try:
            link = path.resolve().relative_to(out_dir.resolve()).as_posix()
        except ValueError:
            link = path.name  # every picture is written into out_dir
        figures.append(
            f'<figure id="picture-{anchor(picture.name)}"{HALF if half else ""}>\n'
            f"<h3>{escape(picture.name)}</h3>\n"
            f"<figcaption>{escape(picture.caption)}</figcaption>\n"
            f'<img src="{escape(quote(link))}" alt="{escape(picture.name)}">\n</figure>'
        )
    return '<div class="figures">\n' + "\n".join(figures) + "\n</div>"


def _width(path: Path) -> int:
    """A PNG's width in pixels from its header (0 when unreadable)."""
    try:
        with path.open("rb") as f:
            head = f.read(24)
    except OSError:
        return 0
    return int.from_bytes(head[16:20], "big") if head[:8] == b"\x89PNG\r\n\x1a\n" else 0


def data_part(summary: Mapping | None, summary_path: Path | None) -> str:
    data = (summary or {}).get("data")
    if not data:
        return (
            _no_summary(summary_path, "data report")
            if summary is None
            else _missing("summary.json holds no data report.")
        )
    classes = list(data.get("classes") or (summary or {}).get("classes") or [])
    counts = data.get("counts") or {}
    splits = [s for s in COUNTED if sum((counts.get(s) or {}).values())]
    rows = [[c, *((counts[s] or {}).get(c, 0) for s in splits)] for c in classes]
    rows.append(["total", *(split_images(data, s) for s in splits)])
    parts = [
        f"<p>{escape(data.get('description', ''))}</p>",
        _table(
            ["class", *splits], rows, [False, *[True] * len(splits)], [""] * len(classes) + ["total"], "counts-table"
        ),
    ]
    facts = []
    if data.get("size_range"):
        w0, h0, w1, h1 = data["size_range"]
        facts.append(f"image sizes: {w0}×{h0} (smallest) to {w1}×{h1} (largest)")
    for key, label in (
        ("skipped", "skipped files (unreadable or not images)"),
        ("duplicates", "images of val/test identical to a training image"),
        ("conflicts", "identical training images under different classes"),
        ("near_blank", "near-blank images"),
    ):
        facts.append(f"{label}: {len(data.get(key) or [])}")
    for split, table in (data.get("cardinality") or {}).items():  # JSON made the label counts strings
        counts = dict(sorted((int(k), n) for k, n in table.items()))
        facts.append(f"labels per image ({split}): {describe_cardinality(counts)}")
    parts.append('<ul class="facts">' + "".join(f"<li>{escape(f)}</li>" for f in facts) + "</ul>")
    parts += [f'<p class="warn">warning: {escape(w)}</p>' for w in data.get("warnings") or []]
    for key, header, title in (
        ("skipped", ["file", "reason"], "Skipped files"),
        ("duplicates", ["training image", "val/test image"], "Duplicates across splits"),
        ("conflicts", ["training image", "same file, other class"], "Label conflicts"),
    ):
        listed = [list(row) if isinstance(row, (list, tuple)) else [row, ""] for row in data.get(key) or []]
        if listed:
            more = f" (first 200 of {len(listed)}; all in summary.json)" if len(listed) > 200 else ""
            parts.append(
                f"<details{' open' if len(listed) <= 10 else ''}><summary>{escape(title)}: "
                f"{len(listed)}{escape(more)}</summary>\n{_table(header, listed[:200], [False, False])}</details>"
            )
    if data.get("near_blank"):
        parts.append(
            f"<details><summary>Near-blank images: {len(data['near_blank'])}</summary><ul>"
            + "".join(f"<li>{escape(n)}</li>" for n in data["near_blank"])
            + "</ul></details>"
        )
    return "\n".join(parts)


def groups_part(model, group_lrs: Mapping | None) -> str:
    if model is None or not hasattr(model, "groups") or not hasattr(model, "freeze_plan"):
        return _missing("Not available: the model has no layer groups.")
    from finetune.model.summary import groups_table

    note = (
        ""
        if group_lrs is not None
        else _missing(
            "Learning rates (lr) are not known from a checkpoint alone: shown as -. The training run's own report "
            "(RUN/viz/index.html) lists them."
        )
    )
    table = escape(groups_table(model, dict(group_lrs or {})))
    return (
        "<p>The table the run prints at its start: parameters, trainable or frozen, lr and BatchNorm mode "
        f'of each layer group.</p>\n<pre id="groups-table">{table}</pre>{note}'
    )


def config_part(config: Mapping | None) -> str:
    if not config:
        return _missing("Not available: no config was given to this page.")
    try:
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(OmegaConf.create(dict(config)))
    except Exception:  # a value OmegaConf cannot hold: the page still shows the rest
        import json

        text = json.dumps(config, indent=2, default=str)
    return (
        "<p>The resolved config of the run (what its checkpoints carry).</p>\n"
        f'<pre id="config-yaml" class="config">{escape(text)}</pre>'
    )
