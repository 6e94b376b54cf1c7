"""The HTTP server's routes (FastAPI): ``POST /predict``, ``GET /health``, ``GET /metadata`` and the
demo page at ``/``.

``POST /predict`` takes one or more image files as ``multipart/form-data`` (any field name; ``curl
-F file=@cat.jpg``) or one image as the raw body (``Content-Type: image/*``), and ``?top_k=N``.
It answers ``{"predictions": [...]}`` in upload order, each ``{"file", "label", "probability",
"unknown", "top_k": [{"label", "probability"}], "prediction_set"?}`` (multi-label models:
``"labels"`` at the tuned thresholds instead of ``label``). Probabilities are calibrated where the
model was (its temperature). Image URLs are refused: the server makes no outbound requests.
Every bad input is a 4xx with ``{"detail": "why"}`` (:mod:`finetune.serve.guards`).
"""

from __future__ import annotations

import asyncio
import re
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile

from finetune.serve.batching import DynamicBatcher, Overloaded
from finetune.serve.guards import BodyLimit, Limits, RateLimiter, Refused, decode_upload
from finetune.serve.runtime import Runtime
from finetune.use.confidence import DecisionRule

URL_REFUSAL = (
    "image URLs are refused: this server makes no outbound requests; upload the file itself (curl -F file=@image.jpg)"
)


def create_app(
    runtime: Runtime,
    version: str,
    rule: DecisionRule | None = None,
    limits: Limits = Limits(),
    top_k: int = 5,
    max_batch_size: int = 16,
    max_wait_ms: float = 5.0,
    checkpoint: str = "",
) -> FastAPI:
    """The server for `runtime`'s model; `version` (the checkpoint's SHA-256) names it in /metadata."""
    rule = rule or DecisionRule()
    batcher = DynamicBatcher(runtime.probabilities, max_batch_size, max_wait_ms / 1000, limits.max_pending)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="finetune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    metadata = _metadata(runtime, version, rule, limits, top_k, checkpoint)

    @app.exception_handler(Refused)
    async def refused(_request, err: Refused):
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    _add_info_routes(app, runtime, batcher, metadata)
    _add_predict_route(app, runtime, batcher, limits, metadata, rule)
    return BodyLimit(app, limits.max_upload_bytes)


def _metadata(runtime: Runtime, version: str, rule: DecisionRule, limits: Limits, top_k: int, checkpoint: str) -> dict:
    """What ``GET /metadata`` answers: the model, its preprocessing, decision rule and limits."""
    model = runtime.model
    return {
        "model": Path(checkpoint).name,
        "version": version[:12],
        "architecture": model.config["backbone"]["name"],
        "task": model.task,
        "classes": model.classes,
        "input_size": list(model.data_config["input_size"]),
        "mean": list(model.data_config["mean"]),
        "std": list(model.data_config["std"]),
        "interpolation": model.data_config["interpolation"],
        "crop_pct": model.data_config["crop_pct"],
        "temperature": None if model.task == "multilabel" else model.temperature,
        "runtime": runtime.name,
        "top_k": top_k,
        **rule.describe(),
        "limits": {
            "max_upload_mb": limits.max_upload_mb,
            "max_pixels": limits.max_pixels,
            "max_files": limits.max_files,
            "rate_limit_per_minute": limits.rate_limit or None,
        },
    }


def _add_info_routes(app: FastAPI, runtime: Runtime, batcher: DynamicBatcher, metadata: dict) -> None:
    """``GET /`` (the demo page), ``GET /health`` and ``GET /metadata``."""
    page = files("finetune.serve").joinpath("page.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def demo_page():
        return page

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "runtime": runtime.name,
            "pending": batcher.pending,
            "batches": batcher.batches,
            "images": batcher.images,
        }

    @app.get("/metadata")
    async def get_metadata():
        return metadata


