"""Multi-label on pokemon_types (1,016 artworks, 18 types, 1 or 2 per image): a linear probe on frozen
features, the floor, against finetune runs with ``task=multilabel``.

    python benchmarks/multilabel.py                                  # the probe only, seeds 0 1 2
    python benchmarks/multilabel.py --arms 'head=+recipe=freeze_all_but_head trainer.max_epochs=10' \\
                                           'full=+recipe=full_finetune trainer.max_epochs=10'
    python benchmarks/multilabel.py --no-probe --arms ...            # keep the probe rows already in the json

Per seed, one 80/20 split of the 1,016 rows (``finetune.data.labels.multilabel_split`` when it
exists, else a seeded shuffle; the script says which), written as a manifest
``--out/split_seed{N}.csv`` (``file,labels,split``, paths relative to ``images/``) that every arm
of that seed trains and scores on.

probe: lite0 with its embedded ImageNet weights (``backbone_from_config``), finetune's evaluation
pipeline at 224 px on ``load_rgb`` images (transparency on white), pooled features computed once;
then standardized features -> one-vs-rest logistic regression, C chosen by 3-fold CV on the
training split (macro AP) over --cs. ``finetune:NAME`` arms: ``finetune.fit`` with the arm's
Hydra overrides plus the manifest, ``task=multilabel``, the seed; their metrics are read back from
``FitResult.metrics`` and ``summary.json`` (an arm whose fit raises is reported and skipped).

Metrics on the val split: macro AP (mAP, over labels with a positive in val), micro-F1, macro-F1
and exact-set accuracy at threshold 0.5, per-label AP. Writes --out/multilabel.{json,md}; a
finetune run already in the json with the same overrides is not rerun (--rerun to force).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FINETUNE_DATASETS", REPO.parent / "shared" / "datasets"))
RESULTS = REPO / "benchmarks" / "results" / "multilabel"
HEADLINE = [("map", "mAP"), ("f1_micro", "micro-F1@0.5"), ("f1_macro", "macro-F1@0.5"), ("exact", "exact@0.5")]
TUNED = [("f1_micro_tuned", "micro-F1 tuned"), ("f1_macro_tuned", "macro-F1 tuned"), ("exact_tuned", "exact tuned")]
FIT_KEYS = ["map", "f1_micro", "f1_macro", "exact", "f1_micro_tuned", "exact_tuned", "f1_macro_tuned"]


# ---------------------------------------------------------------- data and splits

def read_labels(root: Path) -> tuple[list[str], list[tuple[str, ...]], list[str]]:
    """(files, label tuple per file, sorted label names) from ``root/labels.csv``."""
    with (root / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    files = [r["file"] for r in rows]
    sets = [tuple(dict.fromkeys(r["labels"].split())) for r in rows]
    missing = [f for f in files if not (root / "images" / f).is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} files of labels.csv are not in {root / 'images'} (e.g. {missing[0]})")
    return files, sets, sorted({label for s in sets for label in s})


def split(label_sets: list[tuple[int, ...]], val_fraction: float, seed: int) -> tuple[list[int], list[int], str]:
    """(train, val, method): finetune's label-aware split when it exists, else a seeded shuffle."""
    try:
        from finetune.data.labels import multilabel_split
    except ImportError:
        multilabel_split = None
    if multilabel_split is not None:
        train, val = multilabel_split(label_sets, val_fraction, seed)
        train, val, method = sorted(int(i) for i in train), sorted(int(i) for i in val), "finetune.data.labels.multilabel_split"
    else:
        order = list(range(len(label_sets)))
        random.Random(seed).shuffle(order)
        n_val = round(val_fraction * len(order))
        train, val, method = sorted(order[n_val:]), sorted(order[:n_val]), "seeded shuffle (no multilabel_split yet)"
    if set(train) & set(val) or sorted(train + val) != list(range(len(label_sets))):
        raise SystemExit(f"{method} returned overlapping or incomplete index lists ({len(train)} + {len(val)})")
    return train, val, method


