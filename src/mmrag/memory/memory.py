"""`Memory`: a folder holding a multimodal memory (manifest, SQLite, image blobs, index cache).

Layout::

    MEMORY/manifest.json   encoder name + fingerprint, dimension, index config, count
    MEMORY/memory.sqlite   documents, metadata, vectors, change log (the source of truth)
    MEMORY/blobs/          image bytes by SHA-256
    MEMORY/index.bin       the vector index, a cache rebuilt whenever it cannot be trusted
    MEMORY/write.lock      held by the one process allowed to write

Any number of processes may read while one writes; readers catch their in-memory index up
with the store's change log before every search.

That is the embedded backend. With `backend="milvus"` the manifest names a Milvus URI and
collection that hold the documents, metadata and vectors instead of SQLite and the index
cache (`mmrag.memory.milvus`); the blobs, the manifest and the write lock stay in the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from numpy.typing import NDArray

from mmrag.config import Config, IndexConfig
from mmrag.documents import Document, Part
from mmrag.encoders.base import Encoder, EncoderSpec, load_encoder
from mmrag.fileio import atomic_write
from mmrag.memory.blobs import BlobStore
from mmrag.memory.index import FaissIndex, IndexFileError, load_index, save_index
from mmrag.memory.store import Filters, NewRow, Row, Store
from mmrag.registry import load_object

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DATABASE = "memory.sqlite"
BLOBS = "blobs"
INDEX = "index.bin"
LOCK = "write.lock"
# A re-encode in place (mmrag.memory.reencode) builds these beside the live files and swaps
# them in once the commit marker exists.
NEW_DATABASE = DATABASE + ".reencode"
NEW_MANIFEST = MANIFEST + ".reencode"
REENCODE_COMMIT = "reencode.commit"
WAL_SUFFIXES = ("-wal", "-shm", "-journal")
MANIFEST_FORMAT = 1
CHECKPOINT_EVERY_S = 60.0
# Where each backend's Memory class lives; imported on use, so this module never imports a
# backend (nor its optional dependencies) by name.
BACKENDS: dict[str, str] = {
    "embedded": "mmrag.memory.memory:Memory",
    "milvus": "mmrag.memory.milvus:MilvusMemory",
}


class MemoryFolderError(RuntimeError):
    """The folder is not a usable memory (missing, locked, or built for another encoder)."""


class EncoderMismatchError(MemoryFolderError):
    """The memory's vectors were made by another encoder than the one offered."""


@dataclasses.dataclass(frozen=True)
class Manifest(Config):
    format: int = MANIFEST_FORMAT
    encoder: EncoderSpec = dataclasses.field(default_factory=EncoderSpec)
    fingerprint: str = ""
    dim: int = 0
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    count: int = 0
    created: float = 0.0
    updated: float = 0.0
    # Where documents and vectors live: "embedded" (SQLite + FAISS in the folder) or
    # "milvus" (the collection `collection` at `uri`; a `.db` path is milvus-lite, relative
    # paths are relative to the folder).
    backend: Literal["embedded", "milvus"] = "embedded"
    uri: str = ""
    collection: str = ""


@dataclasses.dataclass(frozen=True)
class StoredDocument:
    """A document as the memory holds it; image parts point at their stored blob."""

    id: str
    seq: int
    parts: tuple[Part, ...]
    metadata: dict[str, Any]
    modality: str

    @property
    def text(self) -> str:
        return " ".join(p.text or "" for p in self.parts if p.kind == "text").strip()

    @property
    def images(self) -> list[str]:
        """The stored image files, in part order."""
        return [p.path for p in self.parts if p.kind == "image" and p.path]

    @property
    def image(self) -> str | None:
        """The first stored image file, if any."""
        images = self.images
        return images[0] if images else None

    def to_document(self) -> Document:
        return Document(parts=self.parts, metadata=dict(self.metadata))


def read_manifest(root: Path) -> Manifest:
    """The folder's manifest, or a MemoryFolderError saying it is damaged (not a traceback)."""
    try:
        return Manifest.load(root / MANIFEST)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: JSON and ConfigError
        raise MemoryFolderError(f"{root / MANIFEST} is damaged: {e}") from None


# --- re-encoding in place: the swap (mmrag.memory.reencode builds what it swaps in) ---------


def remove_database(path: Path) -> None:
    """A SQLite file and its journal files."""
    for p in (path, *(path.with_name(path.name + s) for s in WAL_SUFFIXES)):
        p.unlink(missing_ok=True)


