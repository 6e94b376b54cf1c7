"""``finetune audit`` against planted problems (issue 20, part 4), on flowers5 and hymenoptera.

    python benchmarks/audit.py                                   # all parts, seeds 0 1 2
    python benchmarks/audit.py --datasets hymenoptera --parts noise duplicates --seeds 0

Each dataset keeps one fixed split: hymenoptera its train/ and val/ folders, flowers5 finetune's
own seeded stratified split (``data=folder``, seed 42). Every variant is a CSV manifest
(``path,label,split``, absolute paths, ``data.root=/``) pointing at the original files: no image
is copied or changed, except the near-duplicates of part (b), written to a temporary folder.

noise: per seed, 5% of the training labels (seeded) flipped to another class chosen uniformly; the
  audit (the real CLI, ``finetune audit``) runs on the noisy manifest; AUROC of 1 - label quality
  for planted vs all other images, precision and recall of cleanlab's flagged set (the default cut).
duplicates: a seeded sample of images gets one derived copy each, in turn a JPEG re-encode at
  quality 60, a resize by a factor drawn from 0.5-0.9 (PNG) and a 90% centre crop (PNG), filed in
  a random split (30% val); the audit runs with similarity=0.8 so that audit.json lists every
  pair down to 0.8, and each threshold of the thumbnail correlation is scored from that list:
  share of planted pairs found; false pairs (a copy with an image other than its source or a
  twin of it), as a share of the flagged pairs and of all other pairs; and the pairs among the
  original files, reported apart: flowers5 holds real duplicates (the same Flickr photo filed
  under rose and tulip, bursts of one scene), which no planting explains.
timing: the audit with a warm feature cache against one head-only run
  (``+recipe=freeze_all_but_head``, its own cache warm too), both the CLI, each run twice, the
  second timed.
accuracy: head-only runs (``augment=none``, 10 epochs) on clean, noisy, and noisy minus the
  training images the audit flagged, all scored on the same clean val split (last epoch and best
  epoch); recovered = (cleaned - noisy) / (clean - noisy).

Writes --out/audit.json and audit.md (markdown table), printed as well.
"""

from __future__ import annotations

import argparse
import csv
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
RESULTS = REPO / "benchmarks" / "results" / "audit"
FINETUNE = str(Path(sys.executable).parent / "finetune")
ROOTS = {"flowers5": "flowers5", "hymenoptera": "hymenoptera_data"}
THRESHOLDS = (0.8, 0.85, 0.9, 0.95, 0.98)


def base_split(name: str) -> tuple[list[str], list[tuple[str, int, str]]]:
    """(classes, rows (path, label, split)) of a dataset's fixed split, as finetune reads the folder."""
    from finetune.config import compose_config
    from finetune.data.sources import load_data

    cfg = compose_config(["data=folder", f"data.root={DATASETS / ROOTS[name]}"])
    splits = load_data(cfg.data, cfg.seed)
    rows = [(p, y, s) for s in ("train", "val") for p, y in getattr(splits, s)]
    return list(splits.classes), rows


def write_manifest(path: Path, classes: list[str], rows: list[tuple[str, int, str]]) -> list[str]:
    """The CSV manifest of `rows`; returns the config overrides that read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows([(p, classes[y], s) for p, y, s in rows])
    return ["data=csv", f"data.csv={path}", "data.root=/", "data.split_column=split"]


def run(args: list[str], cache: Path) -> float:
    """Run the finetune CLI with `args` (and the benchmark's feature cache); its wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run([FINETUNE, *args, f"data.cache.dir={cache}"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"finetune {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def read_audit(out: Path) -> tuple[list[dict], dict]:
    with (out / "audit.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "audit.json").read_text())


def noisy_rows(rows, num_classes: int, seed: int, share: float) -> tuple[list, set[str]]:
    rng = np.random.default_rng(seed)
    train = [i for i, r in enumerate(rows) if r[2] == "train"]
    chosen = rng.choice(train, round(share * len(train)), replace=False)
    noisy = list(rows)
    for i in chosen:
        p, y, s = rows[i]
        noisy[i] = (p, int((y + rng.integers(1, num_classes)) % num_classes), s)
    return noisy, {rows[i][0] for i in chosen}


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores))


