"""Messy real-world files: each is converted correctly, or skipped and counted with its reason."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK, TINY, class_image, write_class_folders
from PIL import Image

from finetune import fit
from finetune.commands import check_data_command
from finetune.data.datamodule import ImageDataset, collate_skipping_unreadable
from finetune.data.images import UnreadableImage, load_rgb, probe


def truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    class_image(0, np.random.default_rng(0), size=64).save(buffer, "JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def decompression_bomb(path: Path) -> None:
    """A 100-byte PNG whose header claims 30000 x 30000 pixels (900 million)."""
    buffer = io.BytesIO()
    Image.new("1", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", 30000, 30000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


BAD = {  # file name -> (writer, expected reason fragment)
    "zero.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "truncated.jpg": (truncated_jpeg, "truncated"),
    "text.jpg": (lambda p: p.write_text("<html>404 Not Found</html>"), "not a readable image"),
    ".DS_Store": (lambda p: p.write_bytes(b"\0\0\0\1Bud1\0"), "hidden file"),
    "readme.md": (lambda p: p.write_text("# notes"), "not an image file"),
    "bomb.png": (decompression_bomb, "decompression bomb"),
}


def convertible(directory: Path, label: int) -> list[Path]:
    """Images in every awkward mode, dominated by class `label`'s color channel when colored."""
    rng = np.random.default_rng(label)
    base = class_image(label, rng, size=48)
    out = []

    def save(name, image, **kwargs):
        image.save(directory / name, **kwargs)
        out.append(directory / name)

    save("cmyk.jpg", base.convert("CMYK"), quality=95)
    save("gray.png", base.convert("L"))
    save("wide16.png", Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257))
    save("rgba.png", base.convert("RGBA"))
    save("palette.png", base.convert("P"))
    return out


def exif_rotated(path: Path) -> None:
    """A 60x40 (w x h) picture, white in its top-left corner, stored turned 90 degrees clockwise
    with EXIF orientation 8 (turn 90 degrees counter-clockwise to display)."""
    upright = np.zeros((40, 60, 3), np.uint8)
    upright[:10, :15] = 255
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_270)
    exif = stored.getexif()
    exif[0x0112] = 8
    stored.save(path, exif=exif, quality=95)


def test_each_bad_kind_is_refused_with_its_reason(tmp_path):
    for name, (write, reason) in BAD.items():
        if name.startswith(".") or name.endswith(".md"):
            continue  # never opened as images: skipped by name
        write(tmp_path / name)
        with pytest.raises(UnreadableImage, match=reason):
            load_rgb(tmp_path / name)
    probe(tmp_path / "truncated.jpg")  # the header is fine: only decoding finds the damage


def test_awkward_modes_decode_to_upright_rgb_with_the_right_colors(tmp_path):
    for path in convertible(tmp_path, label=0):
        image = load_rgb(path)
        assert image.dtype == np.uint8 and image.shape == (48, 48, 3), path.name
        if path.stem not in ("gray", "wide16"):
            assert image[..., 0].mean() > image[..., 1].mean() + 60, path.name  # still red-dominated
    exif_rotated(tmp_path / "exif.jpg")
    upright = load_rgb(tmp_path / "exif.jpg")
    assert upright.shape == (40, 60, 3)
    assert upright[:10, :15].mean() > 200 and upright[10:, 15:].mean() < 30


def test_undecodable_file_mid_run_is_left_out_of_its_batch_and_reported(tmp_path):
    write_class_folders(tmp_path, classes=("a",), per_class=2)
    truncated_jpeg(tmp_path / "a" / "bad.jpg")
    samples = [(str(p), 0) for p in sorted((tmp_path / "a").iterdir())]
    dataset = ImageDataset(samples, lambda image: {"image": torch.from_numpy(image.copy()).permute(2, 0, 1)})
    images, labels, failures = collate_skipping_unreadable([dataset[i] for i in range(len(dataset))])
    assert len(labels) == 2 and images.shape[0] == 2
    assert [p.rsplit("/", 1)[-1] for p, _ in failures] == ["bad.jpg"]


def inject(train: Path, classes: list[str]) -> set[str]:
    """One bad file of each kind (in the first class) and the awkward modes (in every class)."""
    injected = set()
    for name, (write, _) in BAD.items():
        write(train / classes[0] / name)
        injected.add(str(train / classes[0] / name))
    for label, c in enumerate(classes):
        convertible(train / c, label)
    exif_rotated(train / classes[0] / "exif.jpg")
    return injected


def test_run_with_every_bad_kind_injected_finishes_and_reports_exactly_them(tmp_path):
    root = tmp_path / "data"
    write_class_folders(root / "train", per_class=8)
    write_class_folders(root / "val", per_class=4, seed=1)
    injected = inject(root / "train", ["ants", "bees", "wasps"])
    result = fit("full_finetune", TINY + QUICK + ["data=folder", f"data.root={root}", f"hydra.run.dir={tmp_path}/run"])
    assert {path for path, _ in result.data_report.skipped} == injected
    reasons = {Path(p).name: r for p, r in result.data_report.skipped}
    for name, (_, reason) in BAD.items():
        assert reason in reasons[name], (name, reasons[name])
    # 8 generated + 5 awkward modes each (+ exif.jpg, + truncated.jpg: its header reads fine, decoding fails)
    assert result.data_report.counts["train"] == {"ants": 15, "bees": 13, "wasps": 13}


