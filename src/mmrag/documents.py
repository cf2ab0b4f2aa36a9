"""`Document` and `Part`: interleaved text and images, content-hash ids, the JSONL format."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

ID_HEX_CHARS = 32  # 128 bits of SHA-256: collisions are negligible at 10^12 documents
JSONL_KEYS = frozenset({"parts", "text", "image", "metadata"})
PART_KEYS = frozenset({"text", "image"})

PartKind = Literal["text", "image"]
JSONValue = Any


# Image files larger than this are refused before reading (a 64-megapixel PNG, the decoder's
# pixel limit, is far smaller): a user's mistake must not exhaust memory.
MAX_IMAGE_BYTES = 256 * 1024 * 1024


class DocumentError(ValueError):
    """A document could not be read; names the file, the line and the field."""

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, field: str = ""
    ) -> None:
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = ":".join(str(x) for x in (file, line) if x is not None)
        prefix = f"{where}: " if where else ""
        infield = f"field {field!r}: " if field else ""
        super().__init__(f"{prefix}{infield}{message}")

    def located(self, file: str | None, line: int | None) -> DocumentError:
        """The same error naming `file` and `line` where it names none."""
        if self.file is not None or self.line is not None:
            return self
        return DocumentError(self.reason, file=file, line=line, field=self.field)


def json_depth(value: Any) -> int:
    """How deeply objects and lists nest in a JSON value (a scalar is 0), without recursion
    (a value nested past Python's recursion limit is measured too)."""
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            return depth
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Part:
    """One piece of a document: a text, or an image given by bytes and/or a file path.

    An image part always knows the SHA-256 of its encoded bytes; the bytes themselves are
    read lazily from `path` when not held in memory (parts returned by a memory point at
    the stored blob).
    """

    kind: PartKind
    text: str | None = None
    data: bytes | None = field(default=None, repr=False)
    path: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "text":
            if not isinstance(self.text, str):
                raise DocumentError("a text part needs a string", field="text")
            if self.data is not None or self.path is not None:
                raise DocumentError("a text part carries no image", field="text")
            try:
                self.text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON)
                raise DocumentError(
                    f"text is not valid Unicode: {e.reason} at character {e.start}", field="text"
                ) from None
        elif self.kind == "image":
            if self.text is not None:
                raise DocumentError("an image part carries no text", field="image")
            if self.data is not None:
                digest = sha256_hex(self.data)
                if self.sha256 is not None and self.sha256 != digest:
                    raise DocumentError("image bytes do not match their sha256", field="image")
                object.__setattr__(self, "sha256", digest)
            elif self.sha256 is None:
                if self.path is None:
                    raise DocumentError("an image part needs bytes or a path", field="image")
                object.__setattr__(self, "data", _read_file(self.path))
                object.__setattr__(self, "sha256", sha256_hex(self.data or b""))
        else:
            raise DocumentError(f"unknown part kind {self.kind!r}", field="kind")

    @classmethod
    def of_text(cls, text: str) -> Part:
        return cls(kind="text", text=text)

    @classmethod
    def stored(
        cls, text: str | None = None, sha256: str | None = None, path: str | None = None
    ) -> Part:
        """A part read back from a memory: validated when it was stored, so built without
        checks or reads (a search builds one per result part; the checks cost more than the
        rest of building a result)."""
        part = object.__new__(cls)
        for name, value in (
            ("kind", "text" if text is not None else "image"),
            ("text", text),
            ("data", None),
            ("path", path),
            ("sha256", sha256),
        ):
            object.__setattr__(part, name, value)
        return part

    @classmethod
    def of_image(cls, data: bytes | None = None, path: str | Path | None = None) -> Part:
        return cls(kind="image", data=data, path=None if path is None else str(path))

    def image_bytes(self) -> bytes:
        if self.kind != "image":
            raise TypeError("not an image part")
        if self.data is not None:
            return self.data
        if self.path is None:
            raise DocumentError("image part has neither bytes nor a path", field="image")
        return _read_file(self.path)

    def open_image(self) -> Image.Image:
        """Decode the image fully (RGB); raises DocumentError on corrupt or truncated bytes."""
        return decode_image(self.image_bytes(), source=self.path)

    def content_key(self) -> list[str]:
        """What the document id hashes: the text, or the image's SHA-256."""
        if self.kind == "text":
            return ["text", self.text or ""]
        return ["image", self.sha256 or ""]