def part_noise(name, classes, rows, seeds, share, work, cache) -> list[dict]:
    results = []
    for seed in seeds:
        noisy, planted = noisy_rows(rows, len(classes), seed, share)
        overrides = write_manifest(work / name / f"noisy_seed{seed}.csv", classes, noisy)
        out = work / name / f"audit_noisy_seed{seed}"
        seconds = run(["audit", *overrides, f"out={out}", f"seed={seed}"], cache)
        audited, summary = read_audit(out)
        is_planted = np.array([r["path"] in planted for r in audited])
        flagged = np.array([r["is_label_issue"] == "True" for r in audited])
        quality = np.array([float(r["label_quality"]) for r in audited])
        hits = int((flagged & is_planted).sum())
        results.append(
            {
                "seed": seed,
                "planted": len(planted),
                "flagged": int(flagged.sum()),
                "hits": hits,
                "auroc": auroc(1 - quality, is_planted),
                "precision": hits / max(int(flagged.sum()), 1),
                "recall": hits / len(planted),
                "kfold_accuracy": summary["kfold_accuracy"],
                "seconds": seconds,
                "flagged_train": [r["path"] for r, f in zip(audited, flagged) if f and r["split"] == "train"],
                "manifest": overrides,
            }
        )
        print(
            f"{name} noise seed {seed}: AUROC {results[-1]['auroc']:.3f}, flagged {int(flagged.sum())}, "
            f"precision {results[-1]['precision']:.3f}, recall {results[-1]['recall']:.3f} ({seconds:.0f} s)",
            flush=True,
        )
    return results


