"""Predictions you can trust, measured: temperature scaling, abstaining at a target precision,
conformal prediction sets, and PyTorch/ONNX agreement on all of them.

    python benchmarks/trust.py                                   # every dataset, both recipes
    python benchmarks/trust.py --datasets hymenoptera_data --recipes head --seeds 0

Per dataset and seed, all images are split once (stratified, seeded) into train 50% / val 20% /
test 30% and written as a manifest (``data=csv``, split column) that both recipes train on:

- ``head``: ``+recipe=freeze_all_but_head`` (10 epochs); ``full``: ``+recipe=full_finetune``
  (--full-epochs). The run fits the temperature on val (finetune's own end of run) and picks
  its checkpoint on val; the test split is touched by neither.
- ECE (15 bins), NLL and Brier on test, softmax vs softmax(logits / T), from the logits
  ``finetune.load`` gives (its image pipeline, full precision).
- ``target_precision=0.99`` (and 0.95): the threshold the checkpoint's stored val confidences give
  (``finetune.use.confidence``, with its one-standard-error margin; refused when val cannot show
  the target), then precision and coverage of the accepted test images; beside it the plain
  threshold without the margin, to show what the margin is for.
- Conformal sets at coverage 0.9 (``lac`` and ``aps``): 50 random halvings of test into a
  calibration half and an evaluation half; empirical coverage and mean set size on the second.
- ONNX: the model exported with that rule (``finetune.use.export``), run by onnxruntime on every
  test image; the share of images whose answer (class or unknown) and set match PyTorch's.

Writes --out/trust.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FINETUNE_DATASETS", REPO.parent / "shared" / "datasets"))
RESULTS = REPO / "benchmarks" / "results" / "trust"
RECIPES = {"head": ["+recipe=freeze_all_but_head", "trainer.max_epochs=10"], "full": ["+recipe=full_finetune"]}
# flowers5's photos are 128 px: fine-tune them at that size (the others at lite0's 224)
IMAGE_SIZE = {"flowers5": 128}
RESPLITS, COVERAGE, TARGET = 50, 0.9, 0.99
LOWER_TARGET = 0.95  # one a few hundred validation images can show


def all_images(root: Path) -> list[tuple[str, str]]:
    """(path, class) of every image under the class folders of `root` (or its train/ and val/)."""
    from finetune.data.images import IMAGE_EXTENSIONS

    tops = [root / "train", root / "val"] if (root / "train").is_dir() else [root]
    return sorted(
        (str(p), p.parent.name) for top in tops for p in top.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS
    )


def write_split(images: list[tuple[str, str]], seed: int, path: Path) -> dict[str, list[tuple[str, str]]]:
    """A stratified 50/20/30 train/val/test split of `images`, written as a manifest at `path`."""
    by_class: dict[str, list] = {}
    for item in images:
        by_class.setdefault(item[1], []).append(item)
    splits = {"train": [], "val": [], "test": []}
    rng = random.Random(seed)
    for items in by_class.values():
        rng.shuffle(items)
        n_val, n_test = round(0.2 * len(items)), round(0.3 * len(items))
        splits["val"] += items[:n_val]
        splits["test"] += items[n_val : n_val + n_test]
        splits["train"] += items[n_val + n_test :]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for split, items in splits.items():
            writer.writerows([p, c, split] for p, c in items)
    return splits


def plain_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """The lowest confidence whose accepted images' plain precision reaches `target` (no margin)."""
    order = np.argsort(-confidence, kind="stable")
    precision = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    reached = np.flatnonzero(precision >= target)
    return float(confidence[order][reached[-1]]) if len(reached) else None


