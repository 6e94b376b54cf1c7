"""Files a run writes for people to share: their permissions follow the user's umask.

``tempfile.mkstemp`` (behind our atomic writes) and safetensors create files readable by their
owner alone (0600) whatever the umask; on a shared server colleagues then cannot read a
checkpoint or an exported model. :func:`follow_umask` gives such a file the mode a plain
``open(path, "w")`` would have (0644 under the usual umask 022).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_lock = threading.Lock()


def umask() -> int:
    """The process's umask (reading it means setting it: done under a lock, restored at once)."""
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """chmod `path` to ``0o666 & ~umask``, as a file created with ``open`` would be."""
    os.chmod(path, 0o666 & ~umask())
