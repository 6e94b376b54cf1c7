"""Run every recipe on hymenoptera (ants vs bees) with several seeds; write a table.

    python benchmarks/recipes.py                       # all recipes, 3 seeds, 10 epochs
    python benchmarks/recipes.py --seeds 0 --epochs 5 --recipes freeze_all_but_head lp_ft

Writes benchmarks/results/recipes.{md,json}: per recipe, mean ± std of the best val accuracy,
wall time per run, and trainable parameters. Every run is a real `finetune.fit` with the recipe's
own settings; only the data, epochs, seed and logger are set here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import add_data_and_out, check_data_and_out  # benchmarks/common.py, beside this script


def main() -> None:
    from finetune import fit
    from finetune.config import recipe_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_and_out(parser)
    parser.add_argument("--recipes", nargs="*", default=recipe_names())
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    check_data_and_out(args)

    runs = []
    for recipe in args.recipes:
        for seed in args.seeds:
            started = time.perf_counter()
            result = fit(
                recipe,
                list(args.overrides),
                data="folder",
                data__root=args.data,
                seed=seed,
                trainer__max_epochs=args.epochs,
                logger="none",
                callbacks__progress_bar=False,
                hydra__run__dir=args.out / "runs" / f"{recipe}-seed{seed}",
            )
            seconds = time.perf_counter() - started
            trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
            runs.append(
                {
                    "recipe": recipe,
                    "seed": seed,
                    "val_acc": result.metrics["val/acc"],
                    "best_epoch": int(result.metrics["epoch"]),
                    "seconds": seconds,
                    "trainable": trainable,
                }
            )
            print(f"{recipe} seed {seed}: val/acc {result.metrics['val/acc']:.4f} in {seconds:.0f} s", flush=True)
            (args.out / "recipes.json").write_text(json.dumps(runs, indent=2))

    lines = [
        f"hymenoptera (245 train / 153 val), tf_efficientnet_lite0 embedded weights, {args.epochs} epochs, "
        f"seeds {args.seeds}; best-epoch val accuracy",
        "",
        "| recipe | val acc (mean ± std) | runs | s / run | trainable params |",
        "|---|---|---|---|---|",
    ]
    for recipe in args.recipes:
        rows = [r for r in runs if r["recipe"] == recipe]
        accs = [r["val_acc"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| `{recipe}` | {statistics.mean(accs):.3f} ± {std:.3f} | {len(rows)} | "
            f"{statistics.mean(r['seconds'] for r in rows):.0f} | {rows[0]['trainable']:,} |"
        )
    table = "\n".join(lines)
    (args.out / "recipes.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
