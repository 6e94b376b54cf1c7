"""Per-file work (header probes, content hashes) is remembered across processes in
``data.cache.dir/files.sqlite``: a later process on the same files reads none of them again, a
changed file is read again, and a store that cannot be used only costs the speed-up."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from finetune.data import file_memo
from finetune.data.file_memo import STORE_NAME, FileStore, StoredImage, remembered_per_file


@pytest.fixture(autouse=True)
def own_store():
    """Each test names its store; the session's store (if any) comes back after."""
    before = file_memo._store
    yield
    if file_memo._store not in (None, before):
        file_memo._store.close()
    file_memo._store = before


def counted(calls: list):
    """A remembered function that records every real call. Every call of this factory gives a
    fresh in-process memory under the same name: what a new process on the same store sees."""

    def measure(path):
        calls.append(str(path))
        return (len(str(path)), 2)

    return remembered_per_file(measure)


def test_a_later_process_takes_the_result_from_the_store_until_the_file_changes(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(image)
    file_memo.keep_in(tmp_path / "cache")
    first_calls, later_calls = [], []
    first = counted(first_calls)(image)
    file_memo.flush()
    later = counted(later_calls)
    assert later(image) == first == (len(str(image)), 2)  # a tuple, stored as a JSON list, comes back a tuple
    assert (len(first_calls), later_calls) == (1, [])
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same bytes, new mtime
    assert counted(later_calls)(image) == first and later_calls == [str(image)]
    # A stored image (a dataset's row) is keyed by its name, which holds its content fingerprint.
    row = StoredImage("rows.arrow#7@fingerprint")
    counted(first_calls)(row)
    file_memo.flush()
    assert counted(later_calls)(row) == (len(row), 2) and later_calls == [str(image)]


def test_the_store_is_written_by_a_process_and_read_by_another(tmp_path):
    """A real second process: its probes and digests reach the store when it exits, and their
    results are what this process computes itself."""
    from finetune.data.file_memo import _hashed, file_digest
    from finetune.data.images import probe

    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (5 + i, 7)).save(images[-1])
    script = (
        "import sys; from finetune.data import file_memo; from finetune.data.images import probe; "
        "from finetune.data.file_memo import file_digest; file_memo.keep_in(sys.argv[1]); "
        "[(probe(p), file_digest(p)) for p in sys.argv[2:]]"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache"), *map(str, images)], check=True)
    store = FileStore(tmp_path / "cache" / STORE_NAME)
    for path in images:
        stat = path.stat()
        key = [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]
        assert tuple(store.get(probe.__qualname__, str(path.resolve()), key)) == probe(path)
        assert store.get(_hashed.__qualname__, str(path.resolve()), key) == file_digest(path)
    assert store.get(probe.__qualname__, str(images[0].resolve()), [0, 0, 0, 0]) is None  # another stat


def test_a_store_that_cannot_be_opened_is_said_once_and_costs_only_the_speed_up(tmp_path, caplog):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would be")
    file_memo.keep_in(blocker)
    calls = []
    remembered = counted(calls)
    for name in ("x.png", "y.png"):
        (tmp_path / name).write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="finetune.data.file_memo"):
        for name in ("x.png", "y.png", "x.png"):
            assert remembered(tmp_path / name) == (len(str(tmp_path / name)), 2)
        file_memo.flush()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "files are read again in every process" in warnings[0], warnings
    assert len(calls) == 2  # this process still remembers


def test_a_forked_child_never_writes_its_parents_pending_rows(tmp_path):
    """DataLoader workers are forked: a copy of the parent's connection or of its unwritten rows
    must not be used by the child."""
    file_memo.keep_in(tmp_path / "cache")
    image = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(image)
    counted([])(image)  # pending in the parent, not written yet
    pid = os.fork()
    if pid == 0:  # the child: flushing here must write nothing
        try:
            file_memo.flush()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    stat = image.stat()
    key = [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]
    stored = FileStore(Path(tmp_path / "cache" / STORE_NAME)).get  # a fresh reader each time: another process
    assert stored("counted.<locals>.measure", str(image.resolve()), key) is None
    file_memo.flush()
    assert FileStore(Path(tmp_path / "cache" / STORE_NAME)).get(
        "counted.<locals>.measure", str(image.resolve()), key
    ) == [len(str(image)), 2]


def test_moving_to_another_store_writes_and_lets_the_last_one_go(tmp_path):
    """A process that loads data with several cache folders (a test session, a notebook) keeps
    one store open, not one per folder it ever used."""
    image = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(image)

    def open_stores() -> set[str]:
        names = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # closed in between
                continue
            if STORE_NAME in target and target.startswith(str(tmp_path)):
                names.add(str(Path(target).parent))
        return names

    for i in range(4):
        file_memo.keep_in(tmp_path / f"cache{i}")
        counted([])(image)
    assert open_stores() == {str(tmp_path / "cache3")}
    file_memo.keep_in(None)
    assert open_stores() == set()
    later = []
    assert counted(later)(image) and later == [str(image)]  # no store: computed again
    stat = image.stat()
    key = [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]
    for i in range(4):  # each folder got its rows when the process moved on
        assert FileStore(tmp_path / f"cache{i}" / STORE_NAME).get("counted.<locals>.measure", str(image), key)