def _fsync_dir(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_pending(root: str | Path) -> bool:
    """Complete a committed re-encode a crash interrupted, or discard an uncommitted one.
    Returns whether a committed swap was finished. Idempotent; callers hold the write lock
    or know no writer runs (opening a memory)."""
    root = Path(root)
    new_db, new_manifest = root / NEW_DATABASE, root / NEW_MANIFEST
    if not (root / REENCODE_COMMIT).exists():
        if new_db.exists() or new_manifest.exists():
            log.info("%s: removing the files of an unfinished re-encode", root)
            remove_database(new_db)
            new_manifest.unlink(missing_ok=True)
        return False
    # Two processes may finish the same swap (the writer and a reader opening meanwhile):
    # every step tolerates the other having done it first.
    if new_db.exists():
        for suffix in WAL_SUFFIXES:  # the old database's log must not meet the new file
            (root / (DATABASE + suffix)).unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(new_db, root / DATABASE)
    with contextlib.suppress(FileNotFoundError):
        os.replace(new_manifest, root / MANIFEST)
    (root / INDEX).unlink(missing_ok=True)
    _fsync_dir(root)
    (root / REENCODE_COMMIT).unlink(missing_ok=True)
    _fsync_dir(root)
    log.info("%s: finished a committed re-encode", root)
    return True


class _WriteLock:
    """An exclusive, non-blocking flock on MEMORY/write.lock, held for the writer's life."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] | None = path.open("a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            raise MemoryFolderError(
                f"{path.parent} is open for writing by {holder}; one writer at a time "
                "(readers may search meanwhile)"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class Memory:
    """Documents, vectors and image blobs in a folder. Use `create` or `open`."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        mode: Literal["r", "a"],
        encoder: Encoder | None = None,
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.mode = mode
        self._encoder = encoder
        self._lock = threading.RLock()
        self._write_lock = _WriteLock(root / LOCK) if mode == "a" else None
        self.blobs = BlobStore(root / BLOBS)
        self._last_checkpoint = time.monotonic()
        try:
            self._open_documents()
        except BaseException:
            if self._write_lock is not None:
                self._write_lock.release()
            raise

    def _open_documents(self) -> None:
        """The embedded backend: SQLite and the FAISS index cache."""
        self.store = Store(self.root / DATABASE, self.manifest.dim, readonly=self.mode == "r")
        stored = self.store.stored_dim()
        if stored is not None and stored != self.manifest.dim:
            self.store.close()
            raise MemoryFolderError(
                f"{self.root}: the manifest says {self.manifest.dim}-d vectors, the store holds "
                f"{stored}-d ones: the manifest does not belong to this database"
            )
        self._index: FaissIndex | None = None
        self._generation = -1
        self._max_seq = 0
        self._dirty = False
        if self.mode == "a":  # the cheap part of `mmrag check`, as the writer opens
            referenced = self.store.referenced_blobs()
            self.blobs.collect(referenced)  # leftovers of a killed writer
            self._check_blobs(referenced)
            kept, rows = self.store.count(), self.store.counted()
            if kept != rows:
                log.warning(
                    "%s: the kept count said %d, the store holds %d: recounted",
                    self.root,
                    kept,
                    rows,
                )
                self.store.recount()

    def _check_blobs(self, referenced: set[str]) -> None:
        """Warn (once per writer) about stored images whose blob file is gone."""
        missing = self.blobs.missing(referenced)
        if missing:
            log.warning(
                "%s: %d stored images are missing from %s (e.g. %s): their documents keep "
                "their vectors but cannot show their images; re-ingest their sources or "
                "delete them",
                self.root,
                len(missing),
                BLOBS,
                sorted(missing)[0][:16],
            )

    # --- opening ------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        encoder: Encoder,
        spec: EncoderSpec,
        index: IndexConfig | None = None,
        backend: str = "embedded",
        uri: str | None = None,
    ) -> Memory:
        """A new memory in `path`. `backend="milvus"` keeps documents and vectors in Milvus
        at `uri` (default: `milvus.db`, a milvus-lite file in the folder)."""
        root = Path(path)
        if (root / MANIFEST).exists():
            raise MemoryFolderError(f"{root} already holds a memory; open it instead")
        if spec.name != encoder.name:
            raise ValueError(f"spec names encoder {spec.name!r} but got {encoder.name!r}")
        located = _locate_backend(root, backend, uri)
        root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        manifest = Manifest(
            encoder=spec,
            fingerprint=encoder.fingerprint(),
            dim=encoder.dim,
            index=index or IndexConfig(),
            created=now,
            updated=now,
            **located,
        )
        atomic_write(root / MANIFEST, (manifest.to_json() + "\n").encode())
        return _memory_class(manifest.backend)(root, manifest, "a", encoder)

    @staticmethod
    def locate(root: Path, uri: str | None) -> dict[str, Any]:
        """The manifest's backend fields for a new memory in `root`: none for the embedded
        backend, which keeps everything in the folder."""
        if uri:
            raise ValueError("a URI applies to the milvus backend only")
        return {}

    @classmethod
    def open(
        cls,
        path: str | Path,
        mode: Literal["r", "a"] = "r",
        encoder: Encoder | None = None,
        index: IndexConfig | None = None,
    ) -> Memory:
        """Open an existing memory. An `encoder` given must match the manifest's; an `index`
        config that differs from the manifest's rebuilds the index (writers only)."""
        root = Path(path)
        if (root / REENCODE_COMMIT).exists():  # a crash interrupted a committed re-encode
            finish_pending(root)
        if not (root / MANIFEST).is_file():
            raise MemoryFolderError(
                f"{root} is not an mmrag memory (no {MANIFEST}); create one with `mmrag ingest`"
            )
        manifest = read_manifest(root)
        if manifest.format != MANIFEST_FORMAT:
            raise MemoryFolderError(f"{root}: manifest format {manifest.format} is not supported")
        if encoder is not None:
            cls._check_encoder(root, manifest, encoder)
        reindex = index is not None and index != manifest.index
        if reindex:
            if mode != "a":
                raise MemoryFolderError("changing the index configuration needs write mode")
            manifest = manifest.replace(index=index)
        memory = _memory_class(manifest.backend)(root, manifest, mode, encoder)
        if reindex:
            memory._write_manifest()
        return memory

    @staticmethod
    def _check_encoder(root: Path, manifest: Manifest, encoder: Encoder) -> None:
        if encoder.name != manifest.encoder.name or encoder.fingerprint() != manifest.fingerprint:
            raise EncoderMismatchError(
                f"{root} was built with encoder {manifest.encoder.name!r} (fingerprint "
                f"{manifest.fingerprint[:16]}), not {encoder.name!r} "
                f"({encoder.fingerprint()[:16]}): its vectors would be meaningless. "
                "Use the original encoder, a new memory, or re-encode this one in place with "
                "`mmrag ingest MEMORY --reencode`."
            )

    @property
    def encoder(self) -> Encoder:
        """The memory's encoder, loaded from the manifest on first use and checked."""
        if self._encoder is None:
            encoder = load_encoder(self.manifest.encoder)
            self._check_encoder(self.root, self.manifest, encoder)
            self._encoder = encoder
        return self._encoder

    def use_encoder(self, encoder: Encoder) -> None:
        """Encode with `encoder` from now on (a wrapper of the memory's own, such as the
        server's `BatchingEncoder`); it must have the memory's name and fingerprint."""
        self._check_encoder(self.root, self.manifest, encoder)
        self._encoder = encoder

    def close(self) -> None:
        with self._lock:
            if self.mode == "a":
                self.checkpoint()
                if self._write_lock is not None:
                    self._write_lock.release()
            self.store.close()

    def abandon(self) -> None:
        """Close without writing anything back (no index, no manifest) and release the write
        lock: for a caller that has replaced the memory's files (`reencode`)."""
        with self._lock:
            self.store.close()
            if self._write_lock is not None:
                self._write_lock.release()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the index cache ----------------------------------------------------------------
    def _sync(self) -> FaissIndex:
        """Bring the in-memory index up to the store's generation (loading or rebuilding it
        when needed). Callers hold `self._lock`."""
        if self._index is None:
            self._index = self._load_or_rebuild()
        if self.store.generation() != self._generation:
            changes = self.store.changes_since(self._generation, self._max_seq)
            self._index.remove(changes.deleted_seqs)
            self._index.add(changes.added_seqs, changes.added_vectors)
            if len(changes.added_seqs):
                self._max_seq = int(changes.added_seqs.max())
            self._generation = changes.generation
            self._dirty = True
        if self._index.needs_rebuild():
            self._index = self._rebuild()
        return self._index

    def _load_or_rebuild(self) -> FaissIndex:
        path = self.root / INDEX
        if path.exists():
            try:
                index, generation, max_seq = load_index(
                    path, self.manifest.dim, self.manifest.index
                )
            except IndexFileError as e:
                log.warning("rebuilding the index: %s", e)
            else:
                if generation <= self.store.generation():
                    self._generation, self._max_seq = generation, max_seq
                    return index
                log.warning("rebuilding the index: it is newer than the store")
        return self._rebuild()

    def _rebuild(self) -> FaissIndex:
        with self.store.transaction(write=False):
            generation = self.store.generation()
            chunks = list(self.store.iter_all())
        ids = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64)
        vecs = (
            np.concatenate([c[1] for c in chunks])
            if chunks
            else np.zeros((0, self.manifest.dim), np.float32)
        )
        log.info("building a %s index over %d vectors", self.manifest.index.kind, len(ids))
        index = FaissIndex.build(self.manifest.dim, self.manifest.index, ids, vecs)
        self._generation, self._max_seq = generation, int(ids.max()) if len(ids) else 0
        self._dirty = True
        return index

    def checkpoint(self) -> None:
        """Persist the index and the manifest's count (writers only; cheap when clean)."""
        if self.mode != "a":
            return
        with self._lock:
            index = self._sync()
            if self._dirty:
                save_index(self.root / INDEX, index, self._generation, self._max_seq)
                self._dirty = False
            self.manifest = self.manifest.replace(count=self.store.count(), updated=time.time())
            self._write_manifest()
            self._last_checkpoint = time.monotonic()

    def rebuild_index(self) -> None:
        """Rebuild the index from the store and save it (writers only: a repair)."""
        self._require_writer()
        with self._lock:
            self._index = self._rebuild()
            self.checkpoint()

    def index_snapshot(self) -> FaissIndex:
        """The index, caught up with the store (for checks)."""
        with self._lock:
            return self._sync()

    def _write_manifest(self) -> None:
        atomic_write(self.root / MANIFEST, (self.manifest.to_json() + "\n").encode())

    # --- writes -------------------------------------------------------------------------
    def _require_writer(self) -> None:
        if self.mode != "a":
            raise MemoryFolderError(f"{self.root} is open read-only")

    def add_encoded(self, docs: Sequence[Document], vectors: NDArray[np.float32]) -> list[str]:
        """Store documents with their precomputed vectors; existing ids are left as they are.
        Blobs are written before the rows that reference them, so a crash leaves at worst
        unreferenced blobs (collected when a writer next opens). Returns the ids added."""
        self._require_writer()
        if len(docs) != len(vectors):
            raise ValueError("need one vector per document")
        rows = []
        for doc, vec in zip(docs, vectors, strict=True):
            parts: list[dict[str, str]] = []
            for p in doc.parts:
                if p.kind == "text":
                    parts.append({"text": p.text or ""})
                else:
                    parts.append({"image": self.blobs.put(p.sha256 or "", p.image_bytes())})
            rows.append(
                NewRow(
                    doc.id,
                    parts,
                    dict(doc.metadata),
                    doc.modality,
                    np.asarray(vec, np.float32),
                    tuple(sorted({p.sha256 or "" for p in doc.images})),
                )
            )
        with self._lock:
            inserted = self.store.insert(rows)
            self._after_write()
        return [id_ for id_, _ in inserted]

    def _after_write(self) -> None:
        """Catch the index cache up with a write and checkpoint now and then (callers hold
        `self._lock`)."""
        self._sync()
        if time.monotonic() - self._last_checkpoint > CHECKPOINT_EVERY_S:
            self.checkpoint()

    def update_metadata(self, updates: Mapping[str, Mapping[str, Any]]) -> int:
        self._require_writer()
        return self.store.update_metadata(updates)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete documents; they are gone from results at once and their blobs collected."""
        self._require_writer()
        with self._lock:  # held while unlinking, so an add of the same image cannot interleave
            seqs, orphans = self.store.delete(list(ids))
            self._after_write()
            for sha in orphans:
                self.blobs.remove(sha)
        return len(seqs)

    # --- reads --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.store.count()

    def contains(self, ids: Sequence[str]) -> set[str]:
        return self.store.existing_ids(list(ids))

    def ids(self) -> Iterator[str]:
        """Every stored document id, in no particular order (one read snapshot)."""
        with self.store.transaction(write=False) as con:
            for (id_,) in con.execute("SELECT id FROM documents"):
                yield id_

    def search_vectors(
        self, queries: NDArray[np.float32], k: int, filters: Filters | None = None
    ) -> list[list[tuple[int, float]]]:
        """Top-k (seq, score) per query row, best first, over documents matching `filters`."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        allowed = self.store.seqs_matching(filters) if filters else None
        with self._lock:
            index = self._sync()
            scores, seqs = index.search(queries, k, allowed)
        return [
            [(int(i), float(s)) for s, i in zip(srow, irow, strict=True) if i >= 0]
            for srow, irow in zip(scores, seqs, strict=True)
        ]

    def _stored(self, row: Row) -> StoredDocument:
        parts = tuple(
            Part.stored(text=p["text"])
            if "text" in p
            else Part.stored(
                sha256=p["image"].split(".", 1)[0], path=self.blobs.location(p["image"])
            )
            for p in row.parts
        )
        return StoredDocument(row.id, row.seq, parts, row.metadata, row.modality)

    def get_by_seq(self, seqs: Sequence[int]) -> list[StoredDocument | None]:
        rows = self.store.rows_by_seq(seqs)
        return [self._stored(rows[s]) if s in rows else None for s in seqs]

    def get(self, ids: Sequence[str]) -> list[StoredDocument | None]:
        rows = self.store.rows_by_id(ids)
        return [self._stored(rows[i]) if i in rows else None for i in ids]

    def vectors(self, seqs: Sequence[int]) -> NDArray[np.float32]:
        return self.store.vectors(seqs)

    def _encoder_stats(self) -> dict[str, Any]:
        """Which encoder made the vectors, as `stats` reports it."""
        encoder = self.manifest.encoder
        return {
            "name": encoder.name,
            "path": encoder.path,
            "fingerprint": self.manifest.fingerprint,
            "dim": self.manifest.dim,
        }

    def stats(self) -> dict[str, Any]:
        with self._lock:
            index = self._sync()
        stats = self.store.stats()
        stats.update(
            path=str(self.root),
            encoder=self._encoder_stats(),
            index={
                "kind": self.manifest.index.kind,
                "vectors": len(index),
                "trained_ivf": index.is_ivf,
                "generation": self._generation,
            },
            blob_bytes=self.blobs.total_bytes(),
            missing_images=len(self.blobs.missing(self.store.referenced_blobs())),
            database_bytes=sum(p.stat().st_size for p in self.root.glob(DATABASE + "*")),
        )
        return stats


