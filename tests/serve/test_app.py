"""finetune serve: a real uvicorn server on loopback, real uploads (httpx), real photos, the demo
page in a real browser; every bad input a 4xx with a reason, and the server still up after."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import assert_refused, finetune_cli, fit_tiny_on_folders
from PIL import Image

FINETUNE = [sys.executable, "-m", "finetune"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return fit_tiny_on_folders(root, 8, 4, epochs=2).best_checkpoint


@pytest.fixture(scope="module")
def photos(hymenoptera) -> list[Path]:
    return (
        sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[:4]
        + sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:4]
    )


@contextmanager
def running(ckpt, runtime="torch", cache_dir=None, **options):
    """A server for `ckpt` in a thread of this process, on a free loopback port: its base URL."""
    import uvicorn

    from finetune.serve.app import create_app
    from finetune.serve.guards import Limits
    from finetune.serve.runtime import checkpoint_digest, make_runtime
    from finetune.serve.server import listen
    from finetune.use.load import load

    model = load(ckpt)
    version = checkpoint_digest(Path(ckpt))
    limits = Limits(**{k: options.pop(k) for k in list(options) if k in Limits.__dataclass_fields__})
    app = create_app(
        make_runtime(model, runtime, Path(ckpt), version, Path(cache_dir or os.environ["FINETUNE_CACHE"])),
        version,
        limits=limits,
        checkpoint=str(ckpt),
        **options,
    )
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def post(url: str, files: list[tuple[str, bytes]], **kw) -> httpx.Response:
    return httpx.post(f"{url}/predict", files=[("file", (name, data)) for name, data in files], timeout=60, **kw)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_answers_what_finetune_load_answers(trained, photos, runtime, tmp_path):
    """Real photos, sent concurrently (so that they share batches): the same labels and, within
    1e-4, the same calibrated probabilities as finetune.load's predict, on either runtime."""
    from finetune.use.load import load

    model = load(trained)
    expected = model.predict([str(p) for p in photos], top_k=3)
    with running(trained, runtime, cache_dir=tmp_path, max_wait_ms=50) as url:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: post(url, [(p.name, p.read_bytes())], params={"top_k": 3}), photos))
        health = httpx.get(f"{url}/health").json()
    assert [a.status_code for a in answers] == [200] * len(photos)
    for answer, want in zip(answers, expected):
        got = answer.json()["predictions"][0]
        assert got["label"] == want.label and got["file"] == Path(want.source).name
        assert [t["label"] for t in got["top_k"]] == [label for label, _ in want.top_k]
        assert np.allclose([t["probability"] for t in got["top_k"]], [p for _, p in want.top_k], atol=1e-4)
    assert health["runtime"] == runtime and health["images"] == len(photos)
    assert health["batches"] < len(photos)  # dynamic batching: concurrent uploads shared forward passes


def test_metadata_health_and_several_files(trained, photos):
    from finetune.use.load import load

    model = load(trained)
    with running(trained, top_k=2) as url:
        meta = httpx.get(f"{url}/metadata").json()
        both = post(url, [(p.name, p.read_bytes()) for p in photos[:2]])
        raw = httpx.post(f"{url}/predict", content=photos[0].read_bytes(), headers={"content-type": "image/jpeg"})
    assert meta["classes"] == model.classes and meta["input_size"] == list(model.data_config["input_size"])
    assert meta["version"] == hashlib.sha256(Path(trained).read_bytes()).hexdigest()[:12]
    assert meta["temperature"] == pytest.approx(model.temperature) and meta["runtime"] == "torch"
    predictions = both.json()["predictions"]
    assert [p["file"] for p in predictions] == [p.name for p in photos[:2]] and len(predictions[0]["top_k"]) == 2
    assert raw.status_code == 200 and raw.json()["predictions"][0]["label"] == predictions[0]["label"]


