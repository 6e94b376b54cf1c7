"""The classic networks side by side: parameters, multiply-adds, receptive field, CPU inference
speed, ImageNet top-1.

    python benchmarks/zoo.py                     # ~2 minutes on 2 cores
    python benchmarks/zoo.py --threads 2 --batch 16 --seconds 5

Each network is built by finetune (random weights: speed does not depend on them) with a
1000-class linear head (LeNet-5: 10 classes, the digits), at its own input size. Multiply-adds
and the receptive field come from finetune.viz.anatomy (one traced forward pass); images/s from
fp32 eager inference on a random batch, timed for `--seconds` after one warm-up batch. ImageNet
top-1 is what torchvision's weights metadata says (``meta['_metrics']['ImageNet-1K']['acc@1']``);
timm's pretrained_cfg carries no accuracy, so lite0's cell stays blank. Prints a markdown table
and writes it to benchmarks/results/zoo.md.

One thread by default: on a shared machine, threads that wait for each other's descheduled
partner spin and make multi-threaded timings meaningless (here 2 threads ran a GoogLeNet forward
100x slower than 1 under a load average of 10).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

NETWORKS = [
    ("LeNet-5 (1998)", "lenet5"),
    ("AlexNet (2012)", "torchvision:alexnet"),
    ("VGG-16 (2014)", "torchvision:vgg16"),
    ("GoogLeNet (2014)", "torchvision:googlenet"),
    ("Inception-v3 (2015)", "torchvision:inception_v3"),
    ("ResNet-18 (2015)", "torchvision:resnet18"),
    ("ResNet-50 (2015)", "torchvision:resnet50"),
    ("EfficientNet-Lite0 (2020; finetune's default)", "tf_efficientnet_lite0"),
]


def top1(name: str) -> str:
    if not name.startswith("torchvision:"):
        return ""
    from torchvision.models import get_model_weights

    weights = get_model_weights(name.split(":", 1)[1]).DEFAULT
    return f"{weights.meta['_metrics']['ImageNet-1K']['acc@1']:.1f}"


def images_per_second(model: torch.nn.Module, batch: torch.Tensor, seconds: float) -> float:
    with torch.inference_mode():
        model(batch)  # warm-up: allocations, oneDNN primitives
        done, started = 0, time.perf_counter()
        while done < 2 * len(batch) or time.perf_counter() - started < seconds:
            model(batch)
            done += len(batch)
    return done / (time.perf_counter() - started)


def measure(label: str, name: str, batch_size: int, seconds: float) -> list[str]:
    from finetune.model.backbone import build_backbone
    from finetune.model.classifier import Classifier
    from finetune.model.head import build_head
    from finetune.viz.anatomy import anatomy, format_count

    torch.manual_seed(0)
    backbone = build_backbone(name, "random")
    classes = 10 if name == "lenet5" else 1000
    net = Classifier(backbone.model, build_head(backbone.num_features, classes), backbone.groups).eval()
    size = tuple(backbone.data_config["input_size"])
    result = anatomy(net, net.groups, size)
    spatial = [g for g in result.groups if g.field not in (None, "global")]
    field = f"{spatial[-1].receptive_field} ({spatial[-1].name})" if spatial else "-"
    rate = images_per_second(net, torch.randn(batch_size, *size), seconds)
    return [
        label,
        f"`{name}`",
        f"{size[1]}x{size[2]}",
        format_count(result.params),
        format_count(result.macs),
        field,
        f"{rate:.1f}",
        top1(name),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "zoo.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    header = [
        "network",
        "backbone.name",
        "input",
        "params",
        "mult-adds",
        "receptive field",
        "CPU img/s",
        "ImageNet top-1 %",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    print("\n".join(lines), flush=True)
    started = time.perf_counter()
    for label, name in NETWORKS:
        row = measure(label, name, args.batch, args.seconds)
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
        gc.collect()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    note = (
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"fp32 eager, batch {args.batch}, {args.threads} thread(s), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"load average {load:.1f} when done (a shared machine: speeds are lower bounds). Params and "
        f"mult-adds include the classifier (1000 classes; LeNet-5: 10) and leave out auxiliary classifiers "
        f"(torchvision counts Inception-v3's: 27.2M). Receptive field: of the last spatial layer group, in "
        f"input pixels. Top-1 from torchvision's weights metadata; timm's pretrained_cfg gives none for lite0. "
        f"{time.perf_counter() - started:.0f} s in all."
    )
    print(note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n" + note + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
