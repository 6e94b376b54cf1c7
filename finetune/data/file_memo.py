"""Memory of per-file work (header probes, content hashes), keyed by the file's stat: within a
process, and across processes in ``files.sqlite`` in the feature cache's folder (``data.cache.dir``).

A sweep calls ``fit`` dozens of times on the same folder; probing 400 headers and hashing 30 MB
of images again for every trial costs more than training a head on cached features. And every new
process on 100,000 files read all 3.9 GB of them again before its first step (35-60 s here): the
second and later processes on the same files (a run after ``check-data``, DDP ranks, SLURM jobs)
now take each file's digest and header from the store, a stat per file. A file whose path, size,
inode, modification or status-change time changed is read again (the change time cannot be set
back, so a file rewritten with its old mtime restored is still noticed).

The store is a speed-up, never a source of truth: a store that cannot be opened or written (a
read-only cache, a full disk, a damaged file) is said once and the process goes on with its own
memory. Written with the standard library's sqlite3 (WAL, so that several processes share it)
rather than a cache package: the memo needs a lookup and an upsert per file, nothing more.

A :class:`StoredImage` is a sample whose encoded image lives elsewhere than in a file of its own
(a row of a Hugging Face dataset): a string naming it (what reports, skip lists and cache keys
show) that can give its bytes. Its name is its identity (it includes a content fingerprint), so
its memo needs no stat.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class StoredImage(str):
    """A string naming an image stored elsewhere; :meth:`encoded` gives the encoded file's bytes.
    Equal names mean equal content (subclasses put a content fingerprint in the name)."""

    def encoded(self) -> bytes:
        raise NotImplementedError


MAX_ENTRIES = 1_000_000  # about 200 MB of keys at most; beyond it the memory starts afresh
STORE_NAME = "files.sqlite"
FLUSH_EVERY = 2000  # new entries written in one transaction
SCHEMA = "CREATE TABLE IF NOT EXISTS memo (fn TEXT, path TEXT, stat TEXT, value TEXT, PRIMARY KEY (fn, path))"


class FileStore:
    """Per-file results kept across processes: a row per (function, path) with the stat key it
    was computed for and the JSON of the result. New rows are written a batch at a time (and at
    :meth:`flush`). A forked child (a DataLoader worker) reads through a connection of its own and
    writes nothing: the parent writes the rows it computed (:meth:`after_fork`)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._pending: list[tuple] = []
        self._rows: dict[str, dict[str, tuple[str, object]]] = {}  # fn -> path -> (stat text, result)
        self._connection: sqlite3.Connection | None = None
        self._broken = False
        self._forked = False
        atexit.register(self.flush)

    def get(self, fn: str, name: str, stat: list) -> object:
        """The stored result of `fn` for `name` at `stat`, or None. The first call for `fn` reads
        and decodes all its rows at once (one query, about 30 MB for 100,000 files), not a query
        per file: a lookup is then a dict access and a string comparison."""
        with self._lock:
            if fn not in self._rows:
                connection = self._connect()
                if connection is None:
                    return None
                try:
                    rows = connection.execute("SELECT path, stat, value FROM memo WHERE fn = ?", (fn,)).fetchall()
                    values = json.loads("[" + ",".join(value for _, _, value in rows) + "]")  # one parse, not 100,000
                except (sqlite3.Error, ValueError) as err:
                    return self._give_up(err)
                self._rows[fn] = {path: (known, value) for (path, known, _), value in zip(rows, values)}
            row = self._rows[fn].get(name)
        return row[1] if row is not None and row[0] == _stat_text(stat) else None

    def put(self, fn: str, name: str, stat: list, value: object) -> None:
        with self._lock:
            row = (fn, name, _stat_text(stat), json.dumps(value))
            self._pending.append(row)
            if fn in self._rows:
                self._rows[fn][name] = (row[2], value)
            if len(self._pending) >= FLUSH_EVERY:
                self._write()

    def flush(self) -> None:
        with self._lock:
            self._write()

    def close(self) -> None:
        """Write what is pending and let the file go (a process that moves to another store)."""
        self.flush()
        atexit.unregister(self.flush)
        with self._lock:
            if self._connection is not None:
                self._connection.close()
            self._connection, self._rows = None, {}

    def after_fork(self) -> None:
        """In a forked child: drop the parent's connection (never share one), its unwritten rows
        (the parent writes them) and its lock (another thread may have held it at the fork)."""
        self._lock = threading.Lock()
        self._connection, self._pending, self._forked = None, [], True

    def _write(self) -> None:
        rows, self._pending = self._pending, []
        if self._forked:
            return
        connection = self._connect() if rows else None
        if connection is None:
            return
        try:
            with connection:
                connection.executemany("INSERT OR REPLACE INTO memo VALUES (?, ?, ?, ?)", rows)
        except sqlite3.Error as err:
            self._give_up(err)

    def _connect(self) -> sqlite3.Connection | None:
        if self._broken:
            return None
        if self._connection is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                connection = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
                connection.execute("PRAGMA journal_mode=WAL")
                with connection:
                    connection.execute(SCHEMA)
                self._connection = connection
            except (sqlite3.Error, OSError) as err:
                return self._give_up(err)
        return self._connection

    def _give_up(self, err: Exception) -> None:
        if not self._broken:
            log.warning(
                "file memo: %s cannot be used (%s); files are read again in every process "
                "(data.cache.dir=DIR keeps it elsewhere)",
                self.path,
                err,
            )
        self._broken, self._pending, self._rows = True, [], {}
        return None


