"""`finetune auto` against today's recipes, with a budget of 3x one full fine-tuning run.

    python benchmarks/auto.py                                   # hymenoptera, flowers5, dtd10 x seeds 0 1 2
    python benchmarks/auto.py --datasets dtd10 --seeds 0

The data, image size, epochs and batch size are benchmarks/techniques.py's (its subsets of
flowers5 and dtd10, 128 px, 6 epochs of batch 16; hymenoptera as it is, 5 epochs of batch 32), so
that auto is compared with the recipes' 3-seed means measured there (--reference, default the
table of docs/benchmarks/techniques.md). Per dataset: one `+recipe=full_finetune` run (seed 0) is
timed here, the budget is 3x its wall time, then `fit("auto", ..., time_budget=...)` runs per seed
with an empty auto folder (warm feature caches after the first seed). Reports auto's best val/acc,
the search's wall time against the budget, the trials and what won. Results in benchmarks/results/auto.json.

Auto's figure is the best of its trials on the same validation split that chose it, so it is
optimistic by the selection; the recipes' figures are single runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS
from techniques import data_overrides

# Best 3-seed mean among today's recipes in docs/benchmarks/techniques.md (techniques.py).
REFERENCE = {
    "hymenoptera": ("lp_ft", 0.930),
    "flowers5": ("freeze_all_but_head", 0.667),
    "dtd10": ("freeze_all_but_head", 0.798),
}
SETTINGS = {"hymenoptera": (5, 32), "flowers5": (6, 16), "dtd10": (6, 16)}  # epochs, batch size


def main() -> None:
    from finetune import fit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=list(REFERENCE))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--budget-factor", type=float, default=3.0)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.datasets:
            epochs, batch = SETTINGS[name]
            common = [
                *data_overrides(name, tmp, 0),
                f"trainer.max_epochs={epochs}",
                "data.image_size=128",
                f"data.batch_size={batch}",
                "logger=none",
                "callbacks.progress_bar=false",
            ]
            started = time.perf_counter()
            full = fit("full_finetune", [*common, "viz=none", "seed=0", f"hydra.run.dir={tmp / name / 'full'}"])
            full_seconds = time.perf_counter() - started
            budget = args.budget_factor * full_seconds
            runs = []
            for seed in args.seeds:
                started = time.perf_counter()
                result = fit(
                    "auto", [*common, f"seed={seed}"], time_budget=f"{budget:.0f}s", out=str(tmp / name / f"auto{seed}")
                )
                wall = time.perf_counter() - started
                best = result.leaderboard[0]
                runs.append(
                    {
                        "seed": seed,
                        "val_acc": result.score,
                        "search_s": result.seconds,
                        "wall_s": wall,
                        "trials": len(result.leaderboard),
                        "backbone": best["backbone"],
                        "recipe": best["recipe"],
                        "states": [r["state"] for r in result.leaderboard],
                    }
                )
                print(
                    f"{name} seed {seed}: auto {result.score:.4f} ({best['backbone']}, {best['recipe']}) in "
                    f"{result.seconds:.0f} s of {budget:.0f} s, {len(result.leaderboard)} trials",
                    flush=True,
                )
            accuracies = [r["val_acc"] for r in runs]
            results[name] = {
                "full_finetune_s": full_seconds,
                "full_finetune_acc": full.metrics["val/acc"],
                "budget_s": budget,
                "runs": runs,
                "mean": statistics.mean(accuracies),
                "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "reference": REFERENCE[name],
            }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "auto.json").write_text(json.dumps(results, indent=2))
    print(f"\nseeds {args.seeds}; budget {args.budget_factor:g}x one full_finetune run (timed here, seed 0)\n")
    print("| data | budget s | auto val/acc | best recipe (3-seed mean) | search s / budget (max) | trials | winners |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        recipe, reference = r["reference"]
        over = max(run["search_s"] / r["budget_s"] for run in r["runs"])
        winners = ", ".join(
            sorted({f"{run['backbone'].removeprefix('tf_efficientnet_')} {run['recipe']}" for run in r["runs"]})
        )
        print(
            f"| {name} | {r['budget_s']:.0f} | {r['mean']:.3f} ± {r['std']:.3f} | {recipe} {reference:.3f} "
            f"| {over:.2f} | {statistics.mean(run['trials'] for run in r['runs']):.1f} | {winners} |"
        )


if __name__ == "__main__":
    main()