def _add_predict_route(
    app: FastAPI, runtime: Runtime, batcher: DynamicBatcher, limits: Limits, metadata: dict, rule: DecisionRule
) -> None:
    """``POST /predict``: rate limit, uploads decoded in threads, one batched forward pass."""
    model = runtime.model
    limiter = RateLimiter(limits.rate_limit) if limits.rate_limit > 0 else None

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = None):
        if limiter is not None:
            wait = limiter.retry_after(request.client.host if request.client else "?")
            if wait:
                return JSONResponse(
                    {"detail": f"rate limit: {limits.rate_limit:g} requests a minute per client"},
                    status_code=429,
                    headers={"Retry-After": str(int(wait) + 1)},
                )
        k = metadata["top_k"] if top_k is None else top_k
        if not 1 <= k <= 100:
            raise Refused(422, f"top_k={k}: a whole number from 1 to the number of classes")
        uploads = await _uploads(request, limits.max_files)
        images = await asyncio.gather(
            *(asyncio.to_thread(_prepare, runtime, data, limits.max_pixels) for _, data in uploads),
            return_exceptions=True,
        )
        for (name, _), image in zip(uploads, images):
            if isinstance(image, Refused):
                raise Refused(image.status, f"{name}: {image.detail}")
            if isinstance(image, BaseException):  # whatever the decoder raised: the upload is not a usable image
                raise Refused(400, f"{name}: not a usable image ({type(image).__name__})")
        try:
            probabilities = await batcher.predict(list(images))
        except Overloaded as err:
            return JSONResponse(
                {"detail": f"busy: {err}; retry shortly"}, status_code=503, headers={"Retry-After": "1"}
            )
        answers = model.predictions(
            torch.from_numpy(np.asarray(probabilities, np.float32)), [name for name, _ in uploads], k, rule
        )
        return {"predictions": [_as_json(answer, k) for answer in answers]}


def _prepare(runtime: Runtime, data: bytes, max_pixels: int) -> np.ndarray:
    return runtime.preprocess(decode_upload(data, max_pixels))


async def _uploads(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every uploaded file, or :class:`Refused`."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind.startswith("image/") or kind == "application/octet-stream":
        return [("body", await request.body())]
    if kind != "multipart/form-data":
        body = await request.body()
        if re.search(rb"(https?|ftp)://", unquote_to_bytes(body[:4096].replace(b"+", b" ")), re.IGNORECASE):
            raise Refused(400, URL_REFUSAL)
        raise Refused(
            415 if body else 400,
            "send images as multipart/form-data (curl -F file=@image.jpg) or one "
            "image as the body with Content-Type: image/jpeg" + ("" if body else "; the body was empty"),
        )
    try:
        form = await request.form(max_files=max_files, max_fields=max_files)
    except HTTPException as err:  # starlette: malformed multipart, too many parts
        raise Refused(400, f"malformed multipart upload: {err.detail}") from None
    files_, texts = [], []
    for _, value in form.multi_items():
        (files_ if isinstance(value, UploadFile) else texts).append(value)
    if any(str(t).strip().lower().startswith(("http://", "https://", "ftp://")) for t in texts):
        raise Refused(400, URL_REFUSAL)
    if not files_:
        raise Refused(400, "no image file in the upload (curl -F file=@image.jpg)")
    return [(f.filename or f"file{i}", await f.read()) for i, f in enumerate(files_)]


def _pairs(pairs) -> list[dict]:
    return [{"label": name, "probability": round(p, 6)} for name, p in pairs]


def _as_json(answer, k: int) -> dict:
    """One answer of :meth:`FinetunedModel.predictions` as the JSON /predict returns."""
    if hasattr(answer, "labels"):  # multi-label: its top k from every label's probability
        top = sorted(answer.probabilities.items(), key=lambda item: -item[1])[:k]
        return {"file": answer.source, "labels": _pairs(answer.labels), "top_k": _pairs(top)}
    result = {
        "file": answer.source,
        "label": answer.label,
        "probability": round(answer.probability, 6),
        "unknown": answer.unknown,
        "top_k": _pairs(answer.top_k),
    }
    if answer.prediction_set is not None:
        result["prediction_set"] = _pairs(answer.prediction_set)
    return result
