"""Shared fixtures: generated image folders, a tiny timm backbone, the real hymenoptera data."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports wandb or albumentations: tests never talk to a server.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Frozen-feature caches of the test session go to a fresh folder, never to ~/.cache.
os.environ.setdefault("FINETUNE_CACHE", __import__("tempfile").mkdtemp(prefix="finetune-cache-"))

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = Path(os.environ.get("FINETUNE_HYMENOPTERA", REPO.parent / "shared" / "datasets" / "hymenoptera_data"))
POKEMON = Path(os.environ.get("FINETUNE_POKEMON", REPO.parent / "shared" / "datasets" / "pokemon_types"))

# A tiny real timm model (0.4M params, BatchNorm, 4 stages) with random weights: fast and offline.
TINY = ["backbone.name=test_resnet", "backbone.weights=random", "data.image_size=32"]
QUICK_WITH_PICTURES = [
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "data.num_workers=0",
    "logger=none",
    "callbacks.progress_bar=false",
]
QUICK = QUICK_WITH_PICTURES + ["viz=none"]  # pictures have their own tests (tests/viz/)


def shared_dataset(root: Path, present: bool, name: str, variable: str) -> Path:
    """`root` when the caller found its data `present`; otherwise a skip, or under CI a failure."""
    if present:
        return root
    message = f"{name} data not found at {root} (set {variable}=DIR)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    """The real ants-vs-bees data. Missing under CI is a failure, not a skip."""
    present = (HYMENOPTERA / "train").is_dir() and (HYMENOPTERA / "val").is_dir()
    return shared_dataset(HYMENOPTERA, present, "hymenoptera", "FINETUNE_HYMENOPTERA")


@pytest.fixture(scope="session")
def pokemon() -> Path:
    """The real multi-label pokemon_types data (labels.csv + images/). Missing under CI is a failure."""
    present = (POKEMON / "labels.csv").is_file() and (POKEMON / "images").is_dir()
    return shared_dataset(POKEMON, present, "pokemon_types", "FINETUNE_POKEMON")


def finetune_cli(*args: str, timeout: float = 600, env: dict | None = None):
    """`finetune ARGS` in a fresh process (this interpreter): the CompletedProcess, output captured."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "finetune", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_refused(result, message: str) -> None:
    """`result` (a CompletedProcess) is a user mistake told in one line containing `message`, exit code 2."""
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


CHROMIUM = Path(os.environ.get("FINETUNE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("FINETUNE_CHROMEDRIVER", "/usr/bin/chromedriver"))


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven by Selenium, as a user's browser would load a page (Debian's
    chromium and chromium-driver; .ci/run installs them). Missing under CI is a failure, not a skip."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        message = (
            f"chromium not found at {CHROMIUM} or chromedriver at {CHROMEDRIVER} "
            "(apt-get install chromium chromium-driver, or set FINETUNE_CHROMIUM / FINETUNE_CHROMEDRIVER)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1024",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def write_multilabel_manifest(root: Path, per_set: int = 6, seed: int = 0) -> Path:
    """ROOT/images/*.png and ROOT/labels.csv (file,labels): each image's labels are the color
    channels it boosts ("red green", "blue", "" for none): a learnable multi-label task."""
    rng = np.random.default_rng(seed)
    names = ("red", "green", "blue")
    sets = [(), (0,), (1,), (2,), (0, 1), (1, 2), (0, 2)]
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["file,labels"]
    for s, labels in enumerate(sets):
        for i in range(per_set):
            array = rng.integers(0, 90, size=(40, 40, 3), dtype=np.uint8)
            for channel in labels:
                array[..., channel] += 150
            Image.fromarray(array).save(root / "images" / f"img_{s}_{i}.png")
            rows.append(f"images/img_{s}_{i}.png,{' '.join(names[c] for c in labels)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def class_image(label: int, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A noisy image whose dominant color channel is its class: learnable in a few steps."""
    array = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
    array[..., label % 3] += 150
    return Image.fromarray(array)


def write_class_folders(root: Path, classes=("ants", "bees", "wasps"), per_class: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            class_image(label, rng).save(root / name / f"{name}_{i}.jpg", quality=95)
    return root


def fit_tiny_on_folders(root: Path, per_class: int, val_per_class: int, epochs: int = 3, extra: tuple = ()):
    """A TINY full fine-tune on fresh class folders under ROOT/data, in fp32 (validation under
    bf16 autocast would not be reproduced to 1e-4 by the fp32 commands), run in ROOT/run."""
    from finetune import fit

    write_class_folders(root / "data" / "train", per_class=per_class)
    write_class_folders(root / "data" / "val", per_class=val_per_class, seed=1)
    return fit(
        "full_finetune",
        TINY
        + QUICK
        + [
            "data=folder",
            f"data.root={root / 'data'}",
            f"trainer.max_epochs={epochs}",
            "optimizer.lr=0.05",
            "augment=none",
            "trainer.precision=32-true",
            *extra,
            f"hydra.run.dir={root / 'run'}",
        ],
    )


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """DIR/train/<3 classes>/*.jpg (8 each) and DIR/val/<3 classes>/*.jpg (4 each)."""
    write_class_folders(tmp_path / "data" / "train", per_class=8, seed=0)
    write_class_folders(tmp_path / "data" / "val", per_class=4, seed=1)
    return tmp_path / "data"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
