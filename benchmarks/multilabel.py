"""Multi-label on pokemon_types (1,016 artworks, 18 types, 1 or 2 per image; or any folder with
``images/`` and ``labels.csv``, e.g. benchmarks/flower_mosaics.py's): a linear probe on frozen
features, the floor, against finetune runs with ``task=multilabel``.

    python benchmarks/multilabel.py                                  # the probe only, seeds 0 1 2
    python benchmarks/multilabel.py --arms 'head=+recipe=freeze_all_but_head trainer.max_epochs=10' \\
                                           'full=+recipe=full_finetune trainer.max_epochs=10'
    python benchmarks/multilabel.py --no-probe --arms ...            # keep the probe rows already in the json

Per seed, one 80/20 split of the 1,016 rows (finetune's own: stratified by each image's rarest
label), written as a manifest ``--out/split_seed{N}.csv`` (``file,labels,split``, paths relative to
``images/``) that every arm of that seed trains and scores on.

probe: lite0 with its embedded ImageNet weights (``backbone_from_config``), finetune's evaluation
pipeline at 224 px on ``load_rgb`` images (transparency on white), pooled features computed once;
then standardized features -> one-vs-rest logistic regression, C chosen by 3-fold CV on the
training split (macro AP) over --cs. ``finetune:NAME`` arms: ``finetune.fit`` with the arm's
Hydra overrides plus the manifest, ``task=multilabel``, the seed; the best checkpoint is then
scored on the val images through ``finetune.load`` exactly as the probe's probabilities are.

Metrics on the val split, all from ``finetune.use.multilabel`` (what ``finetune evaluate``
prints): mAP over the labels with a positive in val; micro-F1, macro-F1 and exact-set accuracy at
0.5 and at tuned thresholds (tuned on one half of val, scored on the other, both ways); per-label
AP. Writes --out/multilabel.{json,md}; a finetune run already in the json with the same overrides
is not rerun (--rerun to force).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FINETUNE_DATASETS", REPO.parent / "shared" / "datasets"))
RESULTS = REPO / "benchmarks" / "results" / "multilabel"
HEADLINE = [("map", "mAP"), ("f1_micro", "micro-F1@0.5"), ("f1_macro", "macro-F1@0.5"), ("exact", "exact@0.5")]
TUNED = [
    ("f1_micro_tuned", "micro-F1 tuned f1"),
    ("f1_macro_tuned", "macro-F1 tuned f1"),
    ("exact_tuned", "exact tuned f1"),
    ("f1_micro_tuned_acc", "micro-F1 tuned acc"),
    ("f1_macro_tuned_acc", "macro-F1 tuned acc"),
    ("exact_tuned_acc", "exact tuned acc"),
]
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
    """(train, val, method): finetune's own split of label sets (stratified by each image's rarest
    label, as ``task=multilabel`` splits a manifest without a split column)."""
    from finetune.data.labels import rarest_label_keys
    from finetune.data.samples import stratified_split

    train, val = stratified_split(rarest_label_keys(label_sets), val_fraction, seed)
    return train, val, "finetune's split (stratified by each image's rarest label)"


def write_manifest(path: Path, files: list[str], sets: list[tuple[str, ...]], val: list[int]) -> None:
    val_set = set(val)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "labels", "split"])
        for i, (file, labels) in enumerate(zip(files, sets)):
            writer.writerow([file, " ".join(labels), "val" if i in val_set else "train"])


# ---------------------------------------------------------------- metrics


def scores(y: np.ndarray, p: np.ndarray, labels: list[str], seed: int, bounds: tuple[int, int | None]) -> dict:
    """Val metrics of probabilities `p` (N, L) against multi-hot `y` (N, L), computed by finetune's
    own report (``finetune evaluate``): mAP over the labels present, F1 and exact-set accuracy at
    0.5, per-label AP; and the same decisions at thresholds tuned on held-out images
    (:func:`heldout_thresholds`)."""
    from finetune.use.multilabel import multilabel_report

    report = multilabel_report(p, y, labels, [0.5] * len(labels))
    pred = p >= 0.5
    return {
        "map": report["map"],
        **report["at_0.5"],
        "predicted_per_image": float(pred.sum(1).mean()),
        "no_label_predicted": float((pred.sum(1) == 0).mean()),
        "per_label_ap": {k: v["ap"] for k, v in report["per_label"].items() if v["ap"] is not None},
        "per_label_f1": {k: v["f1"] for k, v in report["per_label"].items()},
        **heldout_thresholds(y, p, seed, "f1", bounds),
        **{f"{k}_acc": v for k, v in heldout_thresholds(y, p, seed, "accuracy", bounds).items()},
        **{f"{k}_any_count": v for k, v in heldout_thresholds(y, p, seed, "f1", (0, None)).items()},
    }


def heldout_thresholds(y: np.ndarray, p: np.ndarray, seed: int, objective: str, bounds: tuple[int, int | None]) -> dict:
    """Thresholds judged on images they were not tuned on: the val split in two seeded halves,
    finetune's tune_thresholds(objective) on each half applied to the other with finetune's
    decision rule (label-count `bounds` from the training images), decisions pooled. Returns
    micro/macro F1, exact-set accuracy and per-label F1 of those decisions (``*_tuned``)."""
    from finetune.use.multilabel import decision_scores, decisions, tune_thresholds

    order = np.random.default_rng(seed).permutation(len(y))
    halves = order[: len(y) // 2], order[len(y) // 2 :]
    pred = np.zeros_like(p, dtype=bool)
    for tune_on, apply_to in (halves, halves[::-1]):
        thresholds, _ = tune_thresholds(p[tune_on], y[tune_on], objective)
        pred[apply_to] = decisions(p[apply_to], thresholds, *bounds)
    tuned = decision_scores(pred, y)
    yb = y > 0.5
    per_label = [
        2 * (pred[:, j] & yb[:, j]).sum() / max(pred[:, j].sum() + yb[:, j].sum(), 1) for j in range(y.shape[1])
    ]
    return {f"{k}_tuned": v for k, v in tuned.items()} | {"per_label_f1_tuned": [float(v) for v in per_label]}


def macro_ap(y: np.ndarray, p: np.ndarray) -> float:
    from finetune.use.multilabel import multilabel_report

    return multilabel_report(p, y, [str(j) for j in range(y.shape[1])], [0.5] * y.shape[1])["map"]


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
    info = {
        "backbone": backbone.name,
        "num_features": backbone.num_features,
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in backbone.data_config.items()},
    }
    print(
        f"probe: {backbone.name}, {backbone.num_features} features, input {backbone.data_config['input_size']}, "
        f"crop_pct {backbone.data_config.get('crop_pct')}",
        flush=True,
    )
    chunks = []
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(files), batch_size):
            batch = torch.stack(
                [eval_tf(image=load_rgb(root / "images" / f))["image"] for f in files[start : start + batch_size]]
            )
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


def run_probe(
    x: np.ndarray, y: np.ndarray, train: list[int], val: list[int], cs: list[float], seed: int, labels: list[str]
) -> dict:
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
    result = scores(y_val, p, labels, seed, (int(y_tr.sum(1).min()), int(y_tr.sum(1).max())))
    result.update({"C": best_c, "cv_map": {str(c): v for c, v in cv.items()}})
    result["seconds"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- finetune arms


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--arms {text!r}: expected NAME=OVERRIDES, e.g. 'head=+recipe=freeze_all_but_head'")
    return name.strip(), shlex.split(overrides)


def run_arm(
    fit,
    name: str,
    overrides: list[str],
    seed: int,
    manifest: Path,
    root: Path,
    out: Path,
    labels: list[str],
    files: list[str],
    y: np.ndarray,
    val: list[int],
) -> dict:
    """One finetune run; its best checkpoint is then scored on the val images exactly as the probe
    is (``finetune.load`` probabilities, full precision), beside the run's own ``val/*`` metrics."""
    from finetune import load

    run_dir = out / "runs" / name / f"seed{seed}"
    args = [
        "data=csv",
        f"data.csv={manifest}",
        f"data.root={root / 'images'}",
        "data.path_column=file",
        "data.label_column=labels",
        "data.split_column=split",
        'data.label_sep=" "',
        *overrides,
        f"seed={seed}",
        "task=multilabel",
        "logger=csv",
        "viz=none",
        "callbacks.progress_bar=false",
        f"hydra.run.dir={run_dir}",
        "overwrite=true",
    ]
    started = time.perf_counter()
    result = fit(None, args)
    seconds = time.perf_counter() - started
    model = load(result.best_checkpoint)
    if model.classes != labels:
        raise SystemExit(f"the run's labels {model.classes} are not the data's {labels}")
    p = model.probabilities([str(root / "images" / files[i]) for i in val]).numpy()
    own = {k: float(v) for k, v in result.metrics.items() if k.startswith("val/")}
    return {
        **scores(y[val], p, labels, seed, (model.min_labels, model.max_labels)),
        "run_metrics": own,
        "epoch": result.metrics.get("epoch"),
        "output_dir": str(result.output_dir),
        "seconds": seconds,
    }


