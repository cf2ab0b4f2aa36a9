"""The Milvus backend: documents, metadata and vectors in a Milvus collection.

`MilvusMemory` is a `Memory` whose store is `MilvusStore` (pymilvus `MilvusClient`) instead of
SQLite + FAISS; the manifest, the image blobs and the write lock stay in the memory folder, so
the `Retriever`, the CLI, the ingest pipelines and the server use it unchanged. A URI ending in
`.db` is a local milvus-lite file (an in-process server speaking the same client protocol as a
cluster; one process at a time per file); `http(s)://host:19530` is a Milvus server or cluster,
whose token is read from $MILVUS_TOKEN, never stored.

Semantics match the embedded store: a document's `seq` (the collection's INT64 primary key)
is never reused, because seqs come from a block allocator whose high-water mark is persisted
in the folder before any row uses them (if that file is lost, counting restarts above the
largest stored seq); re-adding an id is a no-op; deletes are visible at once (the collection is
created with Strong consistency); filters mean the same (`is null` in Milvus, like SQLite's
`json_extract(...) IS NULL`, also matches a missing key, and `true == 1`).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mmrag.fileio import atomic_write
from mmrag.memory.memory import Memory, MemoryFolderError
from mmrag.memory.milvus_store import (
    MilvusStore,
    SeqAllocator,
    connect,
    disconnect,
    is_lite,
    read_counters,
)
from mmrag.memory.store import Filters

DEFAULT_URI = "milvus.db"  # a milvus-lite file inside the memory folder
SEQ_FILE = "milvus-seq.json"  # the writer's counters: seq high-water mark, deletions
DIRTY_FILE = "milvus-writer.dirty"  # present while a writer is open: a crash leaves it behind


def locate(root: Path, uri: str | None) -> dict[str, Any]:
    """Manifest fields for a new Milvus memory: the URI (a local file is kept relative to the
    folder when it lies inside it, absolute otherwise) and a collection name of its own."""
    uri = uri or DEFAULT_URI
    if is_lite(uri):
        path = Path(uri) if Path(uri).is_absolute() else Path.cwd() / uri
        if uri == DEFAULT_URI:
            path = root.resolve() / DEFAULT_URI
        try:
            uri = str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            uri = str(path.resolve())
    elif not uri.startswith(("http://", "https://", "tcp://", "unix:")):
        raise ValueError(
            f"milvus URI {uri!r}: use a local path ending in .db or http(s)://HOST:PORT"
        )
    return {"backend": "milvus", "uri": uri, "collection": f"mmrag_{uuid.uuid4().hex[:16]}"}


def resolve_uri(root: Path, uri: str) -> str:
    """The URI to connect to: local milvus-lite paths are relative to the memory folder."""
    if is_lite(uri) and not Path(uri).is_absolute():
        return str((root / uri).resolve())
    return uri


# --- the memory ------------------------------------------------------------------------------


class MilvusMemory(Memory):
    """A `Memory` whose documents, metadata and vectors live in Milvus (see the module)."""

    store: MilvusStore  # type: ignore[assignment]  # the embedded Store's interface, on Milvus

    @staticmethod
    def locate(root: Path, uri: str | None) -> dict[str, Any]:
        return locate(root, uri)

    def _open_documents(self) -> None:
        uri = resolve_uri(self.root, self.manifest.uri)
        client = connect(uri)
        try:
            self.store = self._open_store(client, uri)
        except BaseException:
            disconnect(client, uri)
            raise

    def _open_store(self, client: Any, uri: str) -> MilvusStore:
        name, dirty = self.manifest.collection, self.root / DIRTY_FILE
        store = MilvusStore(client, uri, name, self.manifest.dim, None)
        exists = client.has_collection(name)
        if self.mode == "r":
            if not exists:
                raise MemoryFolderError(f"{self.root}: no Milvus collection {name} at {uri}")
            store.load()
            return store
        if exists:
            store.load()
            store.ensure_index(self.manifest.index)
        else:
            store.create(self.manifest.index)
        store.allocator = SeqAllocator.open(
            self.root / SEQ_FILE, store.max_seq if exists else lambda: 0
        )
        if dirty.exists():  # the last writer died: collect the blobs it left unreferenced
            referenced = store.referenced_blobs()  # a scan of the collection: only then
            self.blobs.collect(referenced)
            self._check_blobs(referenced)
        atomic_write(dirty, f"pid {os.getpid()}\n".encode())
        return store

    def _after_write(self) -> None:
        """Milvus indexes by itself; nothing to catch up."""

    def checkpoint(self) -> None:
        """Record the count in the manifest (writers only)."""
        if self.mode != "a":
            return
        with self._lock:
            self.manifest = self.manifest.replace(count=self.store.count(), updated=time.time())
            self._write_manifest()
            self._last_checkpoint = time.monotonic()

    def close(self) -> None:
        with self._lock:
            try:
                if self.mode == "a":
                    self.checkpoint()
                    self.store.client.flush(self.store.collection)
                    (self.root / DIRTY_FILE).unlink(missing_ok=True)
            finally:
                self.store.close()
                if self._write_lock is not None:
                    self._write_lock.release()

    def ids(self) -> Iterator[str]:
        return (r["id"] for r in self.store.scan("", ["id"]))

    def search_vectors(
        self, queries: NDArray[np.float32], k: int, filters: Filters | None = None
    ) -> list[list[tuple[int, float]]]:
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        return self.store.search(queries, k, filters, self.manifest.index)

    def stats(self) -> dict[str, Any]:
        """The embedded memory's stats keys; `database_bytes` counts a milvus-lite file in
        the folder (0 for a server), `deleted_total` the deletes this folder's writers made."""
        stats = self.store.stats()
        names = list(self.blobs.iter_names())
        database = Path(resolve_uri(self.root, self.manifest.uri))
        stats.update(
            path=str(self.root),
            encoder=self._encoder_stats(),
            index={
                "kind": self.manifest.index.kind,
                "vectors": stats["count"],
                "generation": stats["generation"],
            },
            backend={
                "name": "milvus",
                "uri": self.manifest.uri,
                "collection": self.store.collection,
            },
            images=len(names),
            deleted_total=read_counters(self.root / SEQ_FILE).get("deleted", 0),
            blob_bytes=self.blobs.total_bytes(),
            missing_images=len(self.blobs.missing(self.store.referenced_blobs())),
            database_bytes=sum(f.stat().st_size for f in database.rglob("*") if f.is_file())
            if is_lite(self.manifest.uri)
            else 0,
        )
        return stats
