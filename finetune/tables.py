"""Plain-text tables for the console: data counts, layer groups, metrics, sweeps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def format_table(header: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """Columns padded to their widest cell; `align` has one char per column: l or r."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    align = align or "l" * len(header)

    def line(cells):
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line([str(h) for h in header]), line(["-" * w for w in widths])] + [line(r) for r in rows])
