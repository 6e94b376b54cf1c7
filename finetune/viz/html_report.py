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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from finetune.viz.html_parts import (
    anchor,
    config_part,
    data_part,
    escape,
    groups_part,
    headline_text,
    metrics_part,
    pictures_part,
)

PAGE = "index.html"
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
    shown = list(pictures) + [
        _Extra(p.stem, p, EXTRA_PICTURES[p.stem])
        for p in sorted(out_dir.glob("*.png"))
        if p.stem in EXTRA_PICTURES and p.name not in {Path(q.path).name for q in pictures}
    ]
    sections = [
        ("metrics", "Metrics", metrics_part(summary, config, summary_path)),
        ("data", "Data", data_part(summary, summary_path)),
        ("groups", "Layer groups", groups_part(model, group_lrs)),
        ("pictures", "Pictures", pictures_part(shown, out_dir)),
        ("config", "Config", config_part(config)),
    ]
    boxes = [
        f'<section id="{key}">\n<h2>{escape(title)}</h2>\n{content}\n</section>' for key, title, content in sections
    ]
    # Metrics beside the data report and the layer groups; pictures and config below, full width.
    body = f'<div class="top">\n<div>{boxes[0]}</div>\n<div>{boxes[1]}\n{boxes[2]}</div>\n</div>\n' + "\n".join(
        boxes[3:]
    )
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>finetune report: {escape(run)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
        f"{_header(run, sections, shown, summary, config)}\n{body}\n"
        f'<p class="sub">Written by finetune into {escape(str(out_dir.resolve()))}; the pictures are the PNG files '
        f"beside this page (index.md lists them too).</p>\n</main>\n</body>\n</html>\n"
    )
    path = out_dir / PAGE
    path.write_text(page, encoding="utf-8")
    return path


def _header(run: str, sections: list, shown: list, summary: Mapping | None, config: Mapping | None) -> str:
    """The page's title, its subtitle (backbone, classes, headline) and the links to its parts."""
    backbone = (config or {}).get("backbone")
    backbone = backbone.get("name") if isinstance(backbone, Mapping) else None
    nav = "<b>Sections</b> " + " ".join(f'<a href="#{key}">{escape(title)}</a>' for key, title, _ in sections)
    if shown:
        nav += "<br>\n<b>Pictures</b> " + " ".join(
            f'<a href="#picture-{anchor(p.name)}">{escape(p.name)}</a>' for p in shown
        )
    subtitle = " · ".join(
        escape(part)
        for part in [
            f"backbone {backbone}" if backbone else "",
            f"{len(summary['classes'])} classes" if summary and summary.get("classes") else "",
            headline_text(summary),
        ]
        if part
    )
    return f'<header>\n<h1>Run report: {escape(run)}</h1>\n<p class="sub">{subtitle}</p>\n<nav>{nav}</nav>\n</header>'


class _Extra(NamedTuple):
    name: str
    path: Path
    caption: str
