"""Content-addressed image blobs: `blobs/<sha[:2]>/<sha>.<ext>`, written atomically."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from mmrag.fileio import atomic_write

log = logging.getLogger(__name__)

# Magic numbers of the formats we store, checked in order; anything else is ".img".
MAGIC_EXTENSIONS = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)


def image_extension(data: bytes) -> str:
    """The file extension for encoded image bytes, from their magic number (not a name)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, ext in MAGIC_EXTENSIONS:
        if data.startswith(magic):
            return ext
    return "img"


class BlobStore:
    """Image bytes keyed by SHA-256. Writing an existing blob is a no-op."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._prefix = str(root)

    def path(self, sha256: str, ext: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.{ext}"

    def put(self, sha256: str, data: bytes) -> str:
        """Store the bytes; returns the blob's relative name `<sha>.<ext>`."""
        ext = image_extension(data)
        target = self.path(sha256, ext)
        if not target.exists():
            atomic_write(target, data)
        return f"{sha256}.{ext}"

    def resolve(self, name: str) -> Path:
        sha, _, ext = name.partition(".")
        return self.path(sha, ext)

    def location(self, name: str) -> str:
        """`resolve(name)` as a string, without building a Path (a search materialises
        hundreds of documents)."""
        return f"{self._prefix}{os.sep}{name[:2]}{os.sep}{name}"

    def remove(self, sha256: str) -> None:
        """Delete the blob with this hash, whatever its extension (a no-op if absent)."""
        for path in (self.root / sha256[:2]).glob(f"{sha256}.*"):
            path.unlink(missing_ok=True)

    def iter_names(self) -> Iterator[tuple[str, Path]]:
        """(sha256, path) of every stored blob; skips temporary files."""
        if not self.root.exists():
            return
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir():
                continue
            for f in sorted(sub.iterdir()):
                if not f.name.startswith("."):
                    yield f.name.split(".", 1)[0], f

    def collect(self, referenced: set[str]) -> int:
        """Delete blobs (and leftover temporary files) not in `referenced`; returns how many
        blobs were removed. Only the single writer may call this."""
        removed = 0
        if not self.root.exists():
            return 0
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.startswith(".") and f.name.endswith(".tmp"):
                    f.unlink(missing_ok=True)
                elif f.name.split(".", 1)[0] not in referenced:
                    f.unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.info("collected %d unreferenced image blobs", removed)
        return removed

    def missing(self, referenced: set[str]) -> set[str]:
        """The referenced hashes with no blob file: images deleted behind the memory's back."""
        return referenced - {sha for sha, _ in self.iter_names()}

    def total_bytes(self) -> int:
        total = 0
        for _, path in self.iter_names():
            try:
                total += path.stat().st_size
            except FileNotFoundError:  # deleted meanwhile by the writer
                continue
        return total