def placeholder_gif(path: Path) -> None:
    """What scrapers save when the picture is gone: flat gray, a frame and a line of text."""
    from PIL import ImageDraw

    image = Image.new("RGB", (300, 300), (238, 238, 238))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 289, 289), outline=(200, 200, 200))
    draw.text((60, 140), "WE'RE SORRY, THIS IMAGE COULD NOT BE FOUND.", fill=(80, 80, 80))
    image.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(path)


def test_check_data_command_decodes_everything_and_flags_duplicates_and_placeholders(tmp_path, capsys):
    root = tmp_path / "data"
    write_class_folders(root / "train", per_class=3)
    write_class_folders(root / "val", per_class=2, seed=1)
    truncated_jpeg(root / "train" / "ants" / "cut.jpg")
    shutil.copy(root / "train" / "bees" / "bees_0.jpg", root / "val" / "bees" / "copy.jpg")
    shutil.copy(root / "train" / "bees" / "bees_1.jpg", root / "train" / "wasps" / "mislabeled.jpg")
    placeholder_gif(root / "train" / "ants" / "imageNotFound.gif")
    assert check_data_command(["data=folder", f"data.root={root}"]) == 0
    out = capsys.readouterr().out
    assert "cut.jpg" in out and "truncated" in out
    assert "duplicates across splits: 1" in out and "optimistic" in out
    conflict = next(line for line in out.splitlines() if "different classes" in line)
    assert "1 training images" in conflict and "bees_1.jpg" in conflict and "mislabeled.jpg" in conflict
    blank = next(line for line in out.splitlines() if "near-blank" in line)
    assert blank.startswith("warning: 1 near-blank images") and "imageNotFound.gif" in blank


def test_near_blank_share_separates_placeholders_from_objects_on_white(tmp_path):
    from finetune.data.check import NEAR_BLANK_SHARE, near_blank_share

    placeholder_gif(tmp_path / "gone.gif")
    assert near_blank_share(load_rgb(tmp_path / "gone.gif")) >= NEAR_BLANK_SHARE
    # a product shot: a dark object covering a fifth of a white, slightly noisy JPEG
    photo = np.full((240, 320, 3), 255, np.uint8)
    photo[80:176, 100:260] = (150, 60, 20)
    Image.fromarray(photo).save(tmp_path / "object.jpg", quality=90)
    assert 0.7 < near_blank_share(load_rgb(tmp_path / "object.jpg")) < NEAR_BLANK_SHARE
    assert near_blank_share(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)) < 0.01


@pytest.mark.slow
def test_check_data_finds_the_placeholder_in_hymenoptera_and_nothing_else(hymenoptera, capsys):
    assert check_data_command(["data=folder", f"data.root={hymenoptera}"]) == 0
    out = capsys.readouterr().out
    assert "skipped files: 0; duplicates across splits: 0" in out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1 near-blank images" in warnings[0], warnings
    assert "train/ants/imageNotFound.gif" in warnings[0]


@pytest.mark.slow
def test_hymenoptera_with_bad_files_injected_keeps_its_accuracy(hymenoptera, tmp_path):
    root = tmp_path / "hymenoptera"
    shutil.copytree(hymenoptera, root, copy_function=lambda src, dst: Path(dst).symlink_to(src))
    injected = inject(root / "train", ["ants", "bees"])
    result = fit(
        "freeze_all_but_head",
        data="folder",
        data__root=root,
        logger="none",
        trainer__max_epochs=8,
        callbacks__progress_bar=False,
        hydra__run__dir=tmp_path / "run",
    )
    assert {path for path, _ in result.data_report.skipped} == injected
    assert result.metrics["val/acc"] >= 0.95, result.history


class _KilledInWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does to a worker


def test_a_dead_worker_becomes_a_message_with_the_fix():
    from finetune.data.datamodule import explain_worker_failure
    from finetune.errors import DataError

    loader = torch.utils.data.DataLoader(_KilledInWorker(), num_workers=1)
    with pytest.raises(RuntimeError) as caught:
        next(iter(loader))
    explained = explain_worker_failure(caught.value)
    assert isinstance(explained, DataError)
    assert "data.num_workers=0" in str(explained) and "shm" in str(explained)
    assert explain_worker_failure(RuntimeError("CUDA out of memory")).args == ("CUDA out of memory",)


@pytest.mark.parametrize(
    "message, expected",
    [
        ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
        (
            "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
            True,
        ),
        (
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 8 bytes.",
            True,
        ),
        (
            "[enforce fail at alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough memory: you tried to "
            "allocate 8 bytes.",
            True,
        ),  # Windows' wording, which Lightning's detector does not know
        ("MPS backend out of memory (MPS allocated: 8.00 GB)", True),
        ("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", False),
        ("DataLoader worker (pid 123) is killed by signal: Killed.", False),
    ],
)
def test_out_of_memory_is_recognized_in_every_wording(message, expected):
    from finetune.train.faults import is_out_of_memory

    assert is_out_of_memory(RuntimeError(message)) is expected
    assert is_out_of_memory(torch.OutOfMemoryError(message)) is True
    assert is_out_of_memory(ValueError(message)) is False