def write_manifest(path: Path, files: list[str], sets: list[tuple[str, ...]], val: list[int]) -> None:
    val_set = set(val)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "labels", "split"])
        for i, (file, labels) in enumerate(zip(files, sets)):
            writer.writerow([file, " ".join(labels), "val" if i in val_set else "train"])


# ---------------------------------------------------------------- metrics

def scores(y: np.ndarray, p: np.ndarray, labels: list[str]) -> dict:
    """Val metrics of probabilities `p` (N, L) against multi-hot `y` (N, L)."""
    from sklearn.metrics import average_precision_score, f1_score

    present = y.sum(0) > 0
    pred = (p >= 0.5).astype(int)
    ap = {labels[j]: float(average_precision_score(y[:, j], p[:, j])) for j in np.flatnonzero(present)}
    out = {
        "map": float(average_precision_score(y[:, present], p[:, present], average="macro")),
        "f1_micro": float(f1_score(y, pred, average="micro", zero_division=0)),
        # Over the labels with a positive in val, like mAP (all 18 whenever the split keeps every label in val).
        "f1_macro": float(f1_score(y[:, present], pred[:, present], average="macro", zero_division=0)),
        "exact": float((pred == y).all(1).mean()),
        "labels_in_val": int(present.sum()),
        "predicted_per_image": float(pred.sum(1).mean()),
        "no_label_predicted": float((pred.sum(1) == 0).mean()),
        "per_label_ap": ap,
        "val_positives": {labels[j]: int(y[:, j].sum()) for j in range(len(labels))},
    }
    return out


def macro_ap(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    present = y.sum(0) > 0
    return float(average_precision_score(y[:, present], p[:, present], average="macro"))


# ---------------------------------------------------------------- probe

def extract_features(root: Path, files: list[str], batch_size: int = 32) -> tuple[np.ndarray, dict]:
    """Pooled lite0 features (N, 1280) of every image, as finetune's eval pipeline sees it."""
    import torch

    from finetune.config import compose_config
    from finetune.data.images import load_rgb
    from finetune.data.transforms import build_transforms
    from finetune.model.build import backbone_from_config

    backbone = backbone_from_config(compose_config([]))
    _, eval_tf = build_transforms(backbone.data_config, {"random_resized_crop": False})
    model = backbone.model.eval()
    info = {"backbone": backbone.name, "num_features": backbone.num_features,
            "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in backbone.data_config.items()}}
    print(f"probe: {backbone.name}, {backbone.num_features} features, input {backbone.data_config['input_size']}, "
          f"crop_pct {backbone.data_config.get('crop_pct')}", flush=True)
    chunks = []
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(files), batch_size):
            batch = torch.stack([eval_tf(image=load_rgb(root / "images" / f))["image"]
                                 for f in files[start:start + batch_size]])
            chunks.append(model(batch).float().numpy())
    features = np.concatenate(chunks)
    if features.shape != (len(files), backbone.num_features):
        raise SystemExit(f"backbone returned {features.shape}, expected ({len(files)}, {backbone.num_features})")
    info["seconds"] = time.perf_counter() - started
    print(f"probe: features of {len(files)} images in {info['seconds']:.0f} s", flush=True)
    return features, info


def probe_model(c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=2000, C=c)))


def run_probe(x: np.ndarray, y: np.ndarray, train: list[int], val: list[int], cs: list[float], seed: int,
              labels: list[str]) -> dict:
    """C by 3-fold CV on train (macro AP), refit on all of train, scored on val."""
    import warnings

    from sklearn.model_selection import KFold

    started = time.perf_counter()
    x_tr, y_tr, x_val, y_val = x[train], y[train], x[val], y[val]
    cv = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a fold without a rare label's positives: constant predictor
        for c in cs:
            fold_scores = []
            for fit_idx, score_idx in KFold(3, shuffle=True, random_state=seed).split(x_tr):
                model = probe_model(c).fit(x_tr[fit_idx], y_tr[fit_idx])
                fold_scores.append(macro_ap(y_tr[score_idx], model.predict_proba(x_tr[score_idx])))
            cv[c] = float(np.mean(fold_scores))
        best_c = max(cs, key=lambda c: cv[c])
        model = probe_model(best_c).fit(x_tr, y_tr)
    p = model.predict_proba(x_val)
    result = scores(y_val, p, labels)
    result.update({"C": best_c, "cv_map": {str(c): v for c, v in cv.items()}, **tuned(y_val, p)})
    result["seconds"] = time.perf_counter() - started
    return result