# ---------------------------------------------------------------- tables


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def tables(
    runs: list[dict],
    arms: list[str],
    labels: list[str],
    n_train: int,
    n_val: int,
    method: str,
    val_pos: dict[str, float],
    dataset: str = "pokemon_types",
) -> str:
    columns = HEADLINE + TUNED
    lines = [
        f"{dataset}: {n_train} train / {n_val} val images per seed ({method}), {len(labels)} labels. "
        "Val metrics, mean ± std over seeds (n: seeds); thresholds 0.5, or 'tuned': per-label thresholds "
        "tuned by finetune on one half of val and applied to the other (both ways), so never on the images scored.",
        "",
        "| arm | " + " | ".join(t for _, t in columns) + " | n | s / seed |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for arm in arms:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        cells = []
        for key, _ in columns:
            values = [r[key] for r in rows if r.get(key) is not None]
            cells.append("-" if not values else "{:.3f} ± {:.3f}".format(*stats(values)))
        extra = f" (C {', '.join(str(r['C']) for r in rows)})" if arm == "probe" else ""
        lines.append(
            f"| `{arm}`{extra} | "
            + " | ".join(cells)
            + f" | {len(rows)} | {statistics.mean(r['seconds'] for r in rows):.0f} |"
        )
    probe = [r for r in runs if r["arm"] == "probe"]
    others = [a for a in arms if a != "probe" and any(r["arm"] == a and r.get("per_label_ap") for r in runs)]
    if probe or others:

        def mean_ap(arm, label):
            values = [
                r["per_label_ap"][label]
                for r in runs
                if r["arm"] == arm and r.get("per_label_ap") and label in r["per_label_ap"]
            ]
            return statistics.mean(values) if values else None

        order = sorted(labels, key=lambda lab: -(mean_ap("probe", lab) or 0.0))
        shown = (["probe"] if probe else []) + others
        lines += [
            "",
            "Per-label AP on val, mean over seeds (sorted by the probe's AP)",
            "",
            "| label | val positives | " + " | ".join(f"`{a}` AP" for a in shown) + " |",
            "|---|---|" + "---|" * len(shown),
        ]
        for lab in order:
            cells = ["-" if mean_ap(a, lab) is None else f"{mean_ap(a, lab):.3f}" for a in shown]
            lines.append(f"| {lab} | {val_pos[lab]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        default=DATASETS / "pokemon_types",
        help="folder with images/ and labels.csv (default: ../shared/datasets/pokemon_types, or FINETUNE_DATASETS=DIR)",
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument(
        "--arms",
        nargs="*",
        default=[],
        help="finetune arms NAME=OVERRIDES (space-separated Hydra overrides, quoted as one "
        "argument); none (the default, or an empty string): the probe only",
    )
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
        print(
            f"seed {seed}: {len(train)} train / {len(val)} val by {method} -> {manifest}"
            + (f"; labels without a val positive: {no_val}" if no_val else ""),
            flush=True,
        )

    if not args.no_probe:
        features, info = extract_features(args.data, files)
        for seed in args.seeds:
            train, val, manifest = splits[seed]
            r = run_probe(features, y, train, val, args.cs, seed, labels)
            runs.append(
                {
                    "arm": "probe",
                    "seed": seed,
                    "manifest": str(manifest),
                    "split": split_method[seed],
                    **r,
                    "feature_seconds": info["seconds"],
                    "backbone": info["backbone"],
                }
            )
            print(
                f"probe seed {seed}: C={r['C']} (cv mAP {r['cv_map']}) mAP {r['map']:.4f} micro-F1 {r['f1_micro']:.4f} "
                f"macro-F1 {r['f1_macro']:.4f} exact {r['exact']:.4f} ({r['predicted_per_image']:.2f} labels "
                f"predicted per image, {100 * r['no_label_predicted']:.0f}% none) in {r['seconds']:.0f} s",
                flush=True,
            )
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
                r = run_arm(fit, name, overrides, seed, manifest, args.data, args.out, labels, files, y, val)
            except BaseException as err:  # noqa: BLE001 - a Hydra error may exit; report and go on
                if isinstance(err, KeyboardInterrupt):
                    raise
                failures.append(f"{arm} seed {seed}: {type(err).__name__}: {err}")
                print(f"{arm} seed {seed} FAILED: {type(err).__name__}: {str(err).strip()[:1500]}", flush=True)
                break  # the other seeds would fail the same way; next arm
            runs.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "overrides": overrides,
                    "manifest": str(manifest),
                    "split": split_method[seed],
                    **r,
                }
            )
            shown = ", ".join(f"{k} {r[k]:.4f}" for k in FIT_KEYS if r.get(k) is not None)
            print(f"{arm} seed {seed}: {shown} in {r['seconds']:.0f} s", flush=True)
            path.write_text(json.dumps({"labels": labels, "runs": runs}, indent=2))

    path.write_text(json.dumps({"labels": labels, "runs": runs}, indent=2))
    order = ["probe"] + list(dict.fromkeys([r["arm"] for r in runs if r["arm"] != "probe"]))
    seeds = set(args.seeds)
    val_pos = {lab: statistics.mean(int(y[splits[s][1], j].sum()) for s in args.seeds) for j, lab in enumerate(labels)}
    text = tables(
        [r for r in runs if r["seed"] in seeds],
        order,
        labels,
        len(splits[args.seeds[0]][0]),
        len(splits[args.seeds[0]][1]),
        " / ".join(sorted(methods)),
        val_pos,
        args.data.name,
    )
    (args.out / "multilabel.md").write_text(text)
    print()
    print(text)
    if failures:
        print("failed arms:\n  " + "\n  ".join(failures))
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
