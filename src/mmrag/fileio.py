"""Files on disk: crash-safe writes (a temporary file beside the target, fsync, atomic
rename) and content digests of files and folders."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# mkstemp creates 0600 files; give written files the mode a plain open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
_HASH_CHUNK = 1 << 20


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


def files_sha256(paths: Iterable[Path], separator: bytes = b"") -> str:
    """SHA-256 over each file's name, `separator`, then its bytes, in the order given: the
    identity of a folder of weights."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + separator)
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, computed once per process (keyed by size and mtime)."""
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def save_weights(module: Any, path: Path, metadata: dict[str, str] | None = None) -> None:
    """`module`'s state dict as safetensors at `path`. Bytes written by Python, not by
    `save_file`, so the file gets the umask's mode (0644) instead of a private 0600."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    path.write_bytes(save(state, metadata=metadata or {"format": "pt"}))
