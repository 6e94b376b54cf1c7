"""What stands between the network and the model: a body size limit, a per-client rate limit and
a decoder that refuses what is not a whole, reasonably sized image. Each refusal is a 4xx with a
sentence saying why, never a 5xx, and never reads more than the limit into memory.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass

import numpy as np

from finetune.data.images import ImageTooLarge, UnreadableImage, load_rgb


@dataclass(frozen=True)
class Limits:
    """The server's limits (``finetune serve`` options). ``rate_limit``: requests per minute per
    client address, 0 = none."""

    max_upload_mb: float = 10.0
    max_pixels: int = 40_000_000
    max_files: int = 16
    rate_limit: float = 0.0
    max_pending: int = 256

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Refused(Exception):
    """An input the server refuses: `status` (4xx) and the sentence returned as ``detail``."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """HxWx3 uint8 RGB from an uploaded file, decoded as :func:`finetune.load` decodes files; or
    :class:`Refused`: 400 (empty, not an image, truncated, corrupt), 413 (more than `max_pixels`
    pixels, a decompression bomb) — checked from the header, before anything is decoded."""
    if not data:
        raise Refused(400, "empty file: nothing to classify")
    try:
        return load_rgb(io.BytesIO(data), max_pixels=max_pixels)
    except ImageTooLarge as err:
        raise Refused(413, f"{err} (the server's max_pixels)") from None
    except UnreadableImage as err:
        raise Refused(400, f"not an image this server can read: {err}") from None


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 — at once when Content-Length
    says so, else as soon as the streamed body passes the limit (nothing more is read): reading
    raises :class:`Refused` inside the app, whose handler answers it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen, finished = 0, False

        async def counted_receive():
            nonlocal seen, finished
            message = await receive()
            seen += len(message.get("body", b""))
            finished = message["type"] != "http.request" or not message.get("more_body", False)
            if seen > self.max_bytes:
                raise Refused(413, self._too_large())
            return message

        async def lingering_send(message):
            # A client still sending when the connection closes may lose the answer to a TCP reset:
            # read and drop the rest of its body first, within bounds (nginx's lingering close).
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not finished:
                await _drain(receive)
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _send_json(lingering_send, 413, self._too_large())
        await self.app(scope, counted_receive, lingering_send)

    def _too_large(self) -> str:
        return f"request body larger than {self.max_bytes / 1024 / 1024:g} MB (max_upload_mb)"


async def _drain(receive, max_bytes: int = 256 * 1024 * 1024, max_seconds: float = 10.0) -> None:
    """Read and drop what is left of a request body: at most `max_bytes`, for at most `max_seconds`."""
    import asyncio

    async def drop():
        dropped = 0
        while dropped < max_bytes:
            message = await receive()
            dropped += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(drop(), max_seconds)
    except (asyncio.TimeoutError, Refused):
        pass


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RateLimiter:
    """A token bucket per client address: `per_minute` requests a minute, bursts up to that many.
    Hand-written (a dict of floats) because the server is one process: slowapi and limits add a
    storage backend for what is a few lines here. Addresses idle for a minute are forgotten."""

    def __init__(self, per_minute: float):
        self.rate, self.capacity = per_minute / 60.0, max(1.0, per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}

    def retry_after(self, client: str, now: float | None = None) -> float:
        """0 when `client` may go ahead (a token is taken), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        if len(self._buckets) > 10_000:
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
        tokens, last = self._buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[client] = (tokens - 1, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1 - tokens) / self.rate
