"""``viz/index.html``: a run's report as one page that a browser opens from disk (``file://``).

Contract. The page needs nothing but the folder it lies in: pictures are linked by their file
names (the PNGs beside it), the style is inline, there is no script, no web font and no link to
any other host. Every text that comes from a run (class names, captions, file paths, config
values) is escaped with :func:`html.escape`. Its parts, in order (the first three side by side
on a laptop's screen):

- metrics: the best epoch's, from ``summary.json``, with the number of validation images;
- data: ``summary.json["data"]`` (:meth:`finetune.data.check.DataReport.to_dict`): images per
  class and split, image sizes, skipped files, duplicates, warnings;
- layer groups: the table a run prints at its start (:func:`finetune.model.summary.groups_table`);
- pictures: those ``index.md`` lists, with the same captions (and the lr finder's curve when
  ``optimizer.lr=auto`` drew one);
- config: the resolved config, as YAML.

A part whose source is missing (``finetune viz`` on a checkpoint without ``summary.json`` beside
its folder; a model without layer groups) says what is missing instead of failing. The page is
written with ``index.md`` (:func:`finetune.viz.report.write_pictures`) and written again by a
training run once ``summary.json`` exists (:func:`finetune.train.report.write_page`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from finetune.data.check import COUNTED, split_images
from finetune.data.labels import describe_cardinality

PAGE = "index.html"
HALF = ' class="half"'
# Pictures a run may leave in viz/ that index.md does not list: file stem -> caption.
EXTRA_PICTURES = {
    "lr_find": "The lr finder (optimizer.lr=auto): the training loss while the lr grows over a short sweep; the run "
    "trains with a tenth of the lr of the lowest loss (the red dot)."
}

STYLE = """
body{margin:0;background:#f5f6f8;color:#1f2630;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
main{max-width:1100px;margin:0 auto;padding:.5rem 1.5rem 3rem}
header{padding:1rem 0 .25rem}
h1{font-size:1.6rem;margin:.2rem 0}
h2{font-size:1.3rem;margin:.6rem 0 .6rem;padding-bottom:.25rem;border-bottom:1px solid #e3e6ea}
h3{font-size:1.05rem;margin:1.4rem 0 .2rem}
.sub{color:#56606c;margin:.1rem 0}
nav{margin:.5rem 0;line-height:1.8}
nav b{margin-right:.6rem;color:#56606c;font-weight:600}
nav a{margin-right:.8rem;color:#1a5fb4;text-decoration:none;white-space:nowrap}
nav a:hover{text-decoration:underline}
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:.4rem 1.25rem 1rem;margin:1rem 0;min-width:0}
.top{display:grid;grid-template-columns:repeat(auto-fit,minmax(24rem,1fr));gap:0 1rem;align-items:start}
.top>div{min-width:0}
.figures{display:flex;flex-wrap:wrap;gap:0 1.5rem;align-items:flex-start}
.figures figure{flex:1 1 100%;min-width:0}
.figures figure.half{flex:0 1 calc(50% - .75rem)}
@media (max-width:800px){.figures figure.half{flex-basis:100%}}
pre.config{columns:2 26rem;column-gap:2rem;white-space:pre-wrap;overflow-wrap:anywhere}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:.4rem 0}
th,td{padding:.2rem .8rem;border-bottom:1px solid #eceef1;text-align:left;vertical-align:top}
th{background:#f3f5f7;font-weight:600}
.n{text-align:right}
tr.headline td{font-weight:700;background:#e9f5ea}
tr.total td{font-weight:600;border-top:2px solid #d5d9de}
figure{margin:0 0 1.2rem}
figcaption{color:#3d4652;margin:0 0 .4rem}
img{max-width:100%;height:auto;border:1px solid #e3e6ea;border-radius:4px}
pre{background:#f3f5f7;border-radius:6px;padding:.7rem .9rem;overflow:auto;
font:13px/1.45 ui-monospace,Menlo,Consolas,monospace}
.missing{background:#fff6db;border-left:4px solid #e0a800;padding:.45rem .8rem;margin:.5rem 0}
.warn{color:#9b2212}
ul.facts{padding-left:1.2rem;margin:.4rem 0}
details{margin:.4rem 0}
summary{cursor:pointer;color:#1a5fb4}
code{font:13px ui-monospace,Menlo,Consolas,monospace}
"""


def write_page(
    out_dir: Path,
    pictures: Sequence = (),
    model=None,
    summary: Mapping | None = None,
    config: Mapping | None = None,
    group_lrs: Mapping | None = None,
    summary_path: Path | None = None,
) -> Path:
    """Write ``out_dir/index.html`` and return its path. `pictures`: objects with ``name``,
    ``path`` (a file in `out_dir`) and ``caption`` (:class:`finetune.viz.report.Picture`);
    `model`: the Classifier whose layer groups are listed, with the lrs of `group_lrs` (None:
    not known here, shown as ``-``); `summary`: ``summary.json`` as a dict (None: missing, looked
    for at `summary_path`); `config`: the resolved config."""
    out_dir = Path(out_dir)
    summary = summary if isinstance(summary, Mapping) else None
    config = config if isinstance(config, Mapping) else None
    run = out_dir.resolve().parent.name if out_dir.name == "viz" else out_dir.resolve().name
    backbone = (config or {}).get("backbone")
    backbone = backbone.get("name") if isinstance(backbone, Mapping) else None
    shown = list(pictures) + [
        _Extra(p.stem, p, EXTRA_PICTURES[p.stem])
        for p in sorted(out_dir.glob("*.png"))
        if p.stem in EXTRA_PICTURES and p.name not in {Path(q.path).name for q in pictures}
    ]
    sections = [
        ("metrics", "Metrics", _metrics(summary, config, summary_path)),
        ("data", "Data", _data(summary, summary_path)),
        ("groups", "Layer groups", _groups(model, group_lrs)),
        ("pictures", "Pictures", _pictures(shown, out_dir)),
        ("config", "Config", _config(config)),
    ]
    nav = "<b>Sections</b> " + " ".join(f'<a href="#{key}">{_e(title)}</a>' for key, title, _ in sections)
    if shown:
        nav += "<br>\n<b>Pictures</b> " + " ".join(
            f'<a href="#picture-{_anchor(p.name)}">{_e(p.name)}</a>' for p in shown
        )
    subtitle = " · ".join(
        _e(part)
        for part in [
            f"backbone {backbone}" if backbone else "",
            f"{len(summary['classes'])} classes" if summary and summary.get("classes") else "",
            _headline_text(summary),
        ]
        if part
    )
    boxes = [f'<section id="{key}">\n<h2>{_e(title)}</h2>\n{content}\n</section>' for key, title, content in sections]
    # Metrics beside the data report and the layer groups; pictures and config below, full width.
    body = f'<div class="top">\n<div>{boxes[0]}</div>\n<div>{boxes[1]}\n{boxes[2]}</div>\n</div>\n' + "\n".join(
        boxes[3:]
    )
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>finetune report: {_e(run)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
        f'<header>\n<h1>Run report: {_e(run)}</h1>\n<p class="sub">{subtitle}</p>\n'
        f"<nav>{nav}</nav>\n</header>\n{body}\n"
        f'<p class="sub">Written by finetune into {_e(str(out_dir.resolve()))}; the pictures are the PNG files '
        f"beside this page (index.md lists them too).</p>\n</main>\n</body>\n</html>\n"
    )
    path = out_dir / PAGE
    path.write_text(page, encoding="utf-8")
    return path


class _Extra(NamedTuple):
    name: str
    path: Path
    caption: str


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _anchor(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in str(name))


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


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


def _headline_text(summary: Mapping | None) -> str:
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
        return "".join(f"<{tag}{numeric_mark if n else ''}>{_e(c)}</{tag}>" for c, n in zip(row, numeric))

    numeric_mark = ' class="n"'
    marks = [f' class="{_e(c)}"' if c else "" for c in row_classes] + [""] * len(rows)
    body = "".join(f"<tr{marks[i]}>{cells('td', row)}</tr>\n" for i, row in enumerate(rows))
    opening = f'<table id="{table_id}">' if table_id else "<table>"
    return f"{opening}\n<thead><tr>{cells('th', header)}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _no_summary(summary_path: Path | None, what: str) -> str:
    where = f" (looked for {summary_path})" if summary_path else ""
    return _missing(
        f"Not available: no summary.json{where}, so there is no {what} here. A training run writes "
        f"RUN/summary.json when it ends; finetune viz reads it for a checkpoint in RUN/checkpoints/."
    )


def _metrics(summary: Mapping | None, config: Mapping | None, summary_path: Path | None) -> str:
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
        f"<p>{_e('; '.join(facts))}.</p>",
        _table(
            ["metric", "value"],
            [[k, _number(metrics[k])] for k in keys],
            [False, True],
            ["headline" if k == headline else "" for k in keys],
            "metrics-table",
        ),
    ]
    if summary.get("best_checkpoint"):
        parts.append(f'<p class="sub">best checkpoint: <code>{_e(summary["best_checkpoint"])}</code></p>')
    thresholds = (summary.get("multilabel") or {}).get("thresholds")
    if isinstance(thresholds, Mapping) and thresholds:
        parts.append("<h3>Decision thresholds per label (tuned on the validation split)</h3>")
        parts.append(_table(["label", "threshold"], [[k, _number(v)] for k, v in thresholds.items()], [False, True]))
    return "\n".join(parts)


def _pictures(pictures: Sequence, out_dir: Path) -> str:
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
            f'<figure id="picture-{_anchor(picture.name)}"{HALF if half else ""}>\n'
            f"<h3>{_e(picture.name)}</h3>\n"
            f"<figcaption>{_e(picture.caption)}</figcaption>\n"
            f'<img src="{_e(quote(link))}" alt="{_e(picture.name)}">\n</figure>'
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


def _data(summary: Mapping | None, summary_path: Path | None) -> str:
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
        f"<p>{_e(data.get('description', ''))}</p>",
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
    parts.append('<ul class="facts">' + "".join(f"<li>{_e(f)}</li>" for f in facts) + "</ul>")
    parts += [f'<p class="warn">warning: {_e(w)}</p>' for w in data.get("warnings") or []]
    for key, header, title in (
        ("skipped", ["file", "reason"], "Skipped files"),
        ("duplicates", ["training image", "val/test image"], "Duplicates across splits"),
        ("conflicts", ["training image", "same file, other class"], "Label conflicts"),
    ):
        listed = [list(row) if isinstance(row, (list, tuple)) else [row, ""] for row in data.get(key) or []]
        if listed:
            more = f" (first 200 of {len(listed)}; all in summary.json)" if len(listed) > 200 else ""
            parts.append(
                f"<details{' open' if len(listed) <= 10 else ''}><summary>{_e(title)}: "
                f"{len(listed)}{_e(more)}</summary>\n{_table(header, listed[:200], [False, False])}</details>"
            )
    if data.get("near_blank"):
        parts.append(
            f"<details><summary>Near-blank images: {len(data['near_blank'])}</summary><ul>"
            + "".join(f"<li>{_e(n)}</li>" for n in data["near_blank"])
            + "</ul></details>"
        )
    return "\n".join(parts)


def _groups(model, group_lrs: Mapping | None) -> str:
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
    table = _e(groups_table(model, dict(group_lrs or {})))
    return (
        "<p>The table the run prints at its start: parameters, trainable or frozen, lr and BatchNorm mode "
        f'of each layer group.</p>\n<pre id="groups-table">{table}</pre>{note}'
    )


def _config(config: Mapping | None) -> str:
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
        f'<pre id="config-yaml" class="config">{_e(text)}</pre>'
    )
