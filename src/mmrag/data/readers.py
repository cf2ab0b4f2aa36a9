"""Readers: turn a folder, JSONL, CSV/Parquet table or WebDataset tar into Documents.

Readers never raise on bad input: they yield a `DocumentError` naming the file, the
line / row / member and the field, and go on. They do not decode images (the ingest does,
with `mmrag.documents.decode_image`), but they do read image bytes.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mmrag.documents import MAX_IMAGE_BYTES, Document, DocumentError, JSONValue, Part, iter_jsonl

ReadResult = Document | DocumentError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"})
FOLDER_JSONL = "documents.jsonl"  # what the dataset builders write; read instead of the images
TAR_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
TAR_TEXT_EXTENSIONS = ("txt", "caption")  # the first present is the caption
SUPPORTED = (
    "a folder of images (with .txt caption and .json metadata sidecars, or a documents.jsonl), "
    "a .jsonl file, a .csv or .parquet table, or a WebDataset .tar shard"
)
TABLE_OPTIONS = frozenset({"image_column", "text_column"})


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if path.is_dir():
        return "folder"
    for suffix, kind in ((".jsonl", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return kind
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    return None


def read_source(path: str | Path, **options: Any) -> Iterator[ReadResult]:
    """Documents (or the errors explaining bad records) from one source, by its kind.

    Options: `image_column` and `text_column` for CSV / Parquet tables. An option the
    source's kind does not take is a TypeError (a bad call, not bad input).
    """
    path = Path(path)
    kind = _kind(path)
    allowed = TABLE_OPTIONS if kind in ("csv", "parquet") else frozenset()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"read_source: options {unknown} do not apply to {kind or 'this'} source")
    if not path.exists():
        return iter([DocumentError("no such file or folder", file=str(path))])
    if kind is None:
        return iter([DocumentError(f"unsupported source; expected {SUPPORTED}", file=str(path))])
    readers = {
        "folder": read_folder,
        "jsonl": iter_jsonl,
        "csv": read_table,
        "parquet": read_table,
        "tar": read_webdataset,
    }
    return _guarded(readers[kind](path, **options), path)


def read_sources(paths: Iterable[str | Path], **options: Any) -> Iterator[ReadResult]:
    """`read_source` over several paths, one after the other."""
    for path in paths:
        yield from read_source(path, **options)


def _guarded(results: Iterator[ReadResult], path: Path) -> Iterator[ReadResult]:
    """Turn an I/O failure mid-read into a final DocumentError instead of an exception."""
    try:
        yield from results
    except OSError as e:
        yield DocumentError(f"cannot read: {e.strerror or e}", file=str(path))


def _image_part(path: Path, file: str, line: int | None, field: str) -> Part:
    try:
        return Part.of_image(path=path)
    except DocumentError as e:
        raise DocumentError(e.reason, file=file, line=line, field=field) from e


# --- folder of images with sidecars ----------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted by relative path; hidden ones skipped."""
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        hidden = any(part.startswith(".") for part in rel.parts)
        if p.suffix.lower() in IMAGE_EXTENSIONS and not hidden and p.is_file():
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _read_caption(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise DocumentError(
            f"caption is not UTF-8: {e.reason}", file=str(path), field="text"
        ) from e
    return text or None


def _read_sidecar_metadata(path: Path) -> dict[str, JSONValue]:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DocumentError(f"malformed JSON: {e}", file=str(path), field="metadata") from e
    if not isinstance(obj, dict):
        raise DocumentError("must be a JSON object", file=str(path), field="metadata")
    return obj


def read_folder(folder: str | Path) -> Iterator[ReadResult]:
    """Each image (x.png, with x.txt as caption and x.json as metadata) is one document.

    A `documents.jsonl` at the top of the folder is read instead, as written by the dataset
    builders. Metadata always carries `source_path`, the image's path inside the folder.
    """
    folder = Path(folder)
    if (folder / FOLDER_JSONL).is_file():
        yield from iter_jsonl(folder / FOLDER_JSONL)
        return
    for image in _images_in(folder):
        rel = image.relative_to(folder).as_posix()
        try:
            caption = _read_caption(image.with_suffix(".txt"))
            metadata = _read_sidecar_metadata(image.with_suffix(".json"))
            parts = [_image_part(image, str(image), None, "image")]
            if caption is not None:
                parts.append(Part.of_text(caption))
            yield Document(
                parts=tuple(parts), metadata={**metadata, "source_path": rel}, source=rel
            )
        except DocumentError as e:
            yield e


# --- CSV and Parquet tables ----------------------------------------------------------------


def _iter_csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]] | DocumentError]:
    """(line number, row) pairs; the header is line 1."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if None in row:
                    yield DocumentError(
                        "more cells than header columns", file=str(path), line=reader.line_num
                    )
                    continue
                yield reader.line_num, dict(row)
    except (UnicodeDecodeError, csv.Error) as e:
        yield DocumentError(f"unreadable CSV: {e}", file=str(path))


def _iter_parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]] | DocumentError]:
    """(row number counting from 1, row) pairs, read a batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row_number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_number += 1
                yield row_number, row
    except (pa.ArrowException, OSError) as e:
        yield DocumentError(f"unreadable Parquet after row {row_number}: {e}", file=str(path))


