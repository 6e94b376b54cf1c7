"""Multi-label targets: label cells -> label sets, multi-hot vectors, and the facts about label sets
that the data check reports.

A multi-label sample's label is a sorted tuple of class indices (possibly empty: "no label
applies" is a real answer). Tuples compare, hash and serialize; the multi-hot float vector a
loss needs is made at loading time by :func:`multi_hot`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from finetune.errors import DataError

TASKS = ("multiclass", "multilabel")
# Separators a label cell may use, in the order auto-detection prefers them.
SEPARATORS = (" ", "|", ";", ",")
TRUE_VALUES, FALSE_VALUES = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", ""}


def multi_hot(label_set: Sequence[int], num_labels: int) -> np.ndarray:
    """(num_labels,) float32 with 1 at each index of `label_set`."""
    vector = np.zeros(num_labels, np.float32)
    vector[list(label_set)] = 1.0
    return vector


def split_cells(cells: Sequence[str], sep: str | None, where: str) -> list[tuple[str, ...]]:
    """Each cell's labels (stripped, empty parts dropped, duplicates once, in order). `sep`: the
    separator, or None to detect it (``|``, ``;`` or ``,`` when a cell holds one, else a space).
    A column that mixes separators (``a|b`` in one row, ``c;d`` in another) is a DataError naming
    both rows; spaces inside labels are fine with any other separator (``water type|fire type``)."""
    cells = [str(c).strip() if c is not None and str(c) != "nan" else "" for c in cells]
    first = {s: next((i for i, c in enumerate(cells) if s in c), None) for s in SEPARATORS}
    if sep is None:
        sep = next((s for s in ("|", ";", ",") if first[s] is not None), " ")
    others = [s for s in SEPARATORS if s != sep and first[s] is not None and (sep == " " or s != " ")]
    if others:
        other, row = others[0], first[others[0]]
        if first.get(sep) is not None:
            mine = first[sep]
            raise DataError(
                f"{where} mixes separators: row {mine + 2} {cells[mine]!r} uses {sep!r}, row {row + 2} "
                f"{cells[row]!r} uses {other!r}. Use one separator throughout."
            )
        raise DataError(
            f"{where}: data.label_sep={sep!r}, but row {row + 2} {cells[row]!r} separates labels "
            f"with {other!r}. Set data.label_sep={other!r} or fix that row."
        )
    return [tuple(dict.fromkeys(p.strip() for p in c.split(sep) if p.strip())) for c in cells]


def indicator_sets(rows: Sequence[dict], columns: Sequence[str], where: str) -> list[tuple[str, ...]]:
    """Label sets from several 0/1 columns (``data.label_columns``): a row's labels are the columns
    holding 1 (or true/yes). Any other value is a DataError naming the row and column."""
    sets = []
    for i, row in enumerate(rows):
        labels = []
        for column in columns:
            value = str(row[column]).strip().lower() if row[column] is not None else ""
            value = "" if value == "nan" else value
            if value in TRUE_VALUES:
                labels.append(column)
            elif value not in FALSE_VALUES:
                raise DataError(
                    f"{where} row {i + 2}, column {column!r}: {row[column]!r} is not 0 or 1 "
                    f"(data.label_columns hold one 0/1 indicator per label)."
                )
        sets.append(tuple(labels))
    return sets


def looks_multilabel(cells: Sequence[str], sep: str | None) -> tuple[str, str] | None:
    """(why single-label cells are really label sets, their separator), or None. With `sep` set, any cell holding two
    labels. Without, cells such as ``grass poison`` whose parts are themselves labels of other
    rows, when they make at least 2 rows and 5% of them (a class may well be named ``red wine``)."""
    cells = [str(c).strip() for c in cells]
    if sep:
        several = [c for c in cells if len([p for p in c.split(sep) if p.strip()]) > 1]
        return (f"{len(several)} rows hold several labels (e.g. {several[0]!r})", sep) if several else None
    singles = set(cells)
    for s in SEPARATORS:
        combined = [c for c in cells if s in c and all(p.strip() in singles for p in c.split(s) if p.strip())]
        if len(combined) >= max(2, 0.05 * len(cells)):
            return (f"{len(combined)} rows hold combinations of other rows' labels (e.g. {combined[0]!r})", s)
    return None


def rarest_label_keys(label_sets: Sequence[Sequence[int]]) -> list[int]:
    """A stratification key per sample: its rarest label (-1 for an empty set), so a split keeps
    every label's share roughly, rare labels first."""
    frequency = Counter(i for labels in label_sets for i in labels)
    return [min(labels, key=lambda i: (frequency[i], i)) if labels else -1 for labels in label_sets]


def cardinality(label_sets: Sequence[Sequence[int]]) -> dict[int, int]:
    """Number of labels per image -> images, in increasing order."""
    return dict(sorted(Counter(len(s) for s in label_sets).items()))


def describe_cardinality(counts: dict[int, int]) -> str:
    """``0 labels: 12, 1 label: 480, 2 labels: 524``."""
    return ", ".join(f"{k} label{'' if k == 1 else 's'}: {n}" for k, n in counts.items())