def tuned(y: np.ndarray, p: np.ndarray) -> dict:
    """Optimistic reference: per-label thresholds chosen on val itself to maximize each label's F1
    (the probe's counterpart of thresholds tuned on val; finetune's own tuning may differ)."""
    from sklearn.metrics import f1_score

    thresholds = []
    for j in range(y.shape[1]):
        candidates = np.unique(np.concatenate([p[:, j], [0.5]]))
        f1s = [f1_score(y[:, j], p[:, j] >= t, zero_division=0) for t in candidates]
        thresholds.append(float(candidates[int(np.argmax(f1s))]))
    pred = (p >= np.array(thresholds)).astype(int)
    present = y.sum(0) > 0
    return {"f1_micro_tuned": float(f1_score(y, pred, average="micro", zero_division=0)),
            "f1_macro_tuned": float(f1_score(y[:, present], pred[:, present], average="macro", zero_division=0)),
            "exact_tuned": float((pred == y).all(1).mean()),
            "tuned_how": "per-label F1-maximizing thresholds chosen on val (optimistic)"}


# ---------------------------------------------------------------- finetune arms

def parse_arm(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--arms {text!r}: expected NAME=OVERRIDES, e.g. 'head=+recipe=freeze_all_but_head'")
    return name.strip(), shlex.split(overrides)


def per_label_from(found, labels: list[str]) -> dict[str, float] | None:
    """The first {label: number} mapping covering the labels anywhere inside `found`."""
    if isinstance(found, dict):
        if found and set(found) <= set(labels) and all(isinstance(v, (int, float)) for v in found.values()):
            return {k: float(v) for k, v in found.items()}
        preferred = sorted(found, key=lambda k: (not ("ap" in str(k).lower()), str(k)))  # AP keys first
        for key in preferred:
            hit = per_label_from(found[key], labels)
            if hit:
                return hit
    if isinstance(found, list):
        if found and all(isinstance(r, dict) for r in found):
            for name_key in ("label", "class", "name"):
                for value_key in ("ap", "AP", "average_precision"):
                    if all(name_key in r and value_key in r for r in found):
                        return {str(r[name_key]): float(r[value_key]) for r in found}
    return None


def run_arm(fit, name: str, overrides: list[str], seed: int, manifest: Path, root: Path, out: Path,
            labels: list[str]) -> dict:
    run_dir = out / "runs" / name / f"seed{seed}"
    args = ["data=csv", f"data.csv={manifest}", f"data.root={root / 'images'}", "data.path_column=file",
            "data.label_column=labels", "data.split_column=split", 'data.label_sep=" "',
            *overrides, f"seed={seed}", "task=multilabel", "logger=csv", "viz=none",
            "callbacks.progress_bar=false", f"hydra.run.dir={run_dir}", "overwrite=true"]
    started = time.perf_counter()
    result = fit(None, args)
    seconds = time.perf_counter() - started
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    row = {k: metrics.get(f"val/{k}") for k in FIT_KEYS}
    summary_path = Path(result.output_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    multilabel = summary.get("multilabel")
    per_label = per_label_from(multilabel, labels) if multilabel is not None else None
    if per_label is None:  # metrics such as val/ap/fire or val/ap_fire
        keyed = {k.rsplit("/", 1)[-1].removeprefix("ap_"): v for k, v in metrics.items()
                 if k.startswith("val/ap") and k.rsplit("/", 1)[-1].removeprefix("ap_") in labels}
        per_label = keyed or None
    missing = [f"val/{k}" for k in FIT_KEYS[:4] if row[k] is None]
    print(f"  {name} seed {seed}: metrics keys {sorted(k for k in metrics if k.startswith('val/'))}; "
          f"summary.json 'multilabel': {'absent' if multilabel is None else type(multilabel).__name__}"
          f"{'' if multilabel is None else ' with keys ' + str(sorted(multilabel)) if isinstance(multilabel, dict) else ''}; "
          f"per-label AP {'found' if per_label else 'not found'}"
          + (f"; MISSING {missing}" if missing else ""), flush=True)
    return {**row, "per_label_ap": per_label, "all_val_metrics": {k: v for k, v in metrics.items() if k.startswith("val/")},
            "epoch": metrics.get("epoch"), "output_dir": str(result.output_dir), "seconds": seconds}


# ---------------------------------------------------------------- tables

def stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def tables(runs: list[dict], arms: list[str], labels: list[str], n_train: int, n_val: int, method: str) -> str:
    show_tuned = [(k, t) for k, t in TUNED if any(r.get(k) is not None for r in runs if r["arm"] != "probe")]
    columns = HEADLINE + show_tuned
    lines = [f"pokemon_types: {n_train} train / {n_val} val images per seed ({method}), 18 types. "
             "Val metrics, mean ± std over seeds (n: seeds); thresholds 0.5 unless 'tuned' (chosen on val, optimistic).",
             "", "| arm | " + " | ".join(t for _, t in columns) + " | n | s / seed |", "|---|" + "---|" * (len(columns) + 2)]
    for arm in arms:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        cells = []
        for key, _ in columns:
            values = [r[key] for r in rows if r.get(key) is not None]
            cells.append("-" if not values else "{:.3f} ± {:.3f}".format(*stats(values)))
        extra = f" (C {', '.join(str(r['C']) for r in rows)})" if arm == "probe" else ""
        lines.append(f"| `{arm}`{extra} | " + " | ".join(cells)
                     + f" | {len(rows)} | {statistics.mean(r['seconds'] for r in rows):.0f} |")
    probe = [r for r in runs if r["arm"] == "probe"]
    others = [a for a in arms if a != "probe" and any(r["arm"] == a and r.get("per_label_ap") for r in runs)]
    if probe or others:
        def mean_ap(arm, label):
            values = [r["per_label_ap"][label] for r in runs
                      if r["arm"] == arm and r.get("per_label_ap") and label in r["per_label_ap"]]
            return statistics.mean(values) if values else None

        val_pos = {lab: statistics.mean(r["val_positives"][lab] for r in probe) if probe else None for lab in labels}
        order = sorted(labels, key=lambda lab: -(mean_ap("probe", lab) or 0.0))
        shown = (["probe"] if probe else []) + others
        lines += ["", "Per-label AP on val, mean over seeds (sorted by the probe's AP)", "",
                  "| label | val positives | " + " | ".join(f"`{a}` AP" for a in shown) + " |",
                  "|---|---|" + "---|" * len(shown)]
        for lab in order:
            cells = ["-" if mean_ap(a, lab) is None else f"{mean_ap(a, lab):.3f}" for a in shown]
            pos = "-" if val_pos[lab] is None else f"{val_pos[lab]:.1f}"
            lines.append(f"| {lab} | {pos} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATASETS / "pokemon_types",
                        help="folder with images/ and labels.csv (default: ../shared/datasets/pokemon_types, "
                             "or FINETUNE_DATASETS=DIR)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--arms", nargs="*", default=[],
                        help="finetune arms NAME=OVERRIDES (space-separated Hydra overrides, quoted as one "
                             "argument); none (the default, or an empty string): the probe only")
    parser.add_argument("--no-probe", action="store_true", help="skip the probe (its rows in the json are kept)")
    parser.add_argument("--cs", nargs="*", type=float, default=[0.01, 0.1, 1.0], help="probe: C grid for the inner CV")
    parser.add_argument("--rerun", action="store_true", help="rerun finetune arms already in the json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.data / "labels.csv").is_file() or not (args.data / "images").is_dir():
        raise SystemExit(f"pokemon_types not found at {args.data} (--data DIR or FINETUNE_DATASETS=DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    arms = [parse_arm(a) for a in args.arms if a.strip()]
    started = time.perf_counter()

    files, name_sets, labels = read_labels(args.data)
    index = {lab: i for i, lab in enumerate(labels)}
    label_sets = [tuple(sorted(index[lab] for lab in s)) for s in name_sets]
    y = np.zeros((len(files), len(labels)), dtype=int)
    for i, s in enumerate(label_sets):
        y[i, list(s)] = 1
    print(f"{len(files)} images, {len(labels)} labels, {y.sum(1).mean():.2f} labels per image", flush=True)

    path = args.out / "multilabel.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    runs = [r for r in previous.get("runs", []) if not (r["arm"] == "probe" and not args.no_probe)]
    splits, methods, split_method = {}, set(), {}
    for seed in args.seeds:
        train, val, method = split(label_sets, args.val_fraction, seed)
        manifest = args.out / f"split_seed{seed}.csv"
        write_manifest(manifest, files, name_sets, val)
        no_val = [labels[j] for j in range(len(labels)) if y[val, j].sum() == 0]
        splits[seed] = (train, val, manifest)
        methods.add(method)
        split_method[seed] = method
        print(f"seed {seed}: {len(train)} train / {len(val)} val by {method} -> {manifest}"
              + (f"; labels without a val positive: {no_val}" if no_val else ""), flush=True)

    if not args.no_probe:
        features, info = extract_features(args.data, files)
        for seed in args.seeds:
            train, val, manifest = splits[seed]
            r = run_probe(features, y, train, val, args.cs, seed, labels)
            runs.append({"arm": "probe", "seed": seed, "manifest": str(manifest), "split": split_method[seed], **r,
                         "feature_seconds": info["seconds"], "backbone": info["backbone"]})
            print(f"probe seed {seed}: C={r['C']} (cv mAP {r['cv_map']}) mAP {r['map']:.4f} micro-F1 {r['f1_micro']:.4f} "
                  f"macro-F1 {r['f1_macro']:.4f} exact {r['exact']:.4f} ({r['predicted_per_image']:.2f} labels "
                  f"predicted per image, {100 * r['no_label_predicted']:.0f}% none) in {r['seconds']:.0f} s", flush=True)
            path.write_text(json.dumps({"labels": labels, "runs": runs}, indent=2))

    if arms:
        from finetune import fit
    failures = []
    for name, overrides in arms:
        arm = f"finetune:{name}"
        for seed in args.seeds:
            train, val, manifest = splits[seed]
            done = [r for r in runs if r["arm"] == arm and r["seed"] == seed and r.get("overrides") == overrides]
            if done and not args.rerun:
                print(f"{arm} seed {seed}: in {path} already (--rerun to run again)", flush=True)
                continue
            runs = [r for r in runs if not (r["arm"] == arm and r["seed"] == seed)]
            print(f"{arm} seed {seed}: fit {' '.join(overrides)}", flush=True)
            try:
                r = run_arm(fit, name, overrides, seed, manifest, args.data, args.out, labels)
            except BaseException as err:  # noqa: BLE001 - a Hydra error may exit; report and go on
                if isinstance(err, KeyboardInterrupt):
                    raise
                failures.append(f"{arm} seed {seed}: {type(err).__name__}: {err}")
                print(f"{arm} seed {seed} FAILED: {type(err).__name__}: {str(err).strip()[:1500]}", flush=True)
                break  # the other seeds would fail the same way; next arm
            runs.append({"arm": arm, "seed": seed, "overrides": overrides, "manifest": str(manifest),
                         "split": split_method[seed], **r})
            shown = ", ".join(f"{k} {r[k]:.4f}" for k in FIT_KEYS if r.get(k) is not None)
            print(f"{arm} seed {seed}: {shown} in {r['seconds']:.0f} s", flush=True)
            path.write_text(json.dumps({"labels": labels, "runs": runs}, indent=2))

    path.write_text(json.dumps({"labels": labels, "runs": runs}, indent=2))
    order = ["probe"] + list(dict.fromkeys([r["arm"] for r in runs if r["arm"] != "probe"]))
    seeds = set(args.seeds)
    text = tables([r for r in runs if r["seed"] in seeds], order, labels,
                  len(splits[args.seeds[0]][0]), len(splits[args.seeds[0]][1]), " / ".join(sorted(methods)))
    (args.out / "multilabel.md").write_text(text)
    print()
    print(text)
    if failures:
        print("failed arms:\n  " + "\n  ".join(failures))
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