def score_model(checkpoint: Path, test: list[tuple[str, str]], seed: int) -> dict:
    """Everything the module docstring lists, for one trained model on its test images."""
    from finetune.data.images import load_rgb
    from finetune.errors import ConfigError
    from finetune.use.calibration import calibration_scores
    from finetune.use.confidence import (
        DecisionRule,
        conformal_scores,
        conformal_threshold,
        decision_rule,
        precision_lower_bounds,
        prediction_sets,
    )
    from finetune.use.export import decisions, export
    from finetune.use.load import load

    model = load(checkpoint)
    images = [load_rgb(p) for p, _ in test]
    labels = torch.tensor([model.classes.index(c) for _, c in test])
    logits = model.logits(images)
    before = calibration_scores(logits.softmax(1), labels)
    probabilities = (logits / model.temperature).softmax(1)
    after = calibration_scores(probabilities, labels)

    correct = (probabilities.argmax(1) == labels).numpy()
    confidence = probabilities.max(1).values.numpy()

    def answered(threshold: float) -> dict:
        accepted = confidence >= threshold
        return {
            "min_confidence": threshold,
            "coverage": float(accepted.mean()),
            "precision": float(correct[accepted].mean()) if accepted.any() else None,
        }

    def at_target(target: float) -> dict:
        try:
            return answered(decision_rule(model.trust, model.task, target_precision=target).min_confidence)
        except ConfigError as refused:  # the validation split cannot show `target`
            return {"refused": str(refused)}

    abstain = at_target(TARGET)
    abstain[str(LOWER_TARGET)] = at_target(LOWER_TARGET)
    # ONNX parity abstains at the 0.99 threshold, else the 0.95 one: answers include "unknown"
    rule = DecisionRule(abstain.get("min_confidence", abstain[str(LOWER_TARGET)].get("min_confidence")))
    val = model.trust["val"]
    abstain["supported"] = float(precision_lower_bounds(val["confidence"], val["correct"])[1].max())
    # without the margin: the lowest threshold whose plain validation precision reaches TARGET
    plain = plain_threshold(np.asarray(val["confidence"]), np.asarray(val["correct"]), TARGET)
    if plain is not None:
        abstain["plain"] = answered(plain)

    rng = np.random.default_rng(seed)
    p, y = probabilities.numpy(), labels.numpy()
    sets = {}
    for score in ("lac", "aps"):
        coverage, size = [], []
        for _ in range(RESPLITS):
            order = rng.permutation(len(y))
            cal, ev = order[: len(y) // 2], order[len(y) // 2 :]
            threshold = conformal_threshold(conformal_scores(p[cal], y[cal], score), COVERAGE)
            chosen = prediction_sets(p[ev], threshold, score)
            coverage.append(float(chosen[np.arange(len(ev)), y[ev]].mean()))
            size.append(float(chosen.sum(1).mean()))
        sets[score] = {
            "coverage_mean": statistics.mean(coverage),
            "coverage_std": statistics.stdev(coverage),
            "size_mean": statistics.mean(size),
        }

    # ONNX: rules with target-precision abstaining and lac (then aps) sets calibrated on one half of
    # test, compared on the other half, both ways round: every test image, never under a threshold
    # its own score set.
    with tempfile.TemporaryDirectory() as tmp:
        import onnxruntime as ort

        exported = export(model, "onnx", Path(tmp), model.preprocess(images[:8]), rule=rule)
        session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
        onnx_logits = torch.cat(
            [
                torch.from_numpy(session.run(None, {"images": model.preprocess(images[i : i + 32]).numpy()})[0])
                for i in range(0, len(images), 32)
            ]
        )
    first = np.arange(len(y)) < len(y) // 2
    same = {"lac": [], "aps": []}
    for cal, ev in ((first, ~first), (~first, first)):
        for score in same:
            threshold = conformal_threshold(conformal_scores(p[cal], y[cal], score), COVERAGE)
            parity_rule = DecisionRule(rule.min_confidence, score, threshold, COVERAGE)
            same[score] += (
                (decisions(model, onnx_logits[ev], parity_rule) == decisions(model, logits[ev], parity_rule))
                .all(dim=1)
                .tolist()
            )
    onnx = {
        "images": len(y),
        "same_answer_and_set": float(np.mean(same["lac"])),
        "same_aps": float(np.mean(same["aps"])),
        "max_abs_logit_diff": float((onnx_logits - logits).abs().max()),
        "unknown_under_the_rule": int((rule.answers(p) < 0).sum()),
    }
    return {
        "test_images": len(y),
        "accuracy": float((probabilities.argmax(1) == labels).float().mean()),
        "temperature": model.temperature,
        "before": before,
        "after": after,
        "abstain": abstain,
        "sets": sets,
        "onnx": onnx,
    }


def run_one(dataset: str, recipe: str, seed: int, args, results: dict) -> None:
    from finetune import fit

    key = f"{dataset}/{recipe}/{seed}"
    work = args.out / dataset / f"seed{seed}"
    if key in results["runs"] and args.rescore:  # score the saved model again, without training
        with (work / "split.csv").open() as f:
            test = [(r["path"], r["label"]) for r in csv.DictReader(f) if r["split"] == "test"]
        results["runs"][key].update(score_model(work / recipe / "checkpoints" / "best.ckpt", test, seed))
        print(f"{key}: scored again")
        return
    if key in results["runs"] and not args.rerun:
        print(f"{key}: done already")
        return
    work.mkdir(parents=True, exist_ok=True)
    splits = write_split(all_images(DATASETS / dataset), seed, work / "split.csv")
    overrides = RECIPES[recipe] + [
        "data=csv",
        f"data.csv={work / 'split.csv'}",
        "data.split_column=split",
        f"seed={seed}",
        "logger=none",
        "viz=none",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        f"hydra.run.dir={work / recipe}",
        "overwrite=true",
    ]
    if recipe == "full":
        overrides.append(f"trainer.max_epochs={args.full_epochs}")
    if dataset in IMAGE_SIZE:
        overrides.append(f"data.image_size={IMAGE_SIZE[dataset]}")
    started = time.perf_counter()
    result = fit(overrides=overrides)
    trained = time.perf_counter() - started
    scored = score_model(result.best_checkpoint, splits["test"], seed)
    scored.update(
        {"val_acc": result.metrics.get("val/acc"), "train_s": trained, "sizes": {k: len(v) for k, v in splits.items()}}
    )
    results["runs"][key] = scored
    print(
        f"{key}: T {scored['temperature']:.3f}, ECE {scored['before']['ece']:.4f} -> {scored['after']['ece']:.4f}, "
        f"NLL {scored['before']['nll']:.4f} -> {scored['after']['nll']:.4f}; precision@{TARGET} "
        f"{scored['abstain'].get('precision', 'refused')} at coverage {scored['abstain'].get('coverage')}; lac "
        f"coverage "
        f"{scored['sets']['lac']['coverage_mean']:.3f} size {scored['sets']['lac']['size_mean']:.2f}; onnx same "
        f"{scored['onnx']['same_answer_and_set']:.3f}"
    )


def table(results: dict) -> str:
    rows = [
        "| data | recipe | seeds | test imgs | acc | T | ECE before → after (drop) | NLL before → after | "
        f"target_precision={TARGET}: precision (coverage) on test | without the margin | "
        f"target_precision={LOWER_TARGET} | lac: coverage, set size | aps: coverage, set size | ONNX same |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for key, run in results["runs"].items():
        dataset, recipe, _ = key.split("/")
        groups.setdefault((dataset, recipe), []).append(run)

    def ms(values, fmt=".3f"):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return f"{statistics.mean(values):{fmt}}" + (f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else "")

    def abstained(runs, variant=None):
        chosen = [(r["abstain"].get(variant) if variant else r["abstain"]) or {} for r in runs]
        given = [c for c in chosen if "precision" in c]
        text = f"{ms([c['precision'] for c in given])} ({ms([c['coverage'] for c in given])})" if given else ""
        refused = len(chosen) - len(given)
        if refused:
            most = max(r["abstain"].get("supported", 0.0) for r in runs)
            text += f"{'; ' if text else ''}{refused} of {len(runs)} refused (val supports ≤ {most:.3f})"
        return text

    for (dataset, recipe), runs in sorted(groups.items()):
        drop = [1 - r["after"]["ece"] / r["before"]["ece"] for r in runs if r["before"]["ece"]]
        rows.append(
            f"| {dataset} | {recipe} | {len(runs)} | {runs[0]['test_images']} | {ms([r['accuracy'] for r in runs])} | "
            f"{ms([r['temperature'] for r in runs], '.2f')} | {ms([r['before']['ece'] for r in runs])} → "
            f"{ms([r['after']['ece'] for r in runs])} ({ms(drop, '.0%')}) | {ms([r['before']['nll'] for r in runs])} → "
            f"{ms([r['after']['nll'] for r in runs])} | {abstained(runs)} | {abstained(runs, 'plain')} | "
            f"{abstained(runs, str(LOWER_TARGET))} | "
            f"{ms([r['sets']['lac']['coverage_mean'] for r in runs])}, "
            f"{ms([r['sets']['lac']['size_mean'] for r in runs], '.2f')} | "
            f"{ms([r['sets']['aps']['coverage_mean'] for r in runs])}, "
            f"{ms([r['sets']['aps']['size_mean'] for r in runs], '.2f')} | "
            f"{ms([r['onnx']['same_answer_and_set'] for r in runs], '.0%')} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["hymenoptera_data", "flowers5", "dtd10"])
    parser.add_argument("--recipes", nargs="+", default=["head", "full"], choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--full-epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rerun", action="store_true", help="train again the runs already in the json")
    parser.add_argument("--rescore", action="store_true", help="score the saved models of the runs in the json again")
    args = parser.parse_args()
    for dataset in args.datasets:
        if not (DATASETS / dataset).is_dir():
            raise SystemExit(f"{DATASETS / dataset} not found (FINETUNE_DATASETS=DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "trust.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    for seed in args.seeds:
        for dataset in args.datasets:
            for recipe in args.recipes:
                run_one(dataset, recipe, seed, args, results)
                path.write_text(json.dumps(results, indent=2))
                (args.out / "trust.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
