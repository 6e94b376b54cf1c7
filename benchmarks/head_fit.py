"""Head-only accuracy and cost: the optimal head (L-BFGS, cross-validated L2) against the SGD head
it replaced and against scikit-learn's logistic-regression probe on the same cached features.

    python benchmarks/head_fit.py                                   # 4 datasets x seeds 0 1 2
    python benchmarks/head_fit.py --datasets dtd10 --seeds 0

Per (dataset, seed), in a fresh feature-cache folder: ``sgd`` (``head.fit.solver=sgd``: today's
10 SGD epochs at lr 0.01) runs first and computes the cache (cold), then ``lbfgs`` (the default
now; its cross-validation is computed, not remembered) and ``sgd`` again, both on the warm cache:
their wall times compare like for like, and the cold ``lbfgs`` time is the cold ``sgd`` time plus
the difference of the warm ones. The probes are scikit-learn's ``LogisticRegressionCV`` (6 C
values, 3 folds) on the cache's training views, scored on its validation features: on
standardized features (as the probe of the datasets' README) and on raw ones; ``probe`` is the
better of the two on each run. Every number is a validation accuracy on the same split: the
runs' best epoch (``val/acc``, chosen on that split) and their last epoch (``final``).

``--cli N``: instead, the wall time of the head-only run as a shell user meets it: per dataset, N
rounds of two fresh ``python -m finetune +recipe=freeze_all_but_head`` processes (``sgd`` and
``lbfgs``, alternating which goes first), each in an empty feature cache (cold: the backbone
pass, and for ``lbfgs`` its cross-validation, are computed), everything else the CLI's defaults
(W&B offline, the report's pictures drawn). Writes --out/head_fit_cli.{json,md}.

Data (``../shared/datasets`` or ``FINETUNE_DATASETS=DIR``): digits (the default job, 64 px),
hymenoptera (its own split, 224 px), flowers5 (all 4,317 photos at their 128 px, seeded 80/20) and
dtd10 (all 1,200 at 224 px, seeded 80/20). Writes --out/head_fit.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FINETUNE_DATASETS", REPO.parent / "shared" / "datasets"))
DATA = {
    "digits": [],
    "hymenoptera": ["data=folder", f"data.root={DATASETS / 'hymenoptera_data'}"],
    "flowers5": ["data=folder", f"data.root={DATASETS / 'flowers5'}", "data.image_size=128"],
    "dtd10": ["data=folder", f"data.root={DATASETS / 'dtd10'}"],
}


def probes(cache_file: Path) -> dict[str, float]:
    """Validation accuracy of scikit-learn's cross-validated logistic regression on the cached
    features, standardized and raw."""
    from safetensors.torch import load_file
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    stored = load_file(str(cache_file))
    views, labels = stored["features.train"].numpy(), stored["labels.train"].numpy()
    x, y = views.reshape(-1, views.shape[2]), np.tile(labels, views.shape[0])
    x_val, y_val = stored["features.val"].numpy(), stored["labels.val"].numpy()
    scores = {}
    for name, model in (
        (
            "probe_standardized",
            make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 1, 6), cv=3, max_iter=500)),
        ),
        ("probe_raw", LogisticRegressionCV(Cs=np.logspace(-3, 2, 6), cv=3, max_iter=500)),
    ):
        started = time.perf_counter()
        scores[name] = float(model.fit(x, y).score(x_val, y_val))
        scores[f"{name}_seconds"] = time.perf_counter() - started
    return scores


def one_run(fit, dataset: str, seed: int, solver: str, cache: Path, out: Path) -> dict:
    started = time.perf_counter()
    result = fit(
        "freeze_all_but_head",
        [
            *DATA[dataset],
            f"seed={seed}",
            f"head.fit.solver={solver}",
            f"data.cache.dir={cache}",
            "logger=none",
            "viz=none",
            "callbacks.progress_bar=false",
            "overwrite=true",
            f"hydra.run.dir={out / 'runs' / dataset / f'{solver}-seed{seed}'}",
        ],
    )
    return {
        "val_acc": result.metrics["val/acc"],
        "final": result.history[-1]["val/acc"],
        "seconds": time.perf_counter() - started,
    }


def cli_run(dataset: str, solver: str, work: Path) -> float:
    """Seconds of one fresh head-only CLI process on `dataset` with `solver`, in an empty cache."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "finetune", "+recipe=freeze_all_but_head", *DATA[dataset]]
        + [f"head.fit.solver={solver}", f"data.cache.dir={work / 'cache'}", f"hydra.run.dir={work / 'run'}"],
        cwd=work,
        check=True,
        capture_output=True,
        env={**os.environ, "WANDB_MODE": "offline"},
        stdin=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def cli_times(datasets: list[str], rounds: int, out: Path) -> None:
    """--cli: `rounds` rounds of (sgd, lbfgs) CLI runs per dataset, the order alternating."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="head-fit-cli-") as work:
        for dataset in datasets:
            for r in range(rounds):
                order = ("sgd", "lbfgs") if r % 2 == 0 else ("lbfgs", "sgd")
                times = {solver: cli_run(dataset, solver, Path(work) / solver) for solver in order}
                rows.append({"dataset": dataset, "round": r, **times})
                print(f"{dataset} round {r}: sgd {times['sgd']:.1f} s, lbfgs {times['lbfgs']:.1f} s", flush=True)
    (out / "head_fit_cli.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| data | rounds | sgd, s | lbfgs, s | lbfgs / sgd (mean of the rounds' ratios) |",
        "|---|---|---|---|---|",
    ]
    for dataset in datasets:
        rs = [r for r in rows if r["dataset"] == dataset]
        lines.append(
            f"| {dataset} | {len(rs)} | {spread([r['sgd'] for r in rs], 1)} | {spread([r['lbfgs'] for r in rs], 1)} | "
            f"{spread([r['lbfgs'] / r['sgd'] for r in rs], 2)} |"
        )
    (out / "head_fit_cli.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=list(DATA))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--cli", type=int, metavar="ROUNDS", help="time fresh CLI processes instead (see above)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cli:
        cli_times(args.datasets, args.cli, args.out)
        return
    from finetune import fit  # in this process only for the in-process runs

    path = args.out / "head_fit.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["dataset"], r["seed"]) for r in rows}
    for dataset in args.datasets:
        for seed in args.seeds:
            if (dataset, seed) in done:
                continue
            cache = args.out / "head_fit_cache" / dataset / f"seed{seed}"
            shutil.rmtree(cache, ignore_errors=True)
            row = {"dataset": dataset, "seed": seed}
            row["sgd_cold"] = one_run(fit, dataset, seed, "sgd", cache, args.out)
            row["lbfgs"] = one_run(fit, dataset, seed, "lbfgs", cache, args.out)
            row["sgd"] = one_run(fit, dataset, seed, "sgd", cache, args.out)
            row.update(probes(next((cache / "features").glob("*.safetensors"))))
            row["probe"] = max(row["probe_standardized"], row["probe_raw"])
            rows.append(row)
            path.write_text(json.dumps(rows, indent=2))
            print(
                f"{dataset} seed {seed}: lbfgs {row['lbfgs']['val_acc']:.4f} (final {row['lbfgs']['final']:.4f}), "
                f"sgd {row['sgd']['val_acc']:.4f} (final {row['sgd']['final']:.4f}), probe {row['probe']:.4f}; "
                f"warm s: lbfgs {row['lbfgs']['seconds']:.1f}, sgd {row['sgd']['seconds']:.1f}",
                flush=True,
            )
    (args.out / "head_fit.md").write_text(table(rows))
    print(table(rows))


def spread(values: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| data | seeds | lbfgs val/acc (final) | sgd val/acc (final) | probe, standardized | probe, raw | "
        "lbfgs - best probe | warm s: lbfgs / sgd | cold s: lbfgs / sgd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == dataset]
        cold_lbfgs = [r["sgd_cold"]["seconds"] - r["sgd"]["seconds"] + r["lbfgs"]["seconds"] for r in rs]
        lines.append(
            f"| {dataset} | {len(rs)} | {spread([r['lbfgs']['val_acc'] for r in rs])} "
            f"({spread([r['lbfgs']['final'] for r in rs])}) | {spread([r['sgd']['val_acc'] for r in rs])} "
            f"({spread([r['sgd']['final'] for r in rs])}) | {spread([r['probe_standardized'] for r in rs])} | "
            f"{spread([r['probe_raw'] for r in rs])} | "
            f"{statistics.mean(r['lbfgs']['val_acc'] - r['probe'] for r in rs):+.3f} | "
            f"{statistics.mean(r['lbfgs']['seconds'] for r in rs):.1f} / "
            f"{statistics.mean(r['sgd']['seconds'] for r in rs):.1f} | "
            f"{statistics.mean(cold_lbfgs):.1f} / {statistics.mean(r['sgd_cold']['seconds'] for r in rs):.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
