"""Per-process memory of per-file work (header probes, content hashes), keyed by the file's stat.

A sweep calls ``fit`` dozens of times on the same folder; probing 400 headers and hashing 30 MB
of images again for every trial costs more than training a head on cached features. A file whose
path, size, inode, modification or status-change time changed is read again (the change time
cannot be set back, so a file rewritten with its old mtime restored is still noticed); nothing is
kept across processes.

A :class:`StoredImage` is a sample whose encoded image lives elsewhere than in a file of its own
(a row of a Hugging Face dataset): a string naming it (what reports, skip lists and cache keys
show) that can give its bytes. Its name is its identity (it includes a content fingerprint), so
its memo needs no stat.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class StoredImage(str):
    """A string naming an image stored elsewhere; :meth:`encoded` gives the encoded file's bytes.
    Equal names mean equal content (subclasses put a content fingerprint in the name)."""

    def encoded(self) -> bytes:
        raise NotImplementedError


MAX_ENTRIES = 1_000_000  # about 200 MB of keys at most; beyond it the memory starts afresh


def remembered_per_file(fn: Callable[[str | os.PathLike], T]) -> Callable[[str | os.PathLike], T]:
    """`fn(path)`, computed once per (path, size, inode, mtime, ctime) in this process. Exceptions
    are not remembered (a failing file is tried again); a path that cannot be stat'ed is passed through."""
    memory: dict[tuple, T] = {}

    @functools.wraps(fn)
    def wrapper(path):
        if isinstance(path, StoredImage):
            key = (type(path).__name__, str(path))
            if key not in memory:
                memory[key] = fn(path)
            return memory[key]
        try:
            stat = os.stat(path)
        except OSError:
            return fn(path)
        key = (os.fspath(path), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)
        if key not in memory:
            if len(memory) >= MAX_ENTRIES:
                memory.clear()
            memory[key] = fn(path)
        return memory[key]

    return wrapper


@remembered_per_file
def file_digest(path: str | os.PathLike) -> str:
    """A hex digest of the file's bytes (BLAKE2b, 128 bits): equal contents, equal digests."""
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(path, StoredImage):
        if getattr(path, "digest", None):  # known from where it is stored (streamed shards)
            return path.digest
        digest.update(path.encoded())
        return digest.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
