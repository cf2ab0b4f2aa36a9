"""Re-encode a memory in place with another encoder (or new heads), crash-safe.

A memory's vectors are only meaningful to the encoder that made them (the manifest's
fingerprint). When the encoder changes, `reencode` rebuilds the vectors from what the memory
itself keeps, its texts and image blobs, without the original sources:

1. under the memory's write lock, every document is read back in seq order, encoded with the
   new encoder and written, with the same id, parts, metadata and blobs, into a new SQLite
   file beside the old one (`memory.sqlite.reencode`), and the new manifest is written beside
   the old one (`manifest.json.reencode`); the old memory is untouched, and a crash here
   leaves only those two files, which the next `reencode` removes (opening ignores them);
2. a commit marker (`reencode.commit`) is written atomically: from then on the swap is
   decided;
3. the old database (with its WAL) is closed and replaced by the new one, the manifest
   likewise, the index cache dropped (rebuilt on open) and the marker removed. Opening the
   memory after a crash in step 3 finishes it (`finish_pending`), so the folder always holds
   either the old memory or the new one.

Blobs are shared: images are content-addressed, so nothing is copied. Processes holding the
memory open while it is re-encoded keep reading the old vectors until they reopen it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mmrag.documents import Document, DocumentError, Part, decode_image
from mmrag.encoders.base import Encoder, EncoderSpec, load_encoder
from mmrag.encoders.mixed import encode_documents
from mmrag.fileio import atomic_write
from mmrag.memory.memory import (
    NEW_DATABASE,
    NEW_MANIFEST,
    REENCODE_COMMIT,
    Manifest,
    Memory,
    MemoryFolderError,
    finish_pending,
    remove_database,
)
from mmrag.memory.store import NewRow, Store

log = logging.getLogger(__name__)

BATCH = 64


@dataclass(frozen=True)
class ReencodeReport:
    """What `reencode` did: documents re-encoded, the fingerprints before and after."""

    count: int
    old_fingerprint: str
    new_fingerprint: str
    skipped: bool  # the memory already used this encoder
    seconds: float


def _document(memory: Memory, row_parts: list[dict[str, str]], doc_id: str) -> Document:
    """The stored document's parts (images by their blob files) for the encoder."""
    parts = tuple(
        Part.of_text(p["text"])
        if "text" in p
        else Part.of_image(path=memory.blobs.resolve(p["image"]))
        for p in row_parts
    )
    return Document(parts=parts, source=f"{memory.root}:{doc_id}")


def reencode(
    path: str | Path,
    spec: EncoderSpec | None = None,
    encoder: Encoder | None = None,
    batch_size: int = BATCH,
    progress: bool = True,
) -> ReencodeReport:
    """Re-encode every document of the memory at `path` with `encoder` (built from `spec`;
    default: the encoder the manifest names, loaded as it is installed now)."""
    root = Path(path)
    start = time.perf_counter()
    memory = Memory.open(root, mode="a")  # no encoder check: the old vectors are replaced
    try:
        manifest = memory.manifest
        if manifest.backend != "embedded":
            raise MemoryFolderError(
                f"{root}: re-encoding is for the embedded backend; a {manifest.backend} memory "
                "is rebuilt by ingesting its sources into a new one"
            )
        finish_pending(root)  # under the write lock now: discard a crashed attempt's files
        spec = spec or EncoderSpec(
            name=manifest.encoder.name, path=manifest.encoder.path, batch_size=batch_size
        )
        encoder = encoder or load_encoder(spec)
        new_fingerprint = encoder.fingerprint()
        if encoder.name == manifest.encoder.name and new_fingerprint == manifest.fingerprint:
            return ReencodeReport(len(memory), manifest.fingerprint, new_fingerprint, True, 0.0)
        count = _write_new(memory, encoder, batch_size, progress)
        new_manifest = Manifest(
            encoder=spec,
            fingerprint=new_fingerprint,
            dim=encoder.dim,
            index=manifest.index,
            count=count,
            created=manifest.created,
            updated=time.time(),
        )
        atomic_write(root / NEW_MANIFEST, (new_manifest.to_json() + "\n").encode())
        atomic_write(root / REENCODE_COMMIT, b"reencode\n")  # the swap is decided
        memory.store.close()  # the old database is closed before it is replaced
        finish_pending(root)
    finally:
        memory.abandon()
    with Memory.open(root, mode="a", encoder=encoder) as fresh:  # rebuilds the index cache
        fresh.checkpoint()
    seconds = time.perf_counter() - start
    log.info("re-encoded %d documents of %s in %.1f s", count, root, seconds)
    return ReencodeReport(count, manifest.fingerprint, new_fingerprint, False, seconds)


def _write_new(memory: Memory, encoder: Encoder, batch_size: int, progress: bool) -> int:
    """Every document of `memory`, re-encoded, into a new database beside it."""
    target = memory.root / NEW_DATABASE
    remove_database(target)
    new = Store(target, encoder.dim)
    written = 0
    try:
        with memory.store.transaction(write=False) as con:
            total = int(con.execute("SELECT COUNT(*) FROM documents").fetchone()[0])
        with tqdm(total=total, desc="re-encode", unit="doc", disable=not progress) as bar:
            last = 0
            while True:
                rows = memory.store.rows_after(last, batch_size)
                if not rows:
                    break
                last = rows[-1].seq
                docs = [_document(memory, r.parts, r.id) for r in rows]
                images = [[_decode(p, doc) for p in doc.images] for doc in docs]
                vectors = encode_documents(encoder, docs, images)
                new.insert(
                    NewRow(
                        r.id,
                        r.parts,
                        r.metadata,
                        r.modality,
                        np.asarray(v, np.float32),
                        tuple(
                            sorted({p["image"].split(".", 1)[0] for p in r.parts if "image" in p})
                        ),
                    )
                    for r, v in zip(rows, vectors, strict=True)
                )
                written += len(rows)
                bar.update(len(rows))
        new.self_contained()  # one file, no WAL beside it: the swap moves it alone
    finally:
        new.close()
    return written


def _decode(part: Part, doc: Document) -> Image.Image:
    try:
        return decode_image(part.image_bytes(), source=part.path or doc.source)
    except DocumentError as e:
        raise MemoryFolderError(
            f"document {doc.id}: its stored image {part.path} cannot be read ({e}); "
            "the memory's blobs are damaged"
        ) from e
