"""Tables: plain text for the console (data counts, layer groups, metrics, sweeps), and small
self-contained HTML ones (escaped, inline style, no JavaScript) for a notebook cell."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape


def format_table(header: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """Columns padded to their widest cell; `align` has one char per column: l or r."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    align = align or "l" * len(header)

    def line(cells):
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line([str(h) for h in header]), line(["-" * w for w in widths])] + [line(r) for r in rows])


STYLE = "border-collapse:collapse;font-family:monospace;font-size:12px;margin:4px 0"
CELL = "padding:2px 8px;text-align:right;border-bottom:1px solid #ddd"


class HTML(str):
    """A cell that is already HTML (an inline image built here), put in a table as it is."""


def _cell(value) -> str:
    return value if isinstance(value, HTML) else escape(str(value))


def html_table(columns: Sequence[str], rows: Iterable[Sequence], caption: str | None = None) -> str:
    """One ``<table>`` of `rows` under `columns`, every cell escaped but :class:`HTML` ones."""
    head = "".join(f'<th style="{CELL}">{escape(str(c))}</th>' for c in columns)
    body = "".join("<tr>" + "".join(f'<td style="{CELL}">{_cell(c)}</td>' for c in row) + "</tr>" for row in rows)
    title = f'<caption style="text-align:left">{escape(caption)}</caption>' if caption else ""
    return f'<table style="{STYLE}">{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def pairs_table(pairs: Iterable[tuple[str, object]], caption: str | None = None) -> str:
    """A two-column table of (name, value) pairs, names left-aligned."""
    rows = "".join(
        f'<tr><th style="{CELL};text-align:left">{escape(str(k))}</th><td style="{CELL};text-align:left">'
        f"{escape(str(v))}</td></tr>"
        for k, v in pairs
    )
    title = f'<caption style="text-align:left"><b>{escape(caption)}</b></caption>' if caption else ""
    return f'<table style="{STYLE}">{title}{rows}</table>'
