"""Does `finetune rank` order backbones as head-only fine-tuning does?

    python benchmarks/rank.py                                   # hymenoptera, dtd10, flowers5 (128 px)
    python benchmarks/rank.py --datasets dtd10 --seeds 0 1

For each data set: `finetune rank` over the offline backbones (cold: features extracted; then
warm: from the feature cache), and one `+recipe=freeze_all_but_head` run per backbone and seed
(its best val/acc). Reports each score, the head-only accuracy, and Kendall's tau between each
score and the head-only accuracy per data set, and the timings. Results in benchmarks/results/rank.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, RESULTS

DATA = REPO.parent / "shared" / "datasets"
# name -> overrides: a seeded 80/20 split where the set has none; flowers5's photos are 128 px.
DATASETS = {"hymenoptera_data": [], "dtd10": [], "flowers5": ["data.image_size=128"]}


def finetune(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"finetune {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result, time.perf_counter() - started


def main() -> None:
    from finetune.model.weights import offline_backbones
    from finetune.use.transfer import kendall_tau

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    args = parser.parse_args()
    backbones = offline_backbones()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            data = ["data=folder", f"data.root={DATA / name}", *DATASETS[name]]
            out = Path(tmp) / name
            _, cold = finetune("rank", f"backbones=[{','.join(backbones)}]", *data, f"out={out}/rank")
            _, warm = finetune("rank", f"backbones=[{','.join(backbones)}]", *data, f"out={out}/rank")
            scores = {r["backbone"]: r for r in json.loads((out / "rank" / "rank.json").read_text())["backbones"]}
            head, head_seconds = {b: [] for b in backbones}, []
            for backbone in backbones:
                for seed in args.seeds:
                    run = out / f"{backbone}-{seed}"
                    _, seconds = finetune(
                        "+recipe=freeze_all_but_head",
                        f"backbone.name={backbone}",
                        f"seed={seed}",
                        *data,
                        "logger=none",
                        "viz=none",
                        "callbacks.progress_bar=false",
                        f"hydra.run.dir={run}",
                    )
                    head[backbone].append(json.loads((run / "summary.json").read_text())["metrics"]["val/acc"])
                    head_seconds.append(seconds)
            accuracy = [float(np.mean(head[b])) for b in backbones]
            results[name] = {
                "backbones": backbones,
                "head_only_acc": accuracy,
                "head_only_std": [float(np.std(head[b])) for b in backbones],
                "scores": {s: [scores[b][s] for b in backbones] for s in ("linear", "knn", "logme")},
                "tau": {
                    s: kendall_tau([scores[b][s] for b in backbones], accuracy) for s in ("linear", "knn", "logme")
                },
                "images_per_second": [scores[b]["images_per_second"] for b in backbones],
                "rank_cold_s": cold,
                "rank_warm_s": warm,
                "head_only_run_s": float(np.mean(head_seconds)),
            }
            print(json.dumps({name: results[name]}, indent=1), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rank.json").write_text(json.dumps(results, indent=2))
    print(f"\nseeds {args.seeds}; Kendall's tau between each score and head-only val/acc\n")
    print(
        "| data | backbone | head-only val/acc | linear (k-fold) | k-NN | LogME | img/s "
        "|\n|---|---|---|---|---|---|---|"
    )
    for name, r in results.items():
        for i, b in enumerate(r["backbones"]):
            print(
                f"| {name} | {b} | {r['head_only_acc'][i]:.4f} ± {r['head_only_std'][i]:.4f} | "
                f"{r['scores']['linear'][i]:.4f} "
                f"| {r['scores']['knn'][i]:.4f} | {r['scores']['logme'][i]:.4f} | {r['images_per_second'][i]:.0f} |"
            )
    print(
        "\n| data | tau linear | tau k-NN | tau LogME | rank cold s | rank warm s | one head-only run s "
        "|\n|---|---|---|---|---|---|---|"
    )
    for name, r in results.items():
        t = r["tau"]
        print(
            f"| {name} | {t['linear']:.2f} | {t['knn']:.2f} | {t['logme']:.2f} | {r['rank_cold_s']:.0f} "
            f"| {r['rank_warm_s']:.0f} | {r['head_only_run_s']:.0f} |"
        )
    for s in ("linear", "knn", "logme"):
        print(f"mean tau {s}: {np.nanmean([r['tau'][s] for r in results.values()]):.2f}")


if __name__ == "__main__":
    main()
