"""What each training technique is worth: today's recipes vs each technique alone vs +recipe=strong.

    python benchmarks/techniques.py                          # 3 datasets x 3 seeds, every arm (6 epochs, batch 16)
    python benchmarks/techniques.py --datasets hymenoptera --seeds 0 --arms full_finetune strong
    python benchmarks/techniques.py --lr-grid                # lr-find's suggestion vs a 5-point grid

Every run is a real ``finetune.fit`` (lite0 with its embedded ImageNet weights) with the same
epochs, image size, split and seed per dataset; only the arm's overrides differ. The datasets come
from ``../shared/datasets`` (``FINETUNE_DATASETS=DIR``): hymenoptera as it is (245 / 153), flowers5
and dtd10 as seeded class-balanced subsets (manifests written into --out, never images): small
data is where fine-tuning recipes differ, and full fine-tuning of 4,000 photos does not fit a
2-core benchmark. The baseline arms also score the validation split with ``tta=flip``.

Writes --out/techniques.{json,md}: mean ± std (sample std over seeds) of the best-epoch val accuracy
and wall time per arm and dataset, and the difference to the best of today's recipes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FINETUNE_DATASETS", REPO.parent / "shared" / "datasets"))
# Subset sizes per class (train, val) for the folders without their own split.
SUBSETS = {"flowers5": (40, 30), "dtd10": (20, 15)}
CLASSES = {"hymenoptera": 2, "flowers5": 5, "dtd10": 10}
SIZES = {"hymenoptera": (245, 153), **{d: (CLASSES[d] * t, CLASSES[d] * v) for d, (t, v) in SUBSETS.items()}}
WHOLE_SIZES = {"hymenoptera": SIZES["hymenoptera"], "flowers5": (3453, 864), "dtd10": (960, 240)}  # --whole
TODAY = ["freeze_all_but_head", "full_finetune", "discriminative_lr", "lp_ft"]  # from_scratch: the control
# arm -> (recipe, overrides). Techniques alone are added to full_finetune (the baseline).
ARMS = {
    "freeze_all_but_head": ("freeze_all_but_head", ["tta=flip"]),
    "full_finetune": ("full_finetune", ["tta=flip"]),
    "discriminative_lr": ("discriminative_lr", []),
    "lp_ft": ("lp_ft", []),
    # lp_ft as it was before its BatchNorm kept the ImageNet statistics (the recipe's now)
    "lp_ft+bn_train": ("lp_ft", ["freeze.trainable_batchnorm=train"]),
    "+randaugment": ("full_finetune", ["augment=randaugment"]),
    "+mixup_cutmix": ("full_finetune", ["mixup.alpha=0.8", "cutmix.alpha=1.0"]),
    "+label_smoothing": ("full_finetune", ["loss.label_smoothing=0.1"]),
    "+ema": ("full_finetune", ["ema.decay=0.99"]),
    "+drop_path": ("full_finetune", ["backbone.drop_path_rate=0.1"]),
    "strong": ("strong", ["tta=flip"]),
}


def data_overrides(name: str, out: Path, seed: int, whole: bool = False) -> list[str]:
    """Hydra overrides for dataset `name`; subsets are drawn with a fixed seed (0), the same for
    every arm and run seed, so that runs differ by their own seed only. `whole`: every image, in
    the seeded 80/20 split of benchmarks/fastai_peer.py (the split fastai trains on for `seed`)."""
    root = DATASETS / ("hymenoptera_data" if name == "hymenoptera" else name)
    if not root.is_dir():
        raise SystemExit(f"{root} not found (FINETUNE_DATASETS=DIR)")
    if name == "hymenoptera":
        return ["data=folder", f"data.root={root}"]
    if whole:
        from fastai_peer import finetune_overrides, write_split_manifest

        return finetune_overrides(write_split_manifest(name, seed, out, root), root)
    n_train, n_val = SUBSETS[name]
    manifest = out / f"{name}_subset.csv"
    if not manifest.exists():
        rng = random.Random(0)
        rows = []
        for label in sorted(p.name for p in root.iterdir() if p.is_dir()):
            files = sorted(str(p.relative_to(root)) for p in (root / label).iterdir() if p.is_file())
            rng.shuffle(files)
            rows += [(f, label, "train") for f in files[:n_train]]
            rows += [(f, label, "val") for f in files[n_train : n_train + n_val]]
        with manifest.open("w", newline="") as f:
            csv.writer(f).writerows([("path", "label", "split"), *rows])
    return ["data=csv", f"data.csv={manifest}", f"data.root={root}", "data.split_column=split"]


def main() -> None:
    from finetune import fit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=["hymenoptera", "flowers5", "dtd10"])
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="16: twice the optimizer steps of the default 32")
    parser.add_argument(
        "--whole",
        action="store_true",
        help="every image of flowers5/dtd10 in fastai_peer.py's seeded 80/20 split, not the small subsets",
    )
    parser.add_argument("--set", nargs="*", default=[], help="more overrides for every run (e.g. data.cache.dir=DIR)")
    parser.add_argument("--no-tta", action="store_true", help="no arm also scores with tta=flip (plain wall times)")
    parser.add_argument("--lr-grid", action="store_true", help="lr-find vs a 5-point lr grid (hymenoptera, full)")
    parser.add_argument(
        "--lrs",
        nargs="*",
        default=["auto", "1e-4", "3e-4", "1e-3", "3e-3", "1e-2"],
        help="with --lr-grid: the lrs to run (results already in lr_grid.json are kept, not rerun)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = [
        f"trainer.max_epochs={args.epochs}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        "logger=none",
        "viz=none",
        "callbacks.progress_bar=false",
        "callbacks.checkpoint.min_write_interval_s=60",
    ]
    if args.lr_grid:
        return lr_grid(fit, args, common)

    path = args.out / "techniques.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    done = {(r["dataset"], r["arm"], r["seed"]) for r in runs}
    for dataset in args.datasets:
        for arm in args.arms:
            recipe, extra = ARMS[arm]
            extra = [o for o in extra if not (args.no_tta and o.startswith("tta="))]
            for seed in args.seeds:
                if (dataset, arm, seed) in done:
                    continue
                started = time.perf_counter()
                result = fit(
                    recipe,
                    [
                        *data_overrides(dataset, args.out, seed, args.whole),
                        *common,
                        *extra,
                        *args.set,
                        f"seed={seed}",
                        f"hydra.run.dir={args.out / 'runs' / dataset / arm / f'seed{seed}'}",
                        "overwrite=true",
                    ],
                )
                runs.append(
                    {
                        "dataset": dataset,
                        "arm": arm,
                        "seed": seed,
                        "val_acc": result.metrics["val/acc"],
                        "val_acc_tta": result.metrics.get("val/acc_tta"),
                        "seconds": time.perf_counter() - started,
                        "epochs": args.epochs,
                        "batch_size": args.batch_size,
                        "image_size": args.image_size,
                        "whole": args.whole,
                    }
                )
                print(
                    f"{dataset} {arm} seed {seed}: val/acc {runs[-1]['val_acc']:.4f}"
                    + (f" (tta flip {runs[-1]['val_acc_tta']:.4f})" if runs[-1]["val_acc_tta"] else "")
                    + f" in {runs[-1]['seconds']:.0f} s",
                    flush=True,
                )
                path.write_text(json.dumps(runs, indent=2))
    (args.out / "techniques.md").write_text(table(runs, args))
    print(table(runs, args))


def table(runs: list[dict], args) -> str:
    def stats(values):
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    datasets = [d for d in args.datasets if any(r["dataset"] == d for r in runs)]
    settings = "; ".join(
        f"{d}: {n_train} train / {n_val} val images, {r['image_size']} px, {r['epochs']} epochs of batch "
        f"{r['batch_size']}"
        for d in datasets
        for r in [next(r for r in runs if r["dataset"] == d)]
        for n_train, n_val in [WHOLE_SIZES[d] if r.get("whole") else SIZES.get(d, ("?", "?"))]
    )
    lines = [
        f"lite0 (embedded ImageNet weights), seeds {args.seeds}; {settings}. Best-epoch val accuracy, "
        "mean ± std over seeds (s: wall time per run on 2 cores)",
        "",
        "| arm | " + " | ".join(datasets) + " |",
        "|---|" + "---|" * len(datasets),
    ]
    best_today = {}
    for d in datasets:
        means = [
            stats([r["val_acc"] for r in runs if r["dataset"] == d and r["arm"] == a])[0]
            for a in TODAY
            if any(r["dataset"] == d and r["arm"] == a for r in runs)
        ]
        best_today[d] = max(means) if means else None
    for arm in args.arms:
        cells = []
        for d in datasets:
            rows = [r for r in runs if r["dataset"] == d and r["arm"] == arm]
            if not rows:
                cells.append("-")
                continue
            mean, std = stats([r["val_acc"] for r in rows])
            cell = f"{mean:.3f} ± {std:.3f} ({statistics.mean(r['seconds'] for r in rows):.0f} s)"
            if arm == "strong" and best_today[d] is not None:
                cell += f", {100 * (mean - best_today[d]):+.1f} pts vs best of today's"
            cells.append(cell)
        lines.append(f"| `{arm}` | " + " | ".join(cells) + " |")
    tta_rows = [a for a in args.arms if any(r["arm"] == a and r.get("val_acc_tta") is not None for r in runs)]
    for arm in tta_rows:
        cells = []
        for d in datasets:
            rows = [r for r in runs if r["dataset"] == d and r["arm"] == arm and r.get("val_acc_tta") is not None]
            if not rows:
                cells.append("-")
                continue
            mean, std = stats([r["val_acc_tta"] for r in rows])
            delta = statistics.mean(r["val_acc_tta"] - r["val_acc"] for r in rows)
            cells.append(f"{mean:.3f} ± {std:.3f} ({100 * delta:+.1f} pts)")
        lines.append(f"| `{arm}` + `tta=flip` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def lr_grid(fit, args, common: list[str]) -> None:
    """Full fine-tuning on hymenoptera: optimizer.lr=auto against fixed lrs, for each of --seeds
    (results keyed "LR" for seed 0, "LR@seedN" otherwise)."""
    data = data_overrides("hymenoptera", args.out, 0)
    path = args.out / "lr_grid.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for seed in args.seeds:
        for lr in args.lrs:
            key = str(lr) if seed == 0 else f"{lr}@seed{seed}"
            if key in results:
                continue
            started = time.perf_counter()
            result = fit(
                "full_finetune",
                [
                    *data,
                    *common,
                    f"seed={seed}",
                    f"optimizer.lr={lr}",
                    "overwrite=true",
                    f"hydra.run.dir={args.out / 'runs' / 'lr_grid' / key}",
                ],
            )
            results[key] = {
                "lr": result.config["optimizer"]["lr"],
                "val_acc": result.metrics["val/acc"],
                "seconds": time.perf_counter() - started,
            }
            print(f"lr {key}: {results[key]}", flush=True)
            path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
