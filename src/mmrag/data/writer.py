"""The deterministic writer every offline data set builder shares, and its file layout."""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmrag.documents import Document, JSONValue, Part, document_to_json
from mmrag.fileio import atomic_write

logger = logging.getLogger(__name__)

DOCUMENTS_FILE = "documents.jsonl"
IMAGES_DIR = "images"


class DatasetError(RuntimeError):
    """A data set cannot be built: its source data is missing, or the name is unknown."""


@dataclass(frozen=True)
class DatasetSummary:
    """What a builder wrote: `count` documents listed in `out/documents.jsonl`."""

    name: str
    count: int
    out: Path

    @property
    def documents(self) -> Path:
        return self.out / DOCUMENTS_FILE


def documents_files(paths: Sequence[str | Path]) -> list[Path]:
    """Each path is a JSONL file or a folder holding `documents.jsonl` (as the builders
    write); raises FileNotFoundError naming the first that is neither."""
    files = []
    for path in map(Path, paths):
        file = path / DOCUMENTS_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no documents at {path} (expected a JSONL file or a folder with {DOCUMENTS_FILE})"
            )
        files.append(file)
    return files


# --- writing helpers ---------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG with no metadata chunks, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def flattened(rgba: Image.Image, long_side: int) -> Image.Image:
    """An RGBA picture as RGB on white (transparency flattened), its long side shrunk to
    `long_side` (never enlarged)."""
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    rgb = canvas.convert("RGB")
    scale = min(1.0, long_side / max(rgb.size))
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return rgb.resize(size, Image.Resampling.LANCZOS) if size != rgb.size else rgb


def debian_version(changelog: Path) -> str:
    """The version at the top of a Debian package's `changelog.Debian.gz` ("unknown" if none)."""
    try:
        with gzip.open(changelog, "rt", encoding="utf-8") as f:
            line = f.readline()
        return line.split("(", 1)[1].split(")", 1)[0]
    except (OSError, IndexError):
        return "unknown"


def require_file(path: Path, debian_package: str) -> Path:
    """Return `path`, or raise a DatasetError telling the user which Debian package ships it."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing; install it with `apt-get install {debian_package}`")
    return path


class DatasetWriter:
    """Collects `(image, caption, metadata)` records into `OUT/images/*.png` + `documents.jsonl`.

    Images are written as they come; the JSONL is written atomically on `close()`, so a
    reader never sees a half-written file list. PNGs left over from an earlier build of
    the same folder that this build did not write are removed, so the folder always
    matches its JSONL.
    """

    def __init__(self, out: str | Path, name: str) -> None:
        self.out = Path(out)
        self.name = name
        self.images = self.out / IMAGES_DIR
        self.images.mkdir(parents=True, exist_ok=True)
        self._lines: list[str] = []
        self._written: set[str] = set()

    def add(
        self, image: Image.Image, stem: str, caption: str, metadata: Mapping[str, JSONValue]
    ) -> Document:
        """Save `image` as `images/<stem>.png` and queue its document (image, then caption)."""
        filename = f"{stem}.png"
        if filename in self._written:
            raise DatasetError(f"{self.name}: two records share the file name {filename!r}")
        data = png_bytes(image)
        target = self.images / filename
        if not target.is_file() or target.read_bytes() != data:
            # No fsync per image (thousands of them): the JSONL, written last with fsync,
            # is what makes a build visible.
            atomic_write(target, data, fsync=False)
        self._written.add(filename)
        doc = Document(parts=(Part.of_image(data=data), Part.of_text(caption)), metadata=metadata)
        relative = f"{IMAGES_DIR}/{filename}"
        obj = document_to_json(doc, image_paths={doc.parts[0].sha256 or "": relative})
        self._lines.append(json.dumps(obj, ensure_ascii=False, sort_keys=True))
        return doc

    def __len__(self) -> int:
        return len(self._lines)

    def close(self) -> DatasetSummary:
        """Write the JSONL atomically, then remove images the new JSONL no longer lists."""
        text = "".join(line + "\n" for line in self._lines)
        atomic_write(self.out / DOCUMENTS_FILE, text.encode("utf-8"))
        stale = sorted(p for p in self.images.glob("*.png") if p.name not in self._written)
        for p in stale:
            p.unlink()
        if stale:
            logger.info("%s: removed %d stale images from an earlier build", self.name, len(stale))
        logger.info("%s: wrote %d documents to %s", self.name, len(self._lines), self.out)
        return DatasetSummary(name=self.name, count=len(self._lines), out=self.out)