@dataclass(frozen=True)
class Document:
    """An ordered list of parts plus free JSON metadata. The id hashes the parts only."""

    parts: tuple[Part, ...]
    metadata: Mapping[str, JSONValue] = field(default_factory=dict)
    source: str | None = None  # where it was read from, for messages ("file.jsonl:12")

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))
        if not self.parts:
            raise DocumentError("a document needs at least one part", field="parts")
        if not isinstance(self.metadata, Mapping):
            raise DocumentError("metadata must be an object", field="metadata")
        if not any(p.kind == "image" or (p.text or "").strip() for p in self.parts):
            raise DocumentError("a document needs non-blank text or an image", field="parts")
        try:  # finite JSON only: NaN or Infinity would break every JSON query of the store
            json.dumps(dict(self.metadata), allow_nan=False)
        except RecursionError:
            raise DocumentError("metadata is nested too deeply", field="metadata") from None
        except (TypeError, ValueError) as e:
            raise DocumentError(
                f"metadata is not finite JSON (no NaN or Infinity): {e}", field="metadata"
            ) from e

    @property
    def id(self) -> str:
        canonical = json.dumps([p.content_key() for p in self.parts], ensure_ascii=False)
        return sha256_hex(canonical.encode("utf-8"))[:ID_HEX_CHARS]

    @property
    def text(self) -> str:
        """All text parts joined with a space (what the text tower sees)."""
        return " ".join(p.text or "" for p in self.parts if p.kind == "text").strip()

    @property
    def images(self) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if p.kind == "image")

    @property
    def modality(self) -> Literal["text", "image", "mixed"]:
        kinds = {p.kind for p in self.parts}
        if kinds == {"text"}:
            return "text"
        return "image" if kinds == {"image"} else "mixed"

    @classmethod
    def of(
        cls,
        text: str | None = None,
        image: bytes | str | Path | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
    ) -> Document:
        """The common case: an image and/or its caption (image first, as `<img alt=...>`)."""
        parts: list[Part] = []
        if isinstance(image, bytes):
            parts.append(Part.of_image(data=image))
        elif image is not None:
            parts.append(Part.of_image(path=image))
        if text is not None:
            parts.append(Part.of_text(text))
        return cls(parts=tuple(parts), metadata=dict(metadata or {}))


def load_image(path: str | Path) -> Image.Image:
    """An image file, fully decoded to RGB (the file is closed); DocumentError if unreadable."""
    return decode_image(_read_file(path), source=str(path))


