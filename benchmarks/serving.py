"""CPU serving speed: PyTorch eager vs ONNX Runtime on the same exported model, images/s; and
with --load, a load test of `finetune serve` on loopback.

    python benchmarks/serving.py                      # lite0 (embedded weights), 2-class head
    python benchmarks/serving.py --ckpt outputs/.../checkpoints/best.ckpt --threads 2
    python benchmarks/serving.py --load --ckpt outputs/.../checkpoints/best.ckpt   # needs wrk (apt)

Both run fp32 with the same number of threads on the same preprocessed batch; the ONNX model is
exported (and parity-checked) by finetune's own exporter. Prints a markdown table.

--load: first the offline batched ONNX Runtime figure on the same photos (read from memory as
JPEG bytes, decoded and preprocessed by the server's own code in 2 threads, 16 per forward pass),
then `finetune serve runtime=onnx` in its own process and wrk (C, one thread per core, little
CPU) with --connections concurrent clients, each posting one real photo per request: once with
valid uploads only, once with --malformed of them malformed (not an image, truncated, empty,
noise, empty body, 11 MB). Reports requests/s, p50/p90/p99 latency, status classes, and the
server's RSS after warm-up and at the end (growth over the malformed run).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from common import DEFAULT_DATA


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
    parser.add_argument("--load", action="store_true", help="load-test `finetune serve` (needs --ckpt and wrk)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="photos for --load (DIR/val/*/*.jpg)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=int, default=60)
    parser.add_argument("--malformed", type=float, default=0.1)
    args = parser.parse_args()
    if args.load:
        if not args.ckpt:
            sys.exit("--load needs --ckpt (a trained finetune checkpoint)")
        return load_test(args)

    if args.ckpt:
        model = load(args.ckpt)
    else:
        from finetune.model.backbone import build_backbone
        from finetune.model.classifier import Classifier
        from finetune.model.head import build_head

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

        print(
            f"{model.config['backbone']['name']}, {h}x{w}, fp32, {args.threads} threads; "
            f"ONNX parity max |diff| {exported.max_abs_diff:.1e}\n"
        )
        print("| batch | PyTorch eager img/s | ONNX Runtime img/s | ratio |\n|---|---|---|---|")
        for size in args.batch_sizes:
            batch = model.preprocess([rng.integers(0, 256, (h, w, 3), dtype=np.uint8)] * size).numpy()
            torch_rate = images_per_second(eager, batch, args.seconds)
            onnx_rate = images_per_second(onnx, batch, args.seconds)
            print(f"| {size} | {torch_rate:.1f} | {onnx_rate:.1f} | {onnx_rate / torch_rate:.2f}x |", flush=True)


def offline_rate(ckpt: Path, photos: list[bytes], seconds: float, threads: int) -> tuple[float, float]:
    """(images/s from JPEG bytes to probabilities, batched 16, decoding in `threads` threads; images/s
    of the forward passes alone) with the server's own runtime and decoder, in this process."""
    from finetune.config import compose_config
    from finetune.serve.guards import decode_upload
    from finetune.serve.runtime import checkpoint_digest, make_runtime
    from finetune.use.load import load

    runtime = make_runtime(load(ckpt), "onnx", ckpt, checkpoint_digest(ckpt), Path(compose_config([]).paths.cache_dir))
    pool = ThreadPoolExecutor(threads)

    def prepare(data):
        return runtime.preprocess(decode_upload(data, 40_000_000))

    def decoded(batch):  # the next batch decodes while this one runs forward (a pipeline, as the server's)
        return [pool.submit(prepare, data) for data in batch]

    batches = [photos[i : i + 16] for i in range(0, len(photos) - 15, 16)]
    runtime.probabilities(np.stack([f.result() for f in decoded(batches[0])]))  # warm-up
    done = forward = 0
    started = time.perf_counter()
    upcoming = decoded(batches[0])
    while time.perf_counter() - started < seconds:
        for i in range(len(batches)):
            inputs = np.stack([f.result() for f in upcoming])
            upcoming = decoded(batches[(i + 1) % len(batches)])
            t = time.perf_counter()
            runtime.probabilities(inputs)
            forward += time.perf_counter() - t
            done += len(inputs)
    return done / (time.perf_counter() - started), done / forward


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wrk(url: str, photos_list: Path, malformed: float, connections: int, seconds: int, server_pid: int) -> dict:
    """wrk's counts and latencies, and the server's RSS (MB) every 2 s while it ran (``rss``)."""
    script = Path(__file__).with_name("serving_load.lua")
    env = {**os.environ, "PHOTOS": str(photos_list), "MALFORMED": str(malformed)}
    load = subprocess.Popen(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(script), url],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    rss = [rss_mb(server_pid)]
    while load.poll() is None:
        time.sleep(2)
        rss.append(rss_mb(server_pid))
    line = next(row for row in load.stdout.read().splitlines() if row.startswith("RESULT"))
    return {**{k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}, "rss": rss}


def load_test(args) -> None:
    import httpx

    paths = sorted((args.data / "val").glob("*/*.jpg"))
    if not paths:
        sys.exit(f"no photos under {args.data}/val (--data DIR)")
    photos = [p.read_bytes() for p in paths]
    offline, forward_only = offline_rate(args.ckpt, photos, 30.0, 2)
    print(
        f"offline batched ONNX Runtime, {len(paths)} photos from memory: {offline:.1f} img/s end to end "
        f"(forward passes alone {forward_only:.1f} img/s)",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "photos.txt"
        listing.write_text("\n".join(map(str, paths)) + "\n")
        server = subprocess.Popen(
            [sys.executable, "-m", "finetune", "serve", f"ckpt={args.ckpt}", "port=0", "runtime=onnx"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = server.stdout.readline()
            while "serving" not in line:
                line = server.stdout.readline()
            url = re.search(r"on (http://\S+)", line).group(1)
            while httpx.get(f"{url}/health").status_code != 200:
                time.sleep(0.2)
            warm = wrk(url, listing, args.malformed, args.connections, 20, server.pid)  # allocator pools fill up
            rows = [
                (share, wrk(url, listing, share, args.connections, args.duration, server.pid))
                for share in (0.0, args.malformed)
            ]
            health = httpx.get(f"{url}/health").json()
        finally:
            server.terminate()
            server.wait(30)
    print(
        f"\n{args.connections} concurrent clients (wrk), {args.duration} s each, lite0 via `finetune serve "
        f"runtime=onnx`; server RSS {warm['rss'][0]:.0f} MB before the 20 s warm-up, {warm['rss'][-1]:.0f} MB after; "
        f"mean batch {health['images'] / health['batches']:.1f}\n"
    )
    print(
        "| malformed | requests/s | x offline | p50 ms | p90 ms | p99 ms | 2xx | 4xx | 5xx | socket errors "
        "| RSS MB start -> end (growth), peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for share, r in rows:
        rate, rss = r["requests"] / r["seconds"], r["rss"]
        print(
            f"| {share:.0%} | {rate:.1f} | {rate / offline:.2f} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | "
            f"{r['p99_ms']:.0f} "
            f"| {r['ok']:.0f} | {r['client_error']:.0f} | {r['server_error']:.0f} | {r['socket_errors']:.0f} "
            f"| {rss[0]:.0f} -> {rss[-1]:.0f} ({(rss[-1] - rss[0]) / rss[0]:+.1%}), {max(rss):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
