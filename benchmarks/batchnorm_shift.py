"""Why fine-tuning from a fitted head can start by losing it: BatchNorm's switch to batch statistics.

    python benchmarks/batchnorm_shift.py RUN/checkpoints/best.ckpt --images VAL_FOLDER_OR_MANIFEST [--root DIR]

A head-only run fits its head on features the backbone computes in eval mode (BatchNorm with the
ImageNet running statistics). The first training step of LP-FT or full fine-tuning puts BatchNorm
in train mode: each layer normalizes with the batch's own statistics instead. This scores the
head-only checkpoint's validation images both ways (the same weights, batches of --batch-size,
running statistics untouched), so the shift the head sees is measured rather than guessed.

--images: a folder of class folders, or a manifest (path,label,split; its ``val`` rows, paths
relative to --root).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

import finetune
from finetune.data.images import IMAGE_EXTENSIONS


def labelled_images(images: Path, root: Path | None) -> list[tuple[str, str]]:
    if images.is_dir():
        return [
            (str(p), p.parent.name)
            for p in sorted(images.rglob("*"))
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.parent.parent == images
        ]
    with images.open(newline="") as f:
        base = root or images.parent
        return [(str(base / r["path"]), r["label"]) for r in csv.DictReader(f) if r["split"] == "val"]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(y), batch_size)])
    return float((logits.argmax(dim=1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="shuffles the images into batches")
    args = parser.parse_args()
    loaded = finetune.load(args.checkpoint)
    rows = labelled_images(args.images, args.root)
    x = loaded.preprocess([path for path, _ in rows])
    y = torch.tensor([loaded.classes.index(label) for _, label in rows])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))  # mixed-class batches
    x, y = x[order], y[order]
    model = loaded.model.eval()
    in_eval = accuracy(model, x, y, args.batch_size)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
            module.momentum = 0.0  # normalize with the batch's statistics, keep the running ones
    on_batches = accuracy(model, x, y, args.batch_size)
    print(
        f"{args.checkpoint}: {len(y)} images; BatchNorm on ImageNet statistics {in_eval:.4f}, "
        f"on batch statistics (batch {args.batch_size}) {on_batches:.4f} ({100 * (on_batches - in_eval):+.1f} pts)"
    )


if __name__ == "__main__":
    main()