def _read_file(path: str | Path) -> bytes:
    """An image file's bytes: regular files only (a symlink to one is followed; a device,
    FIFO, socket or folder is refused without reading), at most `MAX_IMAGE_BYTES`."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise DocumentError(f"cannot read image file: {e.strerror or e}", file=str(path)) from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DocumentError(
                "not a regular file (a device, FIFO, socket or folder): refused", file=str(path)
            )
        if info.st_size > MAX_IMAGE_BYTES:
            raise DocumentError(
                f"image file of {info.st_size} bytes is over the {MAX_IMAGE_BYTES}-byte limit",
                file=str(path),
            )
        os.set_blocking(fd, True)
        # Ask for the file's size (+1 to see growth), never for the limit: read(n) allocates
        # n bytes before shrinking, and a 256 MB request per image left one memory mapping
        # per image held (65,530 of them end a process's mappings: 70k images were a crash).
        want = min(info.st_size, MAX_IMAGE_BYTES) + 1
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(want)
            if len(data) == want:  # it grew while being read: read on, to the limit
                data += f.read(MAX_IMAGE_BYTES + 1 - len(data))
    except OSError as e:
        raise DocumentError(f"cannot read image file: {e.strerror or e}", file=str(path)) from e
    finally:
        os.close(fd)
    if len(data) > MAX_IMAGE_BYTES:  # it grew while being read
        raise DocumentError(f"image file is over the {MAX_IMAGE_BYTES}-byte limit", file=str(path))
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency flattened onto white: how every image enters the project."""
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(
    data: bytes, source: str | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode bytes to an RGB image, flattening transparency onto white.

    Raises DocumentError naming `source` for corrupt, truncated or oversized images.
    """
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # our own limit applies below; Pillow's would pre-empt it
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                if max_pixels is not None and probe.width * probe.height > max_pixels:
                    raise DocumentError(
                        f"image is {probe.width}x{probe.height}, over the {max_pixels}-pixel limit",
                        file=source,
                    )
                probe.verify()  # structural check; catches many corrupt files cheaply
            img = Image.open(io.BytesIO(data))
            img.load()  # full decode: catches truncated data
    except DocumentError:
        raise
    except (
        Exception
    ) as e:  # Pillow raises many types on malformed input (IndexError, struct.error...)
        raise DocumentError(f"unreadable image ({type(e).__name__}: {e})", file=source) from e
    return to_rgb(img)


# --- JSONL -------------------------------------------------------------------------------


def _part_from_json(obj: Any, base: Path, file: str, line: int, index: int) -> Part:
    where = f"parts[{index}]"
    if not isinstance(obj, dict) or len(obj) != 1 or not PART_KEYS.issuperset(obj):
        raise DocumentError(
            'a part is {"text": STRING} or {"image": PATH}', file=file, line=line, field=where
        )
    ((key, value),) = obj.items()
    if not isinstance(value, str):
        raise DocumentError(f"{key} must be a string", file=file, line=line, field=f"{where}.{key}")
    if key == "text":
        return Part.of_text(value)
    path = Path(value)  # relative paths resolve against the JSONL file's folder
    try:
        return Part.of_image(path=base / path)
    except DocumentError as e:
        raise DocumentError(e.reason, file=file, line=line, field=f"{where}.image") from e


def document_from_json(obj: Any, base: Path, file: str = "<jsonl>", line: int = 0) -> Document:
    """Build a Document from one parsed JSONL object (see docs/format.md)."""
    if not isinstance(obj, dict):
        raise DocumentError("each line must be a JSON object", file=file, line=line)
    unknown = sorted(set(obj) - JSONL_KEYS)
    if unknown:
        raise DocumentError(
            f"unknown keys {unknown}; allowed: {sorted(JSONL_KEYS)}",
            file=file,
            line=line,
            field=unknown[0],
        )
    if "parts" in obj and ("text" in obj or "image" in obj):
        raise DocumentError(
            "use either 'parts' or 'text'/'image'", file=file, line=line, field="parts"
        )
    raw_parts: Any
    if "parts" in obj:
        raw_parts = obj["parts"]
        if not isinstance(raw_parts, list) or not raw_parts:
            raise DocumentError("must be a non-empty list", file=file, line=line, field="parts")
    else:
        raw_parts = [{k: obj[k]} for k in ("image", "text") if k in obj]
        if not raw_parts:
            raise DocumentError("a document needs 'parts', 'text' or 'image'", file=file, line=line)
    try:
        parts = tuple(_part_from_json(p, base, file, line, i) for i, p in enumerate(raw_parts))
    except DocumentError as e:
        raise e.located(file, line) from None
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise DocumentError("must be an object", file=file, line=line, field="metadata")
    try:
        return Document(parts=parts, metadata=metadata, source=f"{file}:{line}")
    except DocumentError as e:  # say where: the file and line the document came from
        raise e.located(file, line) from None


def document_to_json(doc: Document, image_paths: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Serialise to the JSONL object form. `image_paths` maps image sha256 -> relative path;
    without it the part's own path is used."""
    parts: list[dict[str, str]] = []
    for p in doc.parts:
        if p.kind == "text":
            parts.append({"text": p.text or ""})
        else:
            path = (image_paths or {}).get(p.sha256 or "", p.path)
            if path is None:
                raise DocumentError("image part has no path to write", field="image")
            parts.append({"image": path})
    return {"parts": parts, "metadata": dict(doc.metadata)}


def iter_jsonl(path: str | Path) -> Iterator[Document | DocumentError]:
    """Yield each line's Document, or the DocumentError that explains why it is bad."""
    path = Path(path)
    base = path.parent
    with path.open("rb") as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                yield DocumentError(f"not UTF-8: {e.reason}", file=str(path), line=lineno)
                continue
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                yield DocumentError(
                    f"malformed JSON: {e.msg} (column {e.colno})", file=str(path), line=lineno
                )
                continue
            except RecursionError:
                yield DocumentError("JSON nested too deeply", file=str(path), line=lineno)
                continue
            try:
                yield document_from_json(obj, base, file=str(path), line=lineno)
            except DocumentError as e:
                yield e