def _jsonable(value: Any) -> JSONValue:
    """A table cell as JSON: dates as ISO strings, NaN as null, other odd types as text."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _cell(row: dict[str, Any], column: str, file: str, line: int) -> str | None:
    """The string in a caption / image cell; None when missing or empty."""
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, str):
        raise DocumentError(
            f"must be a string, got {type(value).__name__}", file=file, line=line, field=column
        )
    return value.strip() or None


def _row_document(
    row: dict[str, Any], base: Path, file: str, line: int, image_col: str, text_col: str
) -> Document:
    image, text = _cell(row, image_col, file, line), _cell(row, text_col, file, line)
    parts: list[Part] = []
    if image is not None:  # relative to the table's folder, like JSONL image paths
        parts.append(_image_part(base / Path(image), file, line, image_col))
    if text is not None:
        parts.append(Part.of_text(text))
    if not parts:
        raise DocumentError(
            f"row has neither an image ({image_col!r}) nor a caption ({text_col!r})",
            file=file,
            line=line,
            field=image_col,
        )
    metadata = {k: _jsonable(v) for k, v in row.items() if k not in (image_col, text_col)}
    return Document(parts=tuple(parts), metadata=metadata, source=f"{file}:{line}")


def read_table(
    path: str | Path, image_column: str = "image", text_column: str | None = None
) -> Iterator[ReadResult]:
    """One document per CSV / Parquet row: an image path (relative to the table's folder,
    or absolute) and a caption. The caption column defaults to "text", falling back to
    "caption"; every other column becomes metadata. For CSV the error's line is the file
    line (header = 1); for Parquet it is the row number counting from 1.
    """
    path = Path(path)
    file = str(path)
    rows = _iter_parquet_rows(path) if path.suffix.lower() == ".parquet" else _iter_csv_rows(path)
    text_col = text_column
    for item in rows:
        if isinstance(item, DocumentError):
            yield item
            continue
        line, row = item
        if text_col is None:  # decided on the first row: every row has the same columns
            text_col = "text" if "text" in row or "caption" not in row else "caption"
            if image_column not in row and text_col not in row:
                yield DocumentError(
                    f"no {image_column!r} or {text_col!r} column; columns are {sorted(row)}",
                    file=file,
                    field=image_column,
                )
                return
        try:
            yield _row_document(row, path.parent, file, line, image_column, text_col)
        except DocumentError as e:
            yield e


# --- WebDataset tar shards -----------------------------------------------------------------


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's key / extension split: at the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def _sample_document(shard: str, key: str, members: dict[str, tuple[str, bytes]]) -> Document:
    """One WebDataset sample: `members` maps extension -> (member name, bytes)."""
    parts: list[Part] = []
    for ext in TAR_IMAGE_EXTENSIONS:
        if ext in members:
            name, data = members[ext]
            parts.append(Part.of_image(data=data, path=f"{shard}#{name}"))
    text_ext = next((e for e in TAR_TEXT_EXTENSIONS if e in members), None)
    if text_ext is not None:
        name, data = members[text_ext]
        try:
            caption = data.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise DocumentError(
                f"not UTF-8: {e.reason}", file=f"{shard}#{name}", field="text"
            ) from e
        if caption:
            parts.append(Part.of_text(caption))
    metadata: dict[str, JSONValue] = {}
    if "json" in members:
        name, data = members["json"]
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DocumentError(
                f"malformed JSON: {e}", file=f"{shard}#{name}", field="metadata"
            ) from e
        if not isinstance(obj, dict):
            raise DocumentError("must be a JSON object", file=f"{shard}#{name}", field="metadata")
        metadata = obj
    if not parts:
        raise DocumentError(
            f"sample has no image ({', '.join(TAR_IMAGE_EXTENSIONS)}) and no caption "
            f"({', '.join(TAR_TEXT_EXTENSIONS)}); members: {sorted(members)}",
            file=f"{shard}#{key}",
            field="parts",
        )
    return Document(parts=tuple(parts), metadata={**metadata, "key": key}, source=f"{shard}#{key}")


def read_webdataset(path: str | Path) -> Iterator[ReadResult]:
    """One document per sample of a WebDataset shard (members grouped by key, in order).

    `key.png|jpg|jpeg|webp` is the image, `key.txt` or `key.caption` the caption,
    `key.json` the metadata (plus `key`). A truncated or corrupt shard yields what could be
    read, then a DocumentError naming the member where reading stopped.
    """
    shard = str(path)
    key: str | None = None
    members: dict[str, tuple[str, bytes]] = {}
    skipped: list[DocumentError] = []
    current = ""
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for info in tar:
                yield from skipped
                skipped.clear()
                if info.issym() or info.islnk():  # said, not silently dropped
                    skipped.append(
                        DocumentError("a link member is not read", file=f"{shard}#{info.name}")
                    )
                    continue
                if not info.isfile():
                    continue
                if info.size > MAX_IMAGE_BYTES:  # never read whole into memory
                    skipped.append(
                        DocumentError(
                            f"member of {info.size} bytes is over the {MAX_IMAGE_BYTES}-byte limit",
                            file=f"{shard}#{info.name}",
                        )
                    )
                    continue
                current = info.name
                member_key, ext = _split_member(info.name)
                if member_key != key:
                    if key is not None:
                        yield _or_error(shard, key, members)
                    key, members = member_key, {}
                handle = tar.extractfile(info)
                data = handle.read() if handle else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member has {len(data)} of {info.size} bytes")
                members[ext] = (info.name, data)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        where = f"{shard}#{current}" if current else shard
        yield DocumentError(f"truncated or corrupt tar, stopped reading: {e}", file=where)
        return  # the sample being read when the shard broke may be incomplete: dropped
    yield from skipped
    if key is not None:
        yield _or_error(shard, key, members)


def _or_error(shard: str, key: str, members: dict[str, tuple[str, bytes]]) -> ReadResult:
    try:
        return _sample_document(shard, key, members)
    except DocumentError as e:
        return e