def _stat_text(stat: list) -> str:
    """How a stat key is stored: its items joined by commas (far cheaper per file than JSON)."""
    return ",".join(map(str, stat))


_store: FileStore | None = None


def _after_fork_in_child() -> None:
    if _store is not None:
        _store.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def keep_in(directory: str | os.PathLike | None) -> None:
    """Keep per-file results in ``DIRECTORY/files.sqlite`` from now on (None: in this process only).
    Called where a source is loaded, with ``data.cache.dir``."""
    global _store
    path = None if directory is None else Path(directory).expanduser() / STORE_NAME
    if _store is not None and _store.path == path:
        return
    if _store is not None:
        _store.close()
    _store = None if path is None else FileStore(path)


def flush() -> None:
    """Write what the store has not written yet (the scan of a source ends with it)."""
    if _store is not None:
        _store.flush()


def remembered_per_file(fn: Callable[[str | os.PathLike], T]) -> Callable[[str | os.PathLike], T]:
    """`fn(path)`, computed once per (path, size, inode, mtime, ctime): remembered in this process
    and, when :func:`keep_in` named a store, across processes (`fn`'s result must survive JSON;
    lists come back as tuples). Exceptions are not remembered (a failing file is tried again); a
    path that cannot be stat'ed is passed through."""
    memory: dict[tuple, T] = {}

    def recall(path, name: str, stat: list) -> T:
        if _store is not None and (value := _store.get(fn.__qualname__, name, stat)) is not None:
            return tuple(value) if isinstance(value, list) else value
        value = fn(path)
        if _store is not None:
            _store.put(fn.__qualname__, name, stat, value)
        return value

    @functools.wraps(fn)
    def wrapper(path):
        if isinstance(path, StoredImage):
            # Its name is its identity (a content fingerprint in it): its type stands in for a stat.
            key = (type(path).__name__, str(path))
            if key not in memory:
                memory[key] = recall(path, key[1], [key[0]])
            return memory[key]
        try:
            stat = os.stat(path)
        except OSError:
            return fn(path)
        key = (os.fspath(path), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)
        if key not in memory:
            if len(memory) >= MAX_ENTRIES:
                memory.clear()
            memory[key] = recall(path, os.path.abspath(key[0]), list(key[1:]))
        return memory[key]

    return wrapper


def file_digest(path: str | os.PathLike) -> str:
    """A hex digest of the file's bytes (BLAKE2b, 128 bits): equal contents, equal digests."""
    if isinstance(path, StoredImage) and getattr(path, "digest", None):
        return path.digest  # known from where it is stored (streamed shards): nothing to remember
    return _hashed(path)


@remembered_per_file
def _hashed(path: str | os.PathLike) -> str:
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(path, StoredImage):
        digest.update(path.encoded())
        return digest.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
