"""finetune against the plain PyTorch loop a user would write, side by side, on the same data.

    python benchmarks/speed.py                      # head-only and full fine-tuning, 10 epochs
    python benchmarks/speed.py --modes head --sweep 20
    python benchmarks/speed.py --modes full --epochs 5 --seeds 0 1 2

Both sides use hymenoptera (ants vs bees), tf_efficientnet_lite0 with the same embedded ImageNet
weights, batch 32, the backbone's input size, SGD (momentum 0.9, lr 0.01 head-only / 0.001 full),
StepLR(7, 0.1), random resized crop + flip, and report the best epoch's val accuracy.

- The plain loop is the PyTorch transfer-learning tutorial's: torchvision ImageFolder + PIL
  transforms, 2 DataLoader workers, fp32, NCHW, a validation pass every epoch. Head-only, it
  re-runs the frozen backbone (eval mode, no_grad) on every batch of every epoch.
- finetune is `finetune.fit` with the recipe and its defaults (feature cache, precision, memory
  layout and `data.num_workers` resolved for this machine), pictures and loggers off. Its time includes
  everything the call does: data check, model build, cache fill (cold: a fresh cache folder).
- `--seeds`: each side runs once per seed; the table shows mean +- std of the best val accuracy
  (a 153-image val set moves 0.0065 per image, so one seed cannot show a 0.01 difference) and
  the mean wall time.
- `--sweep N`: N more head-only `fit` calls (learning rate x weight decay grid) on the warm cache,
  timed together in one process: what an N-trial sweep costs after its first trial.
- Every run (and the sweep) is a fresh process: a run after another in the same process was 20%
  slower here (allocator and thread-pool state), which would favour whichever side runs first.

Writes benchmarks/results/speed.{md,json}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import add_data_and_out, check_data_and_out  # benchmarks/common.py, beside this script
from torch import nn

BACKBONE = "tf_efficientnet_lite0"
LR = {"head": 0.01, "full": 0.001}
RECIPE = {"head": "freeze_all_but_head", "full": "full_finetune"}


def isolated(fn, *args):
    """`fn(*args)` in a fresh Python process (spawned, not daemonic: DataLoader workers allowed)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(results, fn, args))
    process.start()
    ok, value = results.get()
    process.join()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in its process:\n{value}")
    return value


