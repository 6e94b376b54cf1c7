"""finetune's recipes and fastai's ``fine_tune`` in one table, from what the two benchmarks stored.

    python benchmarks/beside_fastai.py --out benchmarks/results/peer

Reads OUT/techniques.json (``benchmarks/techniques.py ... --no-tta --out OUT``: finetune's arms,
with ``--whole`` for flowers5/dtd10) and OUT/fastai_peer.json (``benchmarks/fastai_peer.py --out
OUT``), keeps the runs that share a dataset, image size and number of epochs (fastai's 1 frozen + N
unfrozen epochs against finetune's ``trainer.max_epochs`` = 1 + N) and the seeds both ran, and
writes OUT/beside_fastai.md: best-epoch validation accuracy, mean ± sample std over those seeds,
and mean wall seconds per run (finetune: the whole ``fit``, feature cache included; fastai: the
whole ``fine_tune``, and ``lr_find`` where it chose the lr), with each recipe's difference to
fastai's default in points.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cell(accs: list[float], seconds: list[float]) -> str:
    spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
    return f"{statistics.mean(accs):.3f}{spread} ({statistics.mean(seconds):.0f} s)"


def rows_for(finetune_runs: list[dict], fastai_runs: list[dict], dataset: str) -> tuple[list[str], list[int]]:
    """Markdown rows for `dataset` and the seeds they cover (fastai's default seeds, finetune's)."""
    fa = [r for r in fastai_runs if r["dataset"] == dataset]
    if not fa:
        return [], []
    size, epochs = fa[0]["image_size"], fa[0]["epochs"] + fa[0]["freeze_epochs"]
    fa = [r for r in fa if r["image_size"] == size and r["epochs"] + r["freeze_epochs"] == epochs]
    ft = [
        r
        for r in finetune_runs
        if r["dataset"] == dataset and r["image_size"] == size and r["epochs"] == epochs and not r.get("val_acc_tta")
    ]
    default = [r for r in fa if r["lr_mode"] == "default"]
    seeds = sorted({r["seed"] for r in default} & {r["seed"] for r in ft})
    if not seeds:
        return [], []
    reference = statistics.mean(r["best_val_acc"] for r in default if r["seed"] in seeds)  # fastai's rows
    lines = []
    for arm in dict.fromkeys(r["arm"] for r in ft):
        runs = [r for r in ft if r["arm"] == arm and r["seed"] in seeds]
        if not runs:
            continue
        accs = [r["val_acc"] for r in runs]
        # An arm run on fewer seeds is compared with fastai on those seeds, and says so.
        own = sorted(r["seed"] for r in runs)
        against = statistics.mean(r["best_val_acc"] for r in default if r["seed"] in own)
        delta = 100 * (statistics.mean(accs) - against)
        label = f"finetune `{arm}`" + (f" (seeds {','.join(map(str, own))})" if own != seeds else "")
        lines.append(f"| {dataset} | {label} | {_cell(accs, [r['seconds'] for r in runs])} | {delta:+.1f} |")
    for mode in dict.fromkeys(r["lr_mode"] for r in fa):
        runs = [r for r in fa if r["lr_mode"] == mode and (mode != "default" or r["seed"] in seeds)]
        accs = [r["best_val_acc"] for r in runs]
        seconds = [r["fine_tune_s"] + (r["lr_find_s"] or 0) for r in runs]
        lrs = ", ".join(dict.fromkeys(f"{r['base_lr']:.1e}" for r in runs))
        shown = f"seeds {','.join(str(r['seed']) for r in runs)}" if mode != "default" else ""
        delta = 100 * (statistics.mean(accs) - reference)
        lines.append(
            f"| {dataset} | fastai `fine_tune`, lr {mode} ({lrs}{'; ' + shown if shown else ''}) "
            f"| {_cell(accs, seconds)} | {delta:+.1f} |"
        )
    return lines, seeds


def table(finetune_runs: list[dict], fastai_runs: list[dict]) -> str:
    lines = ["| dataset | run | best val acc (s per run) | vs fastai default, pts |", "|---|---|---|---|"]
    notes = []
    for dataset in dict.fromkeys(r["dataset"] for r in fastai_runs):
        rows, seeds = rows_for(finetune_runs, fastai_runs, dataset)
        if rows:
            lines += rows
            fa = next(r for r in fastai_runs if r["dataset"] == dataset)
            notes.append(
                f"{dataset}: {fa['train_images']} train / {fa['val_images']} val images, {fa['image_size']} px, "
                f"1 + {fa['epochs']} epochs, batch {fa['batch_size']}, seeds {seeds}"
            )
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "peer")
    args = parser.parse_args()
    finetune_runs = json.loads((args.out / "techniques.json").read_text())
    fastai_runs = json.loads((args.out / "fastai_peer.json").read_text())
    text = table(finetune_runs, fastai_runs)
    (args.out / "beside_fastai.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
