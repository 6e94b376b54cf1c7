"""Training images/s on a GPU: synthetic limit, textbook loader, and finetune's data path.

    python benchmarks/gpu_throughput.py                     # resnet50 + lite0, a few minutes on one GPU
    python benchmarks/gpu_throughput.py --large             # also a ~2,000 px copy of the photos
    python benchmarks/gpu_throughput.py --device cpu --steps 2 --batch-size 8 --models test_resnet  # smoke test

For each backbone (random weights: speed does not depend on them), batch `--batch-size`:
- synthetic: random tensors already on the device, bf16 autocast + channels_last: the limit;
- plain fp32: torchvision ImageFolder + PIL transforms, fp32, NCHW (the tutorial's loop);
- plain bf16: the same loader, bf16 + channels_last;
- finetune: finetune's datamodule (albumentations, epoch sampler, uint8 batches normalized on the
  device) on files, bf16 + channels_last;
- finetune decoded: the same on the decoded-image cache (decode once, uint8 in RAM).
With `--large`, the photos are first re-encoded at ~2,000 px on the long side (in a temp folder)
and the loaders also run with `--few-workers` workers. Writes benchmarks/results/gpu_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "hymenoptera_data"


def train_steps(model: nn.Module, batches, steps: int, device: torch.device, fast: bool, warmup: int = 3) -> float:
    """Images/s over `steps` optimizer steps after `warmup`, pulling (images, labels, ...) from `batches`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    if fast:
        model.to(memory_format=torch.channels_last)
    seen, started = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, seen = time.perf_counter(), 0
        images, labels = next(batches)[:2]
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if images.dtype == torch.uint8:  # finetune's loaders: uint8 through the DataLoader, normalized here
            images = (images.float() - 127.5) / 127.5
        if fast:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def forever(loader):
    while True:
        yield from loader


def plain_loader(root: Path, size: int, batch_size: int, workers: int):
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.5,) * 3, (0.5,) * 3),
        ]
    )
    dataset = torch.utils.data.ConcatDataset([datasets.ImageFolder(root / s, tf) for s in ("train", "val")])
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=True,
        drop_last=True,
        persistent_workers=workers > 0,
    )


def finetune_loader(root: Path, size: int, batch_size: int, workers: int, decoded: bool):
    from dataclasses import replace

    from finetune.data.datamodule import ImageDataModule
    from finetune.data.decoded import decode_splits, stored_short_side
    from finetune.data.sources import load_folder
    from finetune.data.transforms import build_transforms

    splits = load_folder(str(root), "train", "val", 0.2, 0)
    splits = replace(splits, train=splits.train + splits.val)  # more images per epoch, as for the plain loader
    config = {
        "input_size": (3, size, size),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "crop_pct": 0.875,
        "interpolation": "bilinear",
    }
    if decoded:
        splits = decode_splits(splits, stored_short_side(size, size, 0.875), max(1, workers), {})
    train_tf, eval_tf = build_transforms(config, {"random_resized_crop": True, "hflip": 0.5}, seed=0, normalize=False)
    loader = ImageDataModule(splits, train_tf, eval_tf, batch_size, workers, seed=0).train_dataloader()
    return loader


def enlarge(source: Path, long_side: int = 2000) -> Path:
    """A copy of `source` with every image re-encoded at `long_side` px (JPEG, quality 90)."""
    import cv2
    from PIL import Image

    from finetune.data.images import UnreadableImage, load_rgb

    target = Path(tempfile.mkdtemp(prefix="hymenoptera-large-"))
    for path in sorted(source.rglob("*.jpg")):
        try:
            image = load_rgb(path)
        except UnreadableImage:
            continue
        h, w = image.shape[:2]
        scale = long_side / max(h, w)
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_CUBIC)).save(
            out, quality=90
        )
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("FINETUNE_HYMENOPTERA", DEFAULT_DATA)))
    parser.add_argument("--models", nargs="*", default=["resnet50", "tf_efficientnet_lite0"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--few-workers", type=int, default=4)
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    import timm

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    datasets = {"photos": args.data}
    if args.large:
        datasets["2000px"] = enlarge(args.data)
    rows = []
    for name in args.models:
        model = timm.create_model(name, pretrained=False, num_classes=2).to(device)
        size = model.pretrained_cfg["input_size"][-1]
        synthetic = iter(
            lambda: (torch.randn(args.batch_size, 3, size, size), torch.randint(0, 2, (args.batch_size,))), None
        )
        limit = train_steps(model, synthetic, args.steps, device, fast=True)
        rows.append(
            {"model": name, "data": "synthetic", "loader": "-", "workers": 0, "images_per_s": limit, "of_limit": 1.0}
        )
        print(f"{name}: synthetic limit {limit:.0f} img/s", flush=True)
        for data_name, root in datasets.items():
            worker_counts = [args.workers] + ([args.few_workers] if data_name != "photos" else [])
            for workers in worker_counts:
                loaders = {
                    "plain fp32": (lambda: plain_loader(root, size, args.batch_size, workers), False),
                    "plain bf16+cl": (lambda: plain_loader(root, size, args.batch_size, workers), True),
                    "finetune": (lambda: finetune_loader(root, size, args.batch_size, workers, False), True),
                    "finetune decoded": (lambda: finetune_loader(root, size, args.batch_size, workers, True), True),
                }
                for loader_name, (make, fast) in loaders.items():
                    model = timm.create_model(name, pretrained=False, num_classes=2).to(device)
                    speed = train_steps(model, forever(make()), args.steps, device, fast=fast)
                    rows.append(
                        {
                            "model": name,
                            "data": data_name,
                            "loader": loader_name,
                            "workers": workers,
                            "images_per_s": speed,
                            "of_limit": speed / limit,
                        }
                    )
                    print(
                        f"{name} {data_name} {loader_name} ({workers} workers): {speed:.0f} img/s "
                        f"({speed / limit:.2f} of the limit)",
                        flush=True,
                    )
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [
        f"{gpu}, {os.cpu_count()} CPU cores, batch {args.batch_size}, torch {torch.__version__}",
        "",
        "| model | data | loader | workers | images/s | of synthetic limit |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['data']} | {r['loader']} | {r['workers']} | {r['images_per_s']:.0f} | "
        f"{r['of_limit']:.2f} |"
        for r in rows
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_throughput.json").write_text(json.dumps(rows, indent=2))
    (args.out / "gpu_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