def _memory_class(backend: str) -> type[Memory]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cls: type[Memory] = load_object(BACKENDS[backend])
    return cls


def _locate_backend(root: Path, backend: str, uri: str | None) -> dict[str, Any]:
    """The manifest's backend fields for a new memory."""
    return _memory_class(backend).locate(root, uri)


def _check_backend(root: Path, backend: str | None, uri: str | None) -> None:
    """An existing memory keeps the backend and URI it was created with."""
    manifest = read_manifest(root)
    same_backend = backend is None or backend == manifest.backend
    same_uri = uri is None or (
        manifest.backend == "milvus" and _locate_backend(root, "milvus", uri)["uri"] == manifest.uri
    )
    if not (same_backend and same_uri):
        where = f" at {manifest.uri}" if manifest.uri else ""
        raise MemoryFolderError(
            f"{root} is a {manifest.backend} memory{where}; its backend and URI cannot change "
            "(ingest into a new memory instead)"
        )


def open_memory(
    path: str | Path,
    mode: Literal["r", "a"] = "r",
    encoder: Encoder | None = None,
    index: IndexConfig | None = None,
) -> Memory:
    """Open the memory in `path` for reading (`mode="r"`) or writing (`"a"`), whatever its
    backend; the same as `Memory.open`."""
    return Memory.open(path, mode=mode, encoder=encoder, index=index)


def ensure_memory(
    path: str | Path,
    spec: EncoderSpec | None = None,
    index: IndexConfig | None = None,
    encoder: Encoder | None = None,
    backend: str | None = None,
    uri: str | None = None,
) -> Memory:
    """Open MEMORY for writing, creating it if it does not exist yet (with `spec`, by default
    the `lite` encoder, and `backend`, by default embedded). An existing memory keeps its own
    encoder and backend; a `spec`, `encoder`, `backend` or `uri` given for it must match the
    manifest."""
    root = Path(path)
    if (root / MANIFEST).exists():
        if backend is not None or uri is not None:
            _check_backend(root, backend, uri)
        if encoder is None and spec is not None:
            encoder = load_encoder(spec)
        return Memory.open(root, mode="a", encoder=encoder, index=index)
    spec = spec or EncoderSpec()
    return Memory.create(
        root, encoder or load_encoder(spec), spec, index, backend or "embedded", uri
    )
