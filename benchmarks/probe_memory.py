"""Peak memory of the head-only path at the sizes of a large data set, without the images: the
head's L2 cross-validation (``finetune.compute.l2_choice.choose_l2``) on random float32 features
of the cache's shape (views x training images x 1,280, lite0's width), 10 classes, 3 folds; and
(``--stage pass``) the feature pass that fills the cache (``finetune.compute.features._compute``),
with a stand-in backbone (8 x 8 arrays in memory -> 1,280 numbers) so that only its own
arrays are measured.

    python benchmarks/probe_memory.py                      # 16,000 and 80,000 training images, 2 views
    python benchmarks/probe_memory.py --images 80000 --views 1
    python benchmarks/probe_memory.py --stage pass         # the feature pass (a quarter as many val images)

Each size runs in a fresh process: its peak RSS (``ru_maxrss``) after the inputs exist, minus
before, is what the stage added. Cross-validation: its fold rows, the scale of the features, one
L-BFGS step per fold (``max_iter=1`` on one strength, since memory, not the fit, is measured here;
the first matmul's library start-up is in it too). The pass: the features it returns (the floor)
and whatever it held besides. Prints one line per size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

MEASURE = """
import resource, sys, time, torch
from finetune.compute.l2_choice import choose_l2
images, views, width = (int(v) for v in sys.argv[1:4])
features = torch.randn(views, images, width)
targets = torch.randint(0, 10, (images,))
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before, started = peak_mb(), time.perf_counter()
choose_l2(features, targets, 10, grid=(1.0,), max_iter=1, refine=False)
print(f"{images:,} images x {views} views x {width}: features {features.numel() * 4 / 2**20:,.0f} MB, "
      f"cross-validation's peak RSS growth {peak_mb() - before:,.0f} MB ({time.perf_counter() - started:.1f} s)")
"""

PASS = """
import resource, sys, time, numpy as np, torch
from pathlib import Path
from torch import nn
from finetune.compute.features import FeatureCacheSettings, _compute
from finetune.compute.speed import Speed
from finetune.data.transforms import build_transforms
images, views, width = (int(v) for v in sys.argv[1:4])
class StandIn(nn.Module):  # any (B, 3, 8, 8) batch -> (B, width): the pass's own arrays, not a network's
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, width)
    def forward(self, x):
        return self.linear(x.float().mean(dim=(2, 3)))
samples = [(np.full((8, 8, 3), i % 251, np.uint8), i % 10) for i in range(images)]
config = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0}
train_tf, eval_tf = build_transforms(config, {"hflip": 0.5}, seed=0)
settings = FeatureCacheSettings("stand-in", Path("."), views, True, 512, 0, 0)
speed = Speed("32-true", False, False, torch.device("cpu"))
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
splits = {"train": samples, "val": samples[: images // 4]}
before, started = peak_mb(), time.perf_counter()
cached = _compute(StandIn().eval(), splits, {"train": train_tf, "eval": eval_tf}, views, speed, settings)
kept = sum(t.numel() * t.element_size() for t in cached.features.values()) / 2**20
print(f"{images:,} images x {views} views x {width} (+{images // 4:,} val): features {kept:,.0f} MB, "
      f"the pass's peak RSS growth {peak_mb() - before:,.0f} MB ({time.perf_counter() - started:.1f} s)")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[16000, 80000])
    parser.add_argument("--views", type=int, default=2, help="data.cache.views (the config's default: 2)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--stage", choices=("cv", "pass"), default="cv", help="cross-validation, or the feature pass")
    args = parser.parse_args()
    code = MEASURE if args.stage == "cv" else PASS
    for images in args.images:
        subprocess.run([sys.executable, "-c", code, str(images), str(args.views), str(args.width)], check=True)


if __name__ == "__main__":
    main()