def bad_inputs(photo: Path, tmp_path: Path) -> dict[str, tuple[int, dict]]:
    """name -> (the status it must get, httpx.post keyword arguments)."""
    good = photo.read_bytes()
    bomb = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(bomb, "PNG")  # 400 MP in a few hundred KB
    big = io.BytesIO()
    Image.new("RGB", (8_000, 6_000)).save(big, "PNG")  # 48 MP: over max_pixels, under PIL's own bomb limit
    fifty_mb = b"\xff\xd8" + os.urandom(50 * 1024 * 1024)

    def chunks():  # no Content-Length: the limit has to count the stream
        for i in range(0, len(fifty_mb), 1 << 20):
            yield fifty_mb[i : i + (1 << 20)]

    def upload(name, data):
        return {"files": [("file", (name, data))]}

    return {
        "not an image": (400, upload("notes.jpg", b"this is text, not a JPEG")),
        "truncated JPEG": (400, upload("cut.jpg", good[: len(good) // 3])),
        "decompression bomb": (413, upload("bomb.png", bomb.getvalue())),
        "too many pixels": (413, upload("huge.png", big.getvalue())),
        "50 MB upload": (413, upload("big.jpg", fifty_mb)),
        "50 MB streamed": (413, {"content": chunks(), "headers": {"content-type": "image/jpeg"}}),
        "empty body": (400, {}),
        "empty file": (400, upload("empty.jpg", b"")),
        "form without a file": (400, {"files": {"note": (None, b"hello")}}),
        "image URL": (400, {"files": {"url": (None, b"https://example.com/cat.jpg")}}),
        "URL in a web form": (400, {"data": {"image": "https://example.com/cat.jpg"}}),
        "JSON with a URL": (400, {"json": {"url": "https://example.com/cat.jpg"}}),
        "text body": (415, {"content": b"hello", "headers": {"content-type": "text/plain"}}),
        "broken multipart": (
            400,
            {"content": b"--x\r\nnonsense", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        ),
        "too many files": (400, {"files": [("file", ("a.jpg", good))] * 17}),
        "one bad file among good": (400, {"files": [("file", ("a.jpg", good)), ("file", ("b.jpg", b"nope"))]}),
        "top_k 0": (422, {**upload("a.jpg", good), "params": {"top_k": 0}}),
        "top_k word": (422, {**upload("a.jpg", good), "params": {"top_k": "many"}}),
    }


def test_every_bad_input_is_a_4xx_with_a_reason_and_the_server_stays_up(trained, photos, tmp_path):
    with running(trained) as url:
        for name, (status, kwargs) in bad_inputs(photos[0], tmp_path).items():
            response = httpx.post(f"{url}/predict", timeout=60, **kwargs)
            assert response.status_code == status, (name, response.status_code, response.text)
            assert response.json()["detail"], name
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        assert post(url, [(photos[0].name, photos[0].read_bytes())]).status_code == 200


def test_rate_limit_answers_429_with_retry_after(trained, photos):
    with running(trained, rate_limit=2) as url:
        codes = [post(url, [(photos[0].name, photos[0].read_bytes())]) for _ in range(3)]
    assert [c.status_code for c in codes] == [200, 200, 429]
    assert int(codes[2].headers["retry-after"]) >= 1 and "2 requests a minute" in codes[2].json()["detail"]


def test_batcher_refuses_beyond_max_pending_and_survives_a_failing_batch():
    from finetune.serve.batching import DynamicBatcher, Overloaded

    def forward(batch):
        if (batch < 0).any():
            raise RuntimeError("broken batch")
        time.sleep(0.05)
        return batch.sum(axis=1, keepdims=True)

    async def scenario():
        batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_s=0.01, max_pending=3)
        batcher.start()
        rows = await asyncio.gather(*(batcher.predict([np.full(2, i, np.float32)]) for i in range(3)))
        with pytest.raises(Overloaded):
            await batcher.predict([np.zeros(2, np.float32)] * 4)
        with pytest.raises(RuntimeError, match="broken batch"):
            await batcher.predict([np.full(2, -1, np.float32)])
        after = await batcher.predict([np.ones(2, np.float32)])
        await batcher.stop()
        return rows, after, batcher.batches

    rows, after, batches = asyncio.run(scenario())
    assert [float(r[0][0]) for r in rows] == [0.0, 2.0, 4.0] and float(after[0][0]) == 2.0
    assert batches == 2  # the three concurrent requests shared one batch


def test_rate_limiter_refills():
    from finetune.serve.guards import RateLimiter

    limiter = RateLimiter(per_minute=60)  # one a second, bursts of 60
    assert all(limiter.retry_after("a", now=0.0) == 0 for _ in range(60))
    assert limiter.retry_after("a", now=0.0) == pytest.approx(1.0)
    assert limiter.retry_after("b", now=0.0) == 0  # another client has its own bucket
    assert limiter.retry_after("a", now=1.5) == 0


@pytest.mark.slow
def test_demo_page_classifies_an_uploaded_photo(trained, photos, browser, tmp_path):
    """Upload a real photo through the page's file input, as a user would; read the answer off the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from finetune.use.load import load

    photo = photos[-1]
    want = load(trained).predict([str(photo)], top_k=3)[0]
    with running(trained) as url:
        browser.get(f"{url}/")
        WebDriverWait(browser, 30).until(
            lambda b: (
                "tf_" in b.find_element(By.ID, "model").text or "test_resnet" in b.find_element(By.ID, "model").text
            )
        )
        browser.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "answer").get_attribute("data-label"))
        label = browser.find_element(By.ID, "answer").get_attribute("data-label")
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .row")
        names = [row.find_element(By.CLASS_NAME, "name").text for row in bars]
        preview_loaded = browser.execute_script("return document.getElementById('preview').naturalWidth > 0")
        # a bad file shows the server's reason on the page
        bad = tmp_path / "notes.jpg"
        bad.write_bytes(b"not an image")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        WebDriverWait(browser, 30).until(lambda b: "error" in b.find_element(By.ID, "status").text)
        error = browser.find_element(By.ID, "status").text
    assert label == want.label and names == [name for name, _ in want.top_k] and preview_loaded
    assert "not an image" in error


@pytest.mark.slow
def test_cli_serves_until_interrupted_and_refuses_a_busy_port(trained, photos, tmp_path):
    env = {**os.environ, "FINETUNE_CACHE": str(tmp_path / "cache")}
    server = subprocess.Popen(
        [*FINETUNE, "serve", f"ckpt={trained}", "port=0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        first = server.stdout.readline()
        while "serving" not in first:  # ONNX: one export line first
            assert server.poll() is None, server.stderr.read()
            first = server.stdout.readline()
        url = re.search(r"on (http://\S+)", first).group(1)
        assert "runtime onnx" in first
        for _ in range(100):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                time.sleep(0.1)
        answer = post(url, [(photos[0].name, photos[0].read_bytes())])
        assert answer.status_code == 200
        assert_refused(
            finetune_cli("serve", f"ckpt={trained}", f"port={url.rsplit(':', 1)[1]}", env=env), "cannot listen"
        )
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["port=eighty"], "port='eighty' is not a number"),
        (["port=70000"], "at most 65535"),
        (["max_upload_mb=0"], "max_upload_mb='0' must be"),
        (["runtime=tensorrt"], "runtime='tensorrt'; choose one of"),
        (["ckpt=/nonexistent.ckpt"], "does not exist"),
        (["colour=blue"], "unexpected argument 'colour=blue'"),
    ],
)
def test_cli_refuses_bad_options_in_one_line(trained, args, message):
    args = args if any(a.startswith("ckpt=") for a in args) else [f"ckpt={trained}", "port=0", *args]
    assert_refused(finetune_cli("serve", *args, timeout=120), message)
