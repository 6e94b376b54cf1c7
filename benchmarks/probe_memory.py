"""Peak memory of the head's L2 cross-validation (``finetune.compute.linear_probe.choose_l2``) at
the sizes of a large data set, without the images: random float32 features of the cache's shape
(views x training images x 1,280, lite0's width), 10 classes, 3 folds.

    python benchmarks/probe_memory.py                      # 16,000 and 80,000 training images, 2 views
    python benchmarks/probe_memory.py --images 80000 --views 1

Each size runs in a fresh process: its peak RSS (``ru_maxrss``) after the features exist, minus
before, is what cross-validation added (its fold rows, the scale of the features, one L-BFGS step
per fold: ``max_iter=1`` on one strength, since memory, not the fit, is measured here; the first
matmul's library start-up is in it too). Prints one line per size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

MEASURE = """
import resource, sys, time, torch
from finetune.compute.linear_probe import choose_l2
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[16000, 80000])
    parser.add_argument("--views", type=int, default=2, help="data.cache.views (the config's default: 2)")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    for images in args.images:
        subprocess.run([sys.executable, "-c", MEASURE, str(images), str(args.views), str(args.width)], check=True)


if __name__ == "__main__":
    main()
