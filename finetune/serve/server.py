"""The server around the routes (:mod:`.app`): the listening socket, the app for a loaded model
(its runtime, version and limits), and uvicorn running until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import uvicorn

from finetune.errors import ConfigError


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (port=0: a free port), or a ConfigError that says why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"finetune serve: host={host!r} does not resolve ({err.strerror}).") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"finetune serve: cannot listen on {host}:{port} ({err.strerror}); "
            "another server may hold the port: choose another with port=..."
        ) from None
    sock.listen(2048)
    return sock


def served_app(model, ckpt: Path, runtime_name: str, rule, numbers: dict[str, float]):
    """(the app, its runtime, the checkpoint's version) for `model` loaded from `ckpt`, answering
    under the decision `rule` (None: plain answers) with the limits and batching of `numbers`
    (``finetune serve``'s numeric options)."""
    from finetune.config import compose_config
    from finetune.serve.app import create_app
    from finetune.serve.guards import Limits
    from finetune.serve.runtime import checkpoint_digest, make_runtime

    version = checkpoint_digest(ckpt)
    runtime = make_runtime(model, runtime_name, ckpt, version, Path(compose_config([]).paths.cache_dir))
    limits = Limits(
        numbers["max_upload_mb"],
        int(numbers["max_pixels"]),
        int(numbers["max_files"]),
        numbers["rate_limit"],
        int(numbers["max_pending"]),
    )
    app = create_app(
        runtime,
        version,
        rule,
        limits,
        int(numbers["top_k"]),
        int(numbers["max_batch_size"]),
        numbers["max_wait_ms"],
        str(ckpt),
    )
    return app, runtime, version


def run_server(app, sock: socket.socket) -> None:
    """Serve `app` on `sock` until Ctrl-C or SIGTERM, the requests in flight finished."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    # uvicorn finishes the requests in flight on SIGINT/SIGTERM, then raises the signal again:
    # both end here, as a normal stop (exit 0), not as a traceback or a kill.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass


def _interrupt(*_) -> None:
    raise KeyboardInterrupt
