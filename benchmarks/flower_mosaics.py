"""A second multi-label set for benchmarks/multilabel.py: 2x2 mosaics of flowers5 photos, each labelled
with the species it shows (1 to 3 of 5), generated deterministically (never committed).

    python benchmarks/flower_mosaics.py                       # -> benchmarks/results/flower_mosaics/
    python benchmarks/multilabel.py --data benchmarks/results/flower_mosaics --out
    benchmarks/results/multilabel_mosaics ...

Each mosaic draws its number of species uniformly from 1 to 3, the species, then four distinct photos
of those species (every chosen species at least once), each center-cropped to a square and resized
to 112 px; ``labels.csv`` has ``file,labels`` (space-separated species), as pokemon_types does.
"""

from __future__ import annotations

import argparse
import os
import random
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FINETUNE_DATASETS", REPO.parent / "shared" / "datasets"))


def square(path: Path, side: int) -> Image.Image:
    with Image.open(path) as img:
        return ImageOps.fit(ImageOps.exif_transpose(img).convert("RGB"), (side, side), Image.Resampling.BICUBIC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DATASETS / "flowers5")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "flower_mosaics")
    parser.add_argument("--count", type=int, default=800)
    parser.add_argument("--tile", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    photos = defaultdict(list)
    for species in sorted(p.name for p in args.source.iterdir() if p.is_dir()):
        photos[species] = sorted(
            p for p in (args.source / species).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        )
    if len(photos) < 2:
        raise SystemExit(f"{args.source}: expected one folder of photos per species")
    rng = random.Random(args.seed)
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    rows = ["file,labels"]
    used: set[Path] = set()
    for n in range(args.count):
        species = rng.sample(sorted(photos), rng.randint(1, 3))
        picks = species + [rng.choice(species) for _ in range(4 - len(species))]
        rng.shuffle(picks)
        mosaic = Image.new("RGB", (2 * args.tile, 2 * args.tile))
        for i, name in enumerate(picks):
            photo = rng.choice([p for p in photos[name] if p not in used] or photos[name])
            used.add(photo)
            mosaic.paste(square(photo, args.tile), ((i % 2) * args.tile, (i // 2) * args.tile))
        file = f"mosaic_{n:04d}.jpg"
        mosaic.save(args.out / "images" / file, quality=92)
        rows.append(f"{file},{' '.join(sorted(species))}")
    (args.out / "labels.csv").write_text("\n".join(rows) + "\n")
    print(f"{args.count} mosaics of {len(used)} distinct photos -> {args.out}")


if __name__ == "__main__":
    main()
