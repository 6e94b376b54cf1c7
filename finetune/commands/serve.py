"""``finetune serve``: a trained model as an HTTP service with a demo page (:mod:`finetune.serve`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from finetune.commands.args import REQUIRED, TRUST_OPTIONS, decision_rule_from, parse
from finetune.errors import ConfigError

OPTIONS = {
    "ckpt": REQUIRED,
    "host": "127.0.0.1",
    "port": "8000",
    "runtime": "auto",
    "top_k": "5",
    "max_batch_size": "16",
    "max_wait_ms": "5",
    "max_upload_mb": "10",
    "max_pixels": "40000000",
    "max_files": "16",
    "rate_limit": "0",
    "max_pending": "256",
    **TRUST_OPTIONS,
}


def serve_command(args: Sequence[str]) -> int:
    """``finetune serve ckpt=PATH [port=8000] [host=127.0.0.1] [runtime=auto|onnx|torch]``: serve the
    model over HTTP until Ctrl-C. ``POST /predict`` with image files (multipart, ``curl -F
    file=@cat.jpg localhost:8000/predict``; ``?top_k=N``) answers the top-k labels with calibrated
    probabilities; ``GET /health``, ``GET /metadata`` (classes, input size, version); a demo page
    at ``/``. runtime=auto uses ONNX Runtime where installed (the model is exported once and
    cached), else PyTorch. Images of concurrent requests share a forward pass (max_batch_size=16,
    max_wait_ms=5). Limits, each a 4xx with a reason when passed: max_upload_mb=10 per request,
    max_pixels=40000000 per image, max_files=16 per request, rate_limit=0 requests a minute per
    client (0: none), max_pending=256 images waiting (503 beyond). min_confidence=,
    target_precision=, coverage= and conformal= answer as in ``finetune predict``. Image URLs are
    refused: the server makes no outbound requests. host=0.0.0.0 listens beyond this machine."""
    opts, _ = parse(args, OPTIONS, "serve")
    numbers = _numbers(opts)
    from finetune.serve.runtime import RUNTIMES
    from finetune.serve.server import listen, run_server, served_app
    from finetune.use.load import load

    if opts["runtime"] not in RUNTIMES:
        raise ConfigError(f"runtime={opts['runtime']!r}; choose one of {', '.join(RUNTIMES)}.")
    ckpt = Path(opts["ckpt"])
    sock = listen(opts["host"], int(numbers["port"]))  # a busy port is refused before minutes of loading
    model = load(ckpt)
    rule = decision_rule_from(opts, model) if model.task != "multilabel" else None
    app, runtime, version = served_app(model, ckpt, opts["runtime"], rule, numbers)
    host, port = sock.getsockname()[:2]
    print(
        f"serving {ckpt} ({model.config['backbone']['name']}, {len(model.classes)} classes, runtime "
        f"{runtime.name}, version {version[:12]}) on http://{host}:{port}",
        flush=True,
    )
    print(
        f"  demo page http://{host}:{port}/ ; POST /predict (curl -F file=@image.jpg "
        f"http://{host}:{port}/predict), GET /health, GET /metadata; Ctrl-C stops",
        flush=True,
    )
    run_server(app, sock)
    print("server stopped", flush=True)
    return 0


def _numbers(opts: dict) -> dict[str, float]:
    """The numeric options as numbers, each checked, or one ConfigError naming it."""
    numbers = {}
    for key in (
        "port",
        "top_k",
        "max_batch_size",
        "max_wait_ms",
        "max_upload_mb",
        "max_pixels",
        "max_files",
        "rate_limit",
        "max_pending",
    ):
        try:
            numbers[key] = float(opts[key])
        except ValueError:
            raise ConfigError(f"finetune serve: {key}={opts[key]!r} is not a number.") from None
        whole = key in ("port", "top_k", "max_batch_size", "max_pixels", "max_files", "max_pending")
        low = 0 if key in ("port", "max_wait_ms", "rate_limit") else 1
        if numbers[key] < low or (whole and not numbers[key].is_integer()) or (key == "port" and numbers[key] > 65535):
            raise ConfigError(
                f"finetune serve: {key}={opts[key]!r} must be {'a whole number' if whole else 'a number'} "
                f"of at least {low}" + (" and at most 65535" if key == "port" else "") + "."
            )
    return numbers
