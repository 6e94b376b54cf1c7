"""What ``finetune auto`` (and ``fit("auto", ...)``) returns: the best checkpoint and score, the
leaderboard of every trial; in a notebook it renders as the leaderboard and the best trial's
learning curves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import Path

from finetune.tables import html_table


@dataclass(frozen=True)
class AutoResult:
    """What ``finetune auto`` found: the best ``checkpoint`` (None when no trial finished), its
    ``score`` (the monitored validation metric), the ``leaderboard`` rows, best first."""

    checkpoint: Path | None
    score: float | None
    leaderboard: list[dict]
    folder: Path
    seconds: float
    budget: float = 0.0  # the wall-time budget, seconds

    def summary(self) -> str:
        """``N trials in S s of a B s budget``: one line."""
        return f"{len(self.leaderboard)} trials in {self.seconds:.0f} s of a {self.budget:.0f} s budget"

    def table(self, limit: int = 15) -> tuple[list[str], list[list]]:
        """(columns, rows) of the leaderboard's first `limit` trials, as a person reads them."""
        return BOARD_COLUMNS, [board_cells(row) for row in self.leaderboard[:limit]]

    def show_curves(self):
        """The best trial's learning curves (from its ``summary.json``), for a notebook cell; None
        when no trial finished."""
        from finetune.viz import pictures
        from finetune.viz.notebook import drawn

        best = next((r for r in self.leaderboard if r["state"] == "COMPLETE" and r["checkpoint"]), None)
        summary = Path(best["checkpoint"]).parents[1] / "summary.json" if best else None
        if summary is None or not summary.is_file():
            return None
        history = json.loads(summary.read_text()).get("history") or []
        return drawn(lambda path: pictures.curves(history, path), f"learning curves of trial {best['trial']}")

    def _repr_html_(self) -> str:
        """In a notebook: the best score and checkpoint, the leaderboard, the best trial's learning
        curves, where it all went."""
        best = f"best {self.score:.4f}: {self.checkpoint}" if self.checkpoint else "no trial finished within the budget"
        head = f"AutoResult: {self.summary()}; {best}"
        more = f" (the first 15 of {len(self.leaderboard)})" if len(self.leaderboard) > 15 else ""
        caption = "leaderboard, best first" + more
        board = html_table(*self.table(), caption)
        curves = self.show_curves()
        picture = f"<div><b>the best trial's learning curves</b>{curves._repr_html_()}</div>" if curves else ""
        return (
            f'<div class="finetune-auto"><p>{escape(head)}</p>{board}{picture}<p>{escape(str(self.folder))}</p></div>'
        )


BOARD_COLUMNS = ["trial", "backbone", "recipe", "lr", "weight decay", "score", "state", "epochs", "s"]


def board_cells(row: dict) -> list:
    """A leaderboard row's cells under :data:`BOARD_COLUMNS`: numbers rounded, missing ones as -."""

    def number(value, spec: str = ".2g") -> str:
        return (
            "-" if value is None or value == "" else (format(value, spec) if isinstance(value, float) else str(value))
        )

    return [
        row["trial"],
        row["backbone"],
        row["recipe"],
        number(row["lr"]),
        number(row["weight_decay"]),
        number(row["score"], ".4f"),
        row["state"].lower(),
        row["epochs"] or "-",
        row["seconds"],
    ]
