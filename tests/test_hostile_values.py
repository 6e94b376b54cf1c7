"""Values and files that make no sense get one clear sentence, never a traceback, a run that
means nothing, or a silent correction (GitHub issue "A hostile world", item 6 and its list of
"tracebacks where a sentence belongs")."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import class_image, write_class_folders

from finetune.commands.preflight import check_overrides
from finetune.config import check_types, compose_config
from finetune.data.check import check_data
from finetune.data.sources import load_folder, load_manifest
from finetune.errors import ConfigError, DataError, WeightsError
from finetune.model.weights import read_state_dict

# ---------------------------------------------------------------------------------------------
# Config values (checked by check_types before a run starts; the CLI exits 2 with the message)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["seed=-5"], r"seed=-5: it must be an integer from 0 to 2\*\*32 - 1"),
        (["seed=4294967296"], "seed=4294967296: it must be an integer from 0"),
        (["head.dropout=1.5"], "head.dropout=1.5: a dropout of 1 or more drops every feature"),
        (["head.dropout=-0.1"], "head.dropout=-0.1: it must be a probability"),
        (["trainer.precision=bad"], "trainer.precision='bad': choose one of auto, 32-true, bf16-mixed"),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0: 0 epochs trains nothing"),
        (["trainer.max_epochs=-1"], "never stops by itself; set callbacks.early_stopping_patience"),
        (["data.image_size=0"], "data.image_size=0: it must be null .* at least 16"),
        (["data.image_size=1"], "data.image_size=1: it must be null .* at least 16"),
    ],
)
def test_values_that_make_no_sense_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_types(compose_config(overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["trainer.max_epochs=-1", "callbacks.early_stopping_patience=3"],
        ["trainer.precision=16"],
        ["trainer.precision=bf16-mixed"],
        ["data.image_size=16"],
        ["head.dropout=0.5"],
        ["seed=0"],
        ["+recipe=lenet_from_scratch"],
    ],
)
def test_sensible_values_pass(overrides):
    check_types(compose_config(overrides))


def test_an_added_key_nothing_reads_is_refused_with_the_key_that_is_read():
    with pytest.raises(
        ConfigError, match=r"optimizer.lrr is not a setting finetune reads; did you mean optimizer.lr\?"
    ):
        check_overrides(["+optimizer.lrr=0.1"])
    with pytest.raises(ConfigError, match="trainer.gradient_clip_vall is not a setting finetune reads"):
        check_overrides(["+trainer.gradient_clip_vall=1.0"])
    # Lightning Trainer arguments and keys that some config file sets are read.
    check_overrides(["+trainer.gradient_clip_val=1.0", "+trainer.limit_train_batches=2"])
    check_overrides(["scheduler=step", "+scheduler.min_lr=0.0"])  # cosine.yaml sets it


@pytest.mark.parametrize(
    "args, message",
    [
        (["+optimizer.lrr=0.1"], "did you mean optimizer.lr?"),
        (["seed=-5", "trainer.accelerator=cpu", "logger=none"], "seed=-5: it must be an integer"),
    ],
)
def test_cli_exits_2_with_the_sentence(args, message, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "finetune", *args, f"hydra.run.dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------
# Data


def _images(folder, names, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        class_image(i % 2, rng).save(folder / name)


def _manifest(tmp_path, text: bytes | str, name="labels.csv"):
    _images(tmp_path / "img", [f"{c}{i}.jpg" for c in "ab" for i in range(4)])
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _rows(sep=",", extra=()):
    rows = [f"img/{c}{i}.jpg{sep}{c}" for c in "ab" for i in range(4)] + list(extra)
    return "\n".join([f"path{sep}label", *rows]) + "\n"


def test_latin1_manifest_names_the_file_and_byte_offset(tmp_path):
    text = _rows().replace("img/a0.jpg,a", "img/a0.jpg,café").encode("latin-1")
    path = _manifest(tmp_path, text)
    offset = text.index(b"\xe9")
    with pytest.raises(
        DataError, match=rf"labels.csv is not UTF-8 text \(byte 0xe9 at offset {offset};.*re-save it as UTF-8"
    ):
        load_manifest(str(path), None, "path", "label", None, "{}", 0.25, 0)


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_manifest_delimiter_is_sniffed_from_the_header(tmp_path, sep):
    path = _manifest(tmp_path, _rows(sep))
    splits = load_manifest(str(path), None, "path", "label", None, "{}", 0.25, 0)
    assert splits.classes == ["a", "b"] and len(splits.train) + len(splits.val) == 8


def test_duplicated_rows_and_paths_leaving_root_are_reported(tmp_path):
    _images(tmp_path / "elsewhere", ["x.jpg"])
    path = _manifest(tmp_path, _rows(extra=["img/a0.jpg,a", "img/a0.jpg,a", "elsewhere/../../x.jpg,b"]))
    (tmp_path.parent / "x.jpg").write_bytes((tmp_path / "elsewhere" / "x.jpg").read_bytes())
    splits = load_manifest(str(path), None, "path", "label", None, "{}", 0.25, 0)
    warnings = " | ".join(check_data(splits).warnings)
    assert "1 files are listed on more than one row (2 extra rows" in warnings
    assert "1 paths lead outside data.root" in warnings


def test_single_class_is_refused_before_training(tmp_path):
    write_class_folders(tmp_path / "data", classes=("ants",), per_class=6)
    splits = load_folder(str(tmp_path / "data"), None, None, 0.25, 0)
    with pytest.raises(DataError, match="needs at least 2 classes"):
        check_data(splits)


def test_class_folder_without_readable_images_is_an_error(tmp_path):
    write_class_folders(tmp_path / "data", classes=("ants", "bees"), per_class=6)
    (tmp_path / "data" / "wasps").mkdir()
    (tmp_path / "data" / "wasps" / "notes.txt").write_text("todo: collect wasps")
    (tmp_path / "data" / "wasps" / "broken.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="wasps has no readable training images"):
        load_folder(str(tmp_path / "data"), None, None, 0.25, 0)


def test_batch_larger_than_the_training_set_is_noted(tmp_path):
    write_class_folders(tmp_path / "data", classes=("ants", "bees"), per_class=6)
    splits = load_folder(str(tmp_path / "data"), None, None, 0.25, 0)
    warnings = check_data(splits, batch_size=100000).warnings
    assert any(
        f"data.batch_size=100000 is larger than the training set ({len(splits.train)} images)" in w for w in warnings
    )
    assert not any("batch_size" in w for w in check_data(splits, batch_size=4).warnings)


# ---------------------------------------------------------------------------------------------
# Files given as weights or checkpoints


class _Exploit:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def _write(tmp_path, name, content):
    path = tmp_path / name
    if name == "evil.ckpt":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit()}, path)
    else:
        path.write_bytes(content)
    return path


BAD_FILES = [
    ("random.ckpt", np.random.default_rng(0).bytes(4096), "4096 bytes of unknown format"),
    ("empty.ckpt", b"", "it is empty"),
    ("model.onnx", b"\x08\x07\x12\x07pytorch\x1a\x032.1" + bytes(64), "it is an ONNX model"),
    ("config.json", b'{"classes": ["ants", "bees"]}', "it is JSON text"),
    ("truncated.ckpt", b"PK\x03\x04" + bytes(40), "not a readable torch file"),
    ("evil.ckpt", None, "Refusing to load .* GLOBAL print"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_weight_files_say_what_they_are(tmp_path, name, content, message):
    with pytest.raises(WeightsError, match=message) as raised:
        read_state_dict(_write(tmp_path, name, content))
    assert "weights_only=False" not in str(raised.value) and "weights_only` set to `False" not in str(raised.value)
    if name != "evil.ckpt":
        assert "expected a torch file (.ckpt / .pth" in str(raised.value)


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_finetune_load_says_what_the_file_is(tmp_path, name, content, message):
    import finetune

    with pytest.raises(WeightsError, match=message):
        finetune.load(_write(tmp_path, name, content))


def test_resuming_with_fewer_epochs_than_the_checkpoint_finished_is_refused(tmp_path, image_folder):
    from conftest import QUICK, TINY

    from finetune import fit
    from finetune.errors import ConfigError

    quick = [a for a in QUICK if not a.startswith("trainer.max_epochs=")]
    args = ["data=folder", f"data.root={image_folder}", *TINY, *quick, f"hydra.run.dir={tmp_path / 'run'}"]
    fit(overrides=[*args, "trainer.max_epochs=3", "callbacks.checkpoint.min_write_interval_s=0"])
    with pytest.raises(ConfigError, match=r"already finished epoch 3, beyond trainer.max_epochs=2"):
        fit(overrides=[*args, "trainer.max_epochs=2", "resume=true"])