def _child(results, fn, args) -> None:
    import traceback

    # DataLoader workers start as they would from a shell on Linux (a spawned process would spawn
    # them too, re-importing torch in each: 17 s per loader here).
    multiprocessing.set_start_method("fork", force=True)
    try:
        results.put((True, fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((False, traceback.format_exc()))


def plain_loop(data: Path, mode: str, epochs: int, batch_size: int, workers: int, seed: int) -> dict:
    """The tutorial loop. Returns best val accuracy, seconds, train images/s."""
    from torchvision import datasets, transforms

    from finetune.model.backbone import build_backbone

    torch.manual_seed(seed)
    backbone = build_backbone(BACKBONE, "pretrained")
    cfg = backbone.data_config
    size = cfg["input_size"][-1]
    normalize = transforms.Normalize(cfg["mean"], cfg["std"])
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(math.floor(size / cfg["crop_pct"])),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    train = torch.utils.data.DataLoader(
        datasets.ImageFolder(data / "train", train_tf), batch_size=batch_size, shuffle=True, num_workers=workers
    )
    val = torch.utils.data.DataLoader(
        datasets.ImageFolder(data / "val", val_tf), batch_size=batch_size, num_workers=workers
    )
    features, head = backbone.model, nn.Linear(backbone.num_features, len(train.dataset.classes))
    model = nn.Sequential(features, head)
    params = head.parameters() if mode == "head" else model.parameters()
    if mode == "head":
        for p in features.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.SGD(params, lr=LR[mode], momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)

    best, started, train_seconds = 0.0, time.perf_counter(), 0.0
    for _ in range(epochs):
        model.train()
        if mode == "head":
            features.eval()  # frozen BatchNorm keeps its ImageNet statistics
        epoch_started = time.perf_counter()
        for images, labels in train:
            if mode == "head":
                with torch.no_grad():
                    pooled = features(images)
                logits = head(pooled)
            else:
                logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train_seconds += time.perf_counter() - epoch_started
        scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in val:
                correct += (model(images).argmax(1) == labels).sum().item()
        best = max(best, correct / len(val.dataset))
    seconds = time.perf_counter() - started
    return {"val_acc": best, "seconds": seconds, "train_images_per_s": epochs * len(train.dataset) / train_seconds}


def finetune_run(
    data: Path, mode: str, epochs: int, batch_size: int, seed: int, cache: Path, run_dir: Path, overrides: list[str]
) -> dict:
    from finetune import fit

    started = time.perf_counter()
    result = fit(
        RECIPE[mode],
        list(overrides),
        data="folder",
        data__root=data,
        seed=seed,
        backbone__name=BACKBONE,
        trainer__max_epochs=epochs,
        data__batch_size=batch_size,
        optimizer__lr=LR[mode],
        data__cache__dir=cache,
        logger="none",
        viz="none",
        callbacks__progress_bar=False,
        hydra__run__dir=run_dir,
    )
    return {"val_acc": result.metrics["val/acc"], "seconds": time.perf_counter() - started}


def sweep(
    data: Path, trials: int, epochs: int, batch_size: int, seed: int, cache: Path, out: Path, overrides: list[str]
) -> dict:
    from finetune import fit

    grid = list(itertools.product([0.003, 0.01, 0.03, 0.1, 0.3], [0.0, 1e-4, 1e-3, 1e-2]))[:trials]
    started, accs = time.perf_counter(), []
    for i, (lr, wd) in enumerate(grid):
        result = fit(
            RECIPE["head"],
            list(overrides),
            data="folder",
            data__root=data,
            seed=seed,
            backbone__name=BACKBONE,
            trainer__max_epochs=epochs,
            data__batch_size=batch_size,
            optimizer__lr=lr,
            optimizer__weight_decay=wd,
            data__cache__dir=cache,
            logger="none",
            viz="none",
            callbacks__progress_bar=False,
            hydra__run__dir=out / f"trial{i}",
        )
        accs.append(result.metrics["val/acc"])
    return {"trials": len(grid), "seconds": time.perf_counter() - started, "best_val_acc": max(accs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_and_out(parser)
    parser.add_argument("--modes", nargs="*", default=["head", "full"], choices=["head", "full"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="the plain loop's DataLoader workers")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sweep", type=int, default=0, help="trials of a warm-cache head-only sweep to time")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the finetune runs")
    args = parser.parse_args()
    check_data_and_out(args)
    cache = Path(tempfile.mkdtemp(prefix="finetune-speed-cache-"))  # cold: the fill is part of the time

    rows = []
    for mode in args.modes:
        runs = {"plain": [], "finetune": []}
        for seed in args.seeds:
            runs["plain"].append(
                isolated(plain_loop, args.data, mode, args.epochs, args.batch_size, args.workers, seed)
            )
            print(
                f"{mode}, seed {seed}: plain loop val/acc {runs['plain'][-1]['val_acc']:.4f} in "
                f"{runs['plain'][-1]['seconds']:.0f} s",
                flush=True,
            )
            seed_cache = cache / f"seed{seed}"  # every seed starts cold, like its first run would
            runs["finetune"].append(
                isolated(
                    finetune_run,
                    args.data,
                    mode,
                    args.epochs,
                    args.batch_size,
                    seed,
                    seed_cache,
                    args.out / "runs" / f"speed-{mode}-{seed}",
                    args.overrides,
                )
            )
            print(
                f"{mode}, seed {seed}: finetune   val/acc {runs['finetune'][-1]['val_acc']:.4f} in "
                f"{runs['finetune'][-1]['seconds']:.0f} s",
                flush=True,
            )
        plain, ours = (summarize(runs[side]) for side in ("plain", "finetune"))
        rows.append(
            {
                "mode": mode,
                "seeds": args.seeds,
                "runs": runs,
                "plain": plain,
                "finetune": ours,
                "time_ratio": ours["seconds"] / plain["seconds"],
                "val_acc_difference": ours["val_acc"] - plain["val_acc"],
            }
        )
    if args.sweep:
        swept = isolated(
            sweep,
            args.data,
            args.sweep,
            args.epochs,
            args.batch_size,
            args.seeds[0],
            cache / f"seed{args.seeds[0]}",
            args.out / "runs" / "speed-sweep",
            args.overrides,
        )
        head = next((r for r in rows if r["mode"] == "head"), None)
        if head:
            cold = head["runs"]["finetune"][0]["seconds"]  # the sweep's seed, on the cache it filled
            swept["cold_run_seconds"] = cold
            swept["ratio_to_one_cold_run"] = (swept["seconds"] + cold) / cold
        rows.append({"mode": "sweep", **swept})
        print(f"sweep: {swept['trials']} warm-cache trials in {swept['seconds']:.0f} s", flush=True)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        f"hymenoptera, {BACKBONE}, batch {args.batch_size}, {args.epochs} epochs, {args.workers} workers "
        f"(plain loop; finetune: its default), seeds {seeds}; {machine}",
        "",
        "| job | plain loop: val acc, s | finetune: val acc, s | time ratio | val acc difference |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["mode"] == "sweep":
            ratio = r.get("ratio_to_one_cold_run")
            lines.append(
                f"| head-only sweep: 1 cold + {r['trials']} warm-cache trials | | best {r['best_val_acc']:.3f}, "
                f"{r['seconds']:.0f} s for the {r['trials']} | "
                f"{'' if ratio is None else f'{ratio:.2f}x one cold run'} | |"
            )
            continue
        p, f = r["plain"], r["finetune"]
        lines.append(
            f"| {'head-only' if r['mode'] == 'head' else 'full fine-tuning'} | {p['val_acc']:.3f} "
            f"± {p['val_acc_std']:.3f}, {p['seconds']:.0f} | {f['val_acc']:.3f} ± {f['val_acc_std']:.3f}, "
            f"{f['seconds']:.0f} | {r['time_ratio']:.2f} | {r['val_acc_difference']:+.3f} |"
        )
    table = "\n".join(lines)
    (args.out / "speed.json").write_text(json.dumps(rows, indent=2))
    (args.out / "speed.md").write_text(table + "\n")
    print(table)


def summarize(runs: list[dict]) -> dict:
    """Mean best val accuracy (and its sample std) and mean seconds over seeds."""
    accs = [r["val_acc"] for r in runs]
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
    return {"val_acc": mean, "val_acc_std": std, "seconds": sum(r["seconds"] for r in runs) / len(runs)}


if __name__ == "__main__":
    main()
