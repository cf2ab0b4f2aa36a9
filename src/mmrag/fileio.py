"""Crash-safe file writes: a temporary file beside the target, fsync, atomic rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# mkstemp creates 0600 files; give written files the mode a plain open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def atomic_write(path: Path, data: bytes, fsync: bool = True) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a part.

    With `fsync`, the bytes are on disk before the rename (durable across power loss, not
    only process death); builders writing thousands of files may skip it for the bulk.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
