"""What the benchmark scripts share: where the hymenoptera photos are, checked before any work."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "hymenoptera_data"
RESULTS = REPO / "benchmarks" / "results"


def add_data_and_out(parser: argparse.ArgumentParser) -> None:
    """--data (default ../shared/datasets/hymenoptera_data or FINETUNE_HYMENOPTERA) and --out."""
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("FINETUNE_HYMENOPTERA", DEFAULT_DATA)))
    parser.add_argument("--out", type=Path, default=RESULTS)


def check_data_and_out(args: argparse.Namespace) -> None:
    """Exit with a message when --data has no train/ folder; create --out."""
    if not (args.data / "train").is_dir():
        sys.exit(f"hymenoptera data not found at {args.data} (--data DIR or FINETUNE_HYMENOPTERA=DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