def derived_copy(source: str, kind: str, target: Path, rng: np.random.Generator) -> Path:
    from PIL import Image

    from finetune.data.images import load_rgb

    image = Image.fromarray(load_rgb(source))
    if kind == "jpeg60":
        target = target.with_suffix(".jpg")
        image.save(target, quality=60)
        return target
    if kind == "resize":
        factor = rng.uniform(0.5, 0.9)
        image = image.resize(
            (max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.Resampling.BICUBIC
        )
    else:  # 90% centre crop
        w, h = image.size
        dw, dh = round(w * 0.05), round(h * 0.05)
        image = image.crop((dw, dh, w - dw, h - dh))
    target = target.with_suffix(".png")
    image.save(target)
    return target


def part_duplicates(name, classes, rows, seed, copies, work, cache) -> dict:
    rng = np.random.default_rng(1000 + seed)
    folder = Path(tempfile.mkdtemp(prefix=f"audit-copies-{name}-"))
    try:
        planted, extra = set(), []
        for n, i in enumerate(rng.choice(len(rows), copies, replace=False)):
            path, label, _ = rows[i]
            kind = ("jpeg60", "resize", "crop")[n % 3]
            copy = derived_copy(path, kind, folder / f"copy{n}_{kind}_{Path(path).stem}", rng)
            extra.append((str(copy), label, ("train", "val")[int(rng.random() < 0.3)]))
            planted.add(frozenset((path, str(copy))))
        overrides = write_manifest(work / name / f"duplicates_seed{seed}.csv", classes, rows + extra)
        out = work / name / f"audit_duplicates_seed{seed}"
        run(["audit", *overrides, f"out={out}", "similarity=0.8"], cache)
        _, summary = read_audit(out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    pairs = [
        (frozenset((p["first"], p["second"])), p["similarity"]) for p in summary["pairs"] if p["similarity"] is not None
    ]
    copies = {path for path, _, _ in extra}
    source = {c: next(iter(pair - {c})) for pair in planted for c in pair if c in copies}
    by_threshold = {}
    for t in THRESHOLDS:
        flagged = [pair for pair, s in pairs if s >= t]
        originals = [pair for pair in flagged if not pair & copies]
        twins = {frozenset(pair) for pair in originals}
        found, transitive, false = set(), [], []
        for pair in flagged:
            if pair in planted:
                found.add(pair)
            elif pair & copies:
                # a copy paired with an image that the data already hold twice of its source is right too
                ends = [source.get(x, x) for x in pair]
                (transitive if len(set(ends)) == 1 or frozenset(ends) in twins else false).append(pair)
        n = len(rows) + len(extra)
        by_threshold[str(t)] = {
            "found": len(found) / len(planted),
            "transitive": len(transitive),
            "false_pairs": len(false),
            "false_share_of_flagged": len(false) / max(len(flagged), 1),
            "false_rate_all_pairs": len(false) / (n * (n - 1) // 2 - len(planted)),
            "pairs_among_originals": len(originals),
            "false_examples": [sorted(pair) for pair in false[:5]],
        }
    planted_sims = {pair: s for pair, s in pairs if pair in planted}
    result = {
        "seed": seed,
        "copies": len(planted),
        "by_threshold": by_threshold,
        "planted_similarity_min": min(planted_sims.values(), default=None),
        "planted_missing_at_0.8": len(planted) - len(planted_sims),
        "original_pairs_at_0.95": [sorted(pair) for pair, s in pairs if s >= 0.95 and not pair & copies],
        "similarities_by_kind": {
            k: sorted(round(s, 4) for pair, s in planted_sims.items() if any(f"_{k}_" in p for p in pair))
            for k in ("jpeg60", "resize", "crop")
        },
    }
    d = by_threshold["0.95"]
    print(
        f"{name} duplicates: found {d['found']:.3f}, false pairs {d['false_pairs']}, pairs among the original "
        f"files {d['pairs_among_originals']} at 0.95",
        flush=True,
    )
    return result


def part_timing(name, root, work, cache) -> dict:
    data = ["data=folder", f"data.root={root}"]
    audit = [run(["audit", *data, f"out={work / name / 'audit_timing'}"], cache) for _ in range(2)]
    head = [
        run(
            [
                "+recipe=freeze_all_but_head",
                *data,
                "logger=csv",
                "overwrite=true",
                f"hydra.run.dir={work / name / 'head_timing'}",
            ],
            cache,
        )
        for _ in range(2)
    ]
    print(f"{name} timing: audit {audit[1]:.1f} s, head-only run {head[1]:.1f} s (warm)", flush=True)
    return {
        "audit_cold": audit[0],
        "audit_warm": audit[1],
        "head_cold": head[0],
        "head_warm": head[1],
        "ratio": audit[1] / head[1],
    }


def head_only(overrides: list[str], out: Path, seed: int, cache: Path) -> dict:
    run(
        [
            "+recipe=freeze_all_but_head",
            *overrides,
            "augment=none",
            "logger=csv",
            "viz=none",
            "overwrite=true",
            f"seed={seed}",
            f"hydra.run.dir={out}",
        ],
        cache,
    )
    summary = json.loads((out / "summary.json").read_text())
    return {"best": summary["metrics"]["val/acc"], "last": summary["history"][-1]["val/acc"]}


def part_accuracy(name, classes, rows, noise: list[dict], work, cache) -> dict:
    clean = head_only(write_manifest(work / name / "clean.csv", classes, rows), work / name / "head_clean", 0, cache)
    per_seed = []
    for r in noise:
        flagged = set(r["flagged_train"])
        noisy = head_only(r["manifest"], work / name / f"head_noisy_seed{r['seed']}", r["seed"], cache)
        with open(r["manifest"][1].split("=", 1)[1], newline="") as f:
            noisy_manifest = [(row["path"], classes.index(row["label"]), row["split"]) for row in csv.DictReader(f)]
        kept = [row for row in noisy_manifest if row[0] not in flagged]
        cleaned = head_only(
            write_manifest(work / name / f"cleaned_seed{r['seed']}.csv", classes, kept),
            work / name / f"head_cleaned_seed{r['seed']}",
            r["seed"],
            cache,
        )
        per_seed.append({"seed": r["seed"], "noisy": noisy, "cleaned": cleaned, "dropped": len(flagged)})
        print(
            f"{name} accuracy seed {r['seed']}: clean {clean['last']:.4f}, noisy {noisy['last']:.4f}, "
            f"cleaned {cleaned['last']:.4f} (dropped {len(flagged)})",
            flush=True,
        )
    summary = {"clean": clean, "per_seed": per_seed}
    for which in ("last", "best"):
        noisy = statistics.mean(s["noisy"][which] for s in per_seed)
        cleaned = statistics.mean(s["cleaned"][which] for s in per_seed)
        lost = clean[which] - noisy
        summary[which] = {
            "clean": clean[which],
            "noisy": noisy,
            "cleaned": cleaned,
            "lost": lost,
            "recovered": (cleaned - noisy) / lost if lost > 0 else None,
        }
    return summary


def mean_std(values) -> str:
    values = list(values)
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


def table(results: dict) -> str:
    names = list(results)
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label, fn):
        cells = []
        for n in names:
            try:
                cells.append(fn(results[n]))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("label noise: AUROC (≥ 0.9)", lambda r: mean_std(s["auroc"] for s in r["noise"]))
    row("precision at the default cut (≥ 0.7)", lambda r: mean_std(s["precision"] for s in r["noise"]))
    row("recall at the default cut (≥ 0.7)", lambda r: mean_std(s["recall"] for s in r["noise"]))
    row(
        "flagged / planted",
        lambda r: f"{statistics.mean(s['flagged'] for s in r['noise']):.0f} / {r['noise'][0]['planted']}",
    )
    row("k-fold accuracy (noisy labels)", lambda r: mean_std(s["kfold_accuracy"] for s in r["noise"]))
    for t in THRESHOLDS:
        row(
            f"duplicates at {t}: found (≥ 0.95) / false pairs (share of flagged ≤ 0.01) / pairs among originals",
            lambda r, t=t: (
                "{found:.3f} / {false_pairs} ({false_share_of_flagged:.3f}) / {pairs_among_originals}".format(
                    **r["duplicates"]["by_threshold"][str(t)]
                )
            ),
        )
    row("audit, warm cache (s)", lambda r: f"{r['timing']['audit_warm']:.1f}")
    row("head-only run, warm cache (s)", lambda r: f"{r['timing']['head_warm']:.1f}")
    row("audit / head-only run (≤ 2)", lambda r: f"{r['timing']['ratio']:.2f}")
    for which in ("last", "best"):
        row(
            f"val acc ({which} epoch): clean / noisy / cleaned",
            lambda r, w=which: (
                f"{r['accuracy'][w]['clean']:.4f} / {r['accuracy'][w]['noisy']:.4f} / {r['accuracy'][w]['cleaned']:.4f}"
            ),
        )
        row(
            f"share of lost accuracy recovered ({which}; ≥ 0.5)",
            lambda r, w=which: f"{r['accuracy'][w]['recovered']:.2f}",
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(ROOTS), choices=list(ROOTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["noise", "duplicates", "timing", "accuracy"],
        choices=["noise", "duplicates", "timing", "accuracy"],
    )
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--copies", type=int, default=60, help="planted near-duplicates per dataset")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache", help="feature cache (data.cache.dir)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    saved = args.out / "audit.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for name in args.datasets:
        root = DATASETS / ROOTS[name]
        if not root.is_dir():
            raise SystemExit(f"{name} not found at {root} (FINETUNE_DATASETS=DIR)")
        classes, rows = base_split(name)
        result = results.setdefault(name, {})
        if "noise" in args.parts or "accuracy" in args.parts:
            result["noise"] = part_noise(name, classes, rows, args.seeds, args.noise, args.out, args.cache)
        if "duplicates" in args.parts:
            result["duplicates"] = part_duplicates(
                name, classes, rows, args.seeds[0], args.copies, args.out, args.cache
            )
        if "timing" in args.parts:
            result["timing"] = part_timing(name, root, args.out, args.cache)
        if "accuracy" in args.parts:
            result["accuracy"] = part_accuracy(name, classes, rows, result["noise"], args.out, args.cache)
        saved.write_text(json.dumps(results, indent=2))
    text = table(results)
    (args.out / "audit.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
