"""CPU serving speed: PyTorch eager vs ONNX Runtime on the same exported model, images/s.

    python benchmarks/serving.py                      # lite0 (embedded weights), 2-class head
    python benchmarks/serving.py --ckpt outputs/.../checkpoints/best.ckpt --threads 2

Both run fp32 with the same number of threads on the same preprocessed batch; the ONNX model is
exported (and parity-checked) by finetune's own exporter. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def images_per_second(run, batch: np.ndarray, seconds: float = 5.0) -> float:
    run(batch)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run(batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def main() -> None:
    import onnxruntime as ort

    from finetune.use.export import export
    from finetune.use.load import FinetunedModel, load

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="a finetune checkpoint (default: lite0 + a new 2-class head)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    if args.ckpt:
        model = load(args.ckpt)
    else:
        from finetune.model.backbone import build_backbone
        from finetune.model.head import build_head
        from finetune.model.classifier import Classifier

        backbone = build_backbone("tf_efficientnet_lite0")
        net = Classifier(backbone.model, build_head(backbone.num_features, 2), backbone.groups)
        model = FinetunedModel(net, ["a", "b"], backbone.data_config, {"backbone": {"name": backbone.name}, "head": {}})
    torch.set_num_threads(args.threads)
    _, h, w = model.data_config["input_size"]
    rng = np.random.default_rng(0)
    sample = model.preprocess([rng.integers(0, 256, (h + 32, w + 32, 3), dtype=np.uint8) for _ in range(4)])
    with tempfile.TemporaryDirectory() as tmp:
        exported = export(model, "onnx", Path(tmp), sample)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(exported.path), options, providers=["CPUExecutionProvider"])

        def eager(batch):
            with torch.inference_mode():
                model.model(torch.from_numpy(batch))

        def onnx(batch):
            session.run(None, {"images": batch})

        print(f"{model.config['backbone']['name']}, {h}x{w}, fp32, {args.threads} threads; "
              f"ONNX parity max |diff| {exported.max_abs_diff:.1e}\n")
        print("| batch | PyTorch eager img/s | ONNX Runtime img/s | ratio |\n|---|---|---|---|")
        for size in args.batch_sizes:
            batch = model.preprocess([rng.integers(0, 256, (h, w, 3), dtype=np.uint8)] * size).numpy()
            torch_rate = images_per_second(eager, batch, args.seconds)
            onnx_rate = images_per_second(onnx, batch, args.seconds)
            print(f"| {size} | {torch_rate:.1f} | {onnx_rate:.1f} | {onnx_rate / torch_rate:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
