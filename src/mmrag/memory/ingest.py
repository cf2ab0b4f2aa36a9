"""The ingest pipeline: read → skip known ids → decode images → encode → store, resumably.

Reading and decoding run in a background thread while the encoder runs in the caller's
thread (PyTorch releases the GIL), so the pipeline costs little on top of the model. Each
batch is committed on its own; ids are content hashes, so re-running an interrupted ingest
skips what was stored and continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from mmrag.config import Config, ConfigError
from mmrag.documents import Document, DocumentError, decode_image, json_depth
from mmrag.encoders.mixed import encode_isolated
from mmrag.memory.memory import Memory

log = logging.getLogger(__name__)

QUEUE_BATCHES = 3


@dataclass(frozen=True)
class DocumentLimits(Config):
    """What one document may hold when it is ingested (docs/format.md, "Limits"); a document
    over a limit is reported as that document's error and the rest is stored. Image files
    are never read past `MAX_IMAGE_BYTES`, whatever the limit here."""

    # All text parts together, in characters (the text tower reads the first 77 tokens; a
    # long text costs storage and every result that shows it).
    max_text_chars: int = 100_000
    # The metadata object, as compact JSON in UTF-8 bytes, and how deeply it may nest.
    max_metadata_bytes: int = 64 * 1024
    max_metadata_depth: int = 32
    # One image's encoded bytes, and its decoded pixels (checked from the header before
    # decompression: decompression bombs are refused unread).
    max_image_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024

    def validate(self) -> None:
        for name in (f.name for f in fields(self)):
            if getattr(self, name) < 1:
                raise ConfigError(f"DocumentLimits: {name} must be >= 1")

    def check(self, doc: Document) -> None:
        """Raise DocumentError, naming the field, if `doc` is over a limit."""
        chars = sum(len(p.text or "") for p in doc.parts)
        if chars > self.max_text_chars:
            raise DocumentError(
                f"{chars} characters of text, over the {self.max_text_chars} limit", field="text"
            )
        depth = json_depth(dict(doc.metadata))
        if depth > self.max_metadata_depth:
            raise DocumentError(
                f"nested {depth} levels deep, over the {self.max_metadata_depth} limit",
                field="metadata",
            )
        size = len(json.dumps(dict(doc.metadata), ensure_ascii=False).encode("utf-8"))
        if size > self.max_metadata_bytes:
            raise DocumentError(
                f"{size} bytes of JSON, over the {self.max_metadata_bytes} limit", field="metadata"
            )
        for part in doc.images:
            if part.data is not None and len(part.data) > self.max_image_bytes:
                raise DocumentError(
                    f"{len(part.data)} bytes, over the {self.max_image_bytes}-byte limit",
                    field="image",
                )


@dataclass(frozen=True)
class IngestError:
    source: str
    reason: str


@dataclass
class IngestReport:
    read: int = 0
    added: int = 0
    existing: int = 0
    updated: int = 0
    errors: list[IngestError] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def docs_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["docs_per_second"] = round(self.docs_per_second, 2)
        return out


@dataclass
class _Batch:
    docs: list[Document]
    images: list[list[Image.Image]]


_DONE = object()


def describe_error(
    err: DocumentError, doc_source: str | None = None, fallback: str | None = None
) -> tuple[str, str]:
    """(where, why) of a skipped item, as reports print it: the file and line (or member),
    else `fallback` (the source being read); an image of a read document (`doc_source`) that
    failed to decode is named in the reason, after the line that referenced it."""
    source = err.file or doc_source or fallback or "<unknown>"
    if err.line is not None and err.file:
        source = f"{err.file}:{err.line}"
    reason = f"{err.field}: {err.reason}" if err.field else err.reason
    if doc_source and doc_source != source:
        source, reason = doc_source, f"{source}: {reason}"
    return source, reason


def _error(report: IngestReport, err: DocumentError, doc: Document | None = None) -> None:
    source, reason = describe_error(err, doc.source if doc else None)
    report.errors.append(IngestError(source, reason))
    log.warning("skipped %s: %s", source, reason)


class _Producer(threading.Thread):
    """Reads sources, drops known documents, decodes images, and queues batches."""

    def __init__(
        self,
        memory: Memory,
        sources: Iterable[Document | DocumentError],
        report: IngestReport,
        batch_size: int,
        update_metadata: bool,
        limits: DocumentLimits,
        out: queue.Queue[Any],
        bar: tqdm[Any],
    ) -> None:
        super().__init__(name="mmrag-ingest-reader", daemon=True)
        self.memory, self.sources, self.report = memory, sources, report
        self.batch_size, self.update_metadata, self.limits = (
            batch_size,
            update_metadata,
            limits,
        )
        self.out, self.bar = out, bar
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for chunk in self._chunks():
                batch = self._prepare(chunk)
                if batch.docs:
                    self.out.put(batch)
                if self.stop.is_set():
                    break
            self.out.put(_DONE)
        except BaseException as e:  # surface the reader's failure in the caller's thread
            self.out.put(e)

    def _chunks(self) -> Iterator[list[Document]]:
        seen: set[str] = set()
        chunk: list[Document] = []
        for item in self.sources:
            self.report.read += 1
            if isinstance(item, DocumentError):
                _error(self.report, item)
                self.bar.update(1)
                continue
            if item.id in seen:
                self.report.existing += 1
                self.bar.update(1)
                continue
            seen.add(item.id)
            chunk.append(item)
            if len(chunk) == self.batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _prepare(self, chunk: list[Document]) -> _Batch:
        known = self.memory.contains([d.id for d in chunk])
        if known:
            self.report.existing += len(known)
            if self.update_metadata:
                stored = {s.id: s.metadata for s in self.memory.get(sorted(known)) if s}
                changed = {
                    d.id: d.metadata
                    for d in chunk
                    if d.id in known and dict(d.metadata) != stored.get(d.id)
                }
                if changed:
                    self.report.updated += self.memory.update_metadata(changed)
        batch = _Batch([], [])
        for doc in chunk:
            if doc.id in known:
                self.bar.update(1)
                continue
            try:
                self.limits.check(doc)
                images = [
                    decode_image(
                        p.image_bytes(),
                        source=p.path or doc.source,
                        max_pixels=self.limits.max_pixels,
                    )
                    for p in doc.images
                ]
            except DocumentError as e:
                _error(self.report, e, doc)
                self.bar.update(1)
                continue
            for part in doc.images:  # written here to overlap the encoder; orphans of a
                self.memory.blobs.put(part.sha256 or "", part.image_bytes())  # crash are collected
            batch.docs.append(doc)
            batch.images.append(images)
        return batch


def ingest(
    memory: Memory,
    sources: Iterable[Document | DocumentError],
    batch_size: int = 64,
    progress: bool = True,
    update_metadata: bool = False,
    limits: DocumentLimits | None = None,
) -> IngestReport:
    """Encode and store every new document from `sources`; never stops on bad input.

    Documents already in the memory (same content, hence same id) are skipped; with
    `update_metadata` their metadata is replaced by the incoming one. A document over
    `limits`, whose image does not decode, or that the encoder rejects is reported (file,
    line, field) and the rest is stored; an error no document causes (the encoder failing
    every document alone, the memory unwritable) stops the run with nothing half-written.
    """
    report = IngestReport()
    start = time.perf_counter()
    encoder = memory.encoder
    batches: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_BATCHES)
    with tqdm(desc="ingest", unit="doc", disable=not progress) as bar:
        producer = _Producer(
            memory,
            sources,
            report,
            batch_size,
            update_metadata,
            limits or DocumentLimits(),
            batches,
            bar,
        )
        producer.start()
        try:
            while True:
                item = batches.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                vectors, errors = encode_isolated(encoder, item.docs, item.images)
                keep = [i for i, e in enumerate(errors) if e is None]
                for doc, e in zip(item.docs, errors, strict=True):
                    if e is not None:
                        _error(report, DocumentError(f"the encoder refused it: {e}"), doc)
                docs = [item.docs[i] for i in keep]
                report.added += len(memory.add_encoded(docs, vectors[keep]))
                bar.update(len(item.docs))
        finally:
            producer.stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    batches.get(timeout=0.1)
            memory.checkpoint()
    report.seconds = time.perf_counter() - start
    log.info(
        "ingest: %d read, %d added, %d already present, %d errors in %.1fs",
        report.read,
        report.added,
        report.existing,
        len(report.errors),
        report.seconds,
    )
    return report
