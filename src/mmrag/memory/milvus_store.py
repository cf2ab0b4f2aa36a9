"""The Milvus collection behind `MilvusMemory`, with the embedded `Store`'s interface.

Connections (milvus-lite files are served in-process and reference-counted; servers get the
token from $MILVUS_TOKEN), the schema (seq INT64 primary key, id, parts, metadata JSON,
modality, image hashes, vector), filters as Milvus expressions with the embedded store's
meaning, the seq allocator, and the reads and writes `Memory` calls on its store.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mmrag.config import IndexConfig
from mmrag.fileio import atomic_write
from mmrag.memory.memory import MemoryFolderError
from mmrag.memory.store import MODALITY_KEY, Filters, NewRow, Row, StoreError, filter_sql

log = logging.getLogger(__name__)

TOKEN_ENV = "MILVUS_TOKEN"
SEQ_BLOCK = 65_536  # seqs reserved per allocator write
MAX_TOP_K = 16_384  # Milvus's limit on k (and on a query's limit)
IN_CHUNK = 1_000  # values per `field in [...]` expression
MAX_PARTS_BYTES = 65_535  # VARCHAR limit for a document's parts (JSON)
MAX_IMAGES = 4_096  # ARRAY capacity for a document's image hashes
ID_LENGTH = 32
FIELDS = ("seq", "id", "parts", "metadata", "modality", "blobs", "vector")
INSTALL_HINT = "the milvus backend needs pymilvus and milvus-lite: pip install 'mmrag[scale]'"

_lite_lock = threading.Lock()
_lite_users: Counter[str] = Counter()  # open clients per milvus-lite file in this process


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return pymilvus


def is_lite(uri: str) -> bool:
    return uri.endswith(".db")


class _LiteLogNoise(logging.Filter):
    """milvus-lite does not implement AllocTimestamp: pymilvus falls back to a client-side
    timestamp by itself, but grpc logs every refusal with a traceback (creating a collection
    asks once) and the query iterator warns. Drop exactly those records."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Method not implemented" not in message and "mvccTs" not in message


_NOISY_LOGGERS = ("grpc._server", "pymilvus.client.iterator.query_iterator")


def connect(uri: str) -> Any:
    """A `MilvusClient` for `uri`; milvus-lite files are reference-counted in this process so
    that the last close stops the in-process server and frees the file for other processes."""
    pymilvus = _pymilvus()
    if not is_lite(uri):
        return pymilvus.MilvusClient(uri=uri, token=os.environ.get(TOKEN_ENV, ""))
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LiteLogNoise) for f in logger.filters):
            logger.addFilter(_LiteLogNoise())
    with _lite_lock:
        try:
            client = pymilvus.MilvusClient(uri=uri)
        except pymilvus.exceptions.MilvusException as e:
            raise MemoryFolderError(
                f"cannot open the milvus-lite file {uri}: {e.message}. milvus-lite serves one "
                "process at a time; use a Milvus server for concurrent readers"
            ) from e
        _lite_users[uri] += 1
    return client


def disconnect(client: Any, uri: str) -> None:
    client.close()
    if not is_lite(uri):
        return
    with _lite_lock:
        _lite_users[uri] -= 1
        if _lite_users[uri] <= 0:
            del _lite_users[uri]
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(uri)


# --- filters ---------------------------------------------------------------------------------


def _literal(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)  # Milvus parses JSON escapes except \u


def filter_expr(filters: Filters | None) -> str:
    """Filters as a Milvus boolean expression, with the embedded store's meaning: a list is
    membership, None matches a missing or null key, `modality` is the document's modality."""
    if not filters:
        return ""
    filter_sql(filters)  # the embedded store's validation, so bad filters fail the same way
    clauses = []
    for key, value in filters.items():
        values = list(value) if isinstance(value, list | tuple | set | frozenset) else [value]
        field = "modality" if key == MODALITY_KEY else f'metadata["{key}"]'
        arms = [
            (f"{field} is null" if key != MODALITY_KEY else 'modality == ""')
            if v is None
            else f"{field} == {_literal(v)}"
            for v in values
        ]
        clauses.append("(" + " or ".join(arms) + ")")
    return " and ".join(clauses)


def _in(field: str, values: Sequence[Any]) -> str:
    return f"{field} in {json.dumps(list(values), ensure_ascii=False)}"


# --- the seq allocator -----------------------------------------------------------------------


def read_counters(path: Path) -> dict[str, int]:
    """The writer's counters file: {"next": high-water mark, "deleted": documents deleted}."""
    if not path.is_file():
        return {}
    return {k: int(v) for k, v in json.loads(path.read_text()).items()}


class SeqAllocator:
    """Hands out increasing seqs. The high-water mark is written (atomically) before any seq
    below it is used, so a crash skips numbers but never reuses one. Also keeps the count of
    deleted documents, which Milvus does not report."""

    def __init__(self, path: Path, start: int, deleted: int = 0) -> None:
        self.path = path
        self._next = start
        self._limit = start
        self.deleted = deleted

    @classmethod
    def open(cls, path: Path, scan_max: Callable[[], int]) -> SeqAllocator:
        """From the file, or (lost file) from just above the largest stored seq."""
        counters = read_counters(path)
        if "next" in counters:
            return cls(path, counters["next"], counters.get("deleted", 0))
        return cls(path, scan_max() + 1)

    def _save(self) -> None:
        atomic_write(self.path, json.dumps({"next": self._limit, "deleted": self.deleted}).encode())

    def take(self, n: int) -> list[int]:
        if self._next + n > self._limit:
            self._limit = self._next + max(n, SEQ_BLOCK)
            self._save()
        seqs = list(range(self._next, self._next + n))
        self._next += n
        return seqs

    def count_deleted(self, n: int) -> None:
        self.deleted += n
        self._save()


# --- the store -------------------------------------------------------------------------------


class MilvusStore:
    """The embedded `Store`'s interface over a Milvus collection (writes serialised by the
    caller, as there)."""

    def __init__(
        self, client: Any, uri: str, collection: str, dim: int, allocator: SeqAllocator | None
    ) -> None:
        self.client = client
        self.uri = uri
        self.collection = collection
        self.dim = dim
        self.allocator = allocator

    # --- schema --------------------------------------------------------------------------
    def create(self, index: IndexConfig) -> None:
        """Create the collection (Strong consistency: a write is visible to the next read)."""
        pymilvus = _pymilvus()
        types = pymilvus.DataType
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("seq", types.INT64, is_primary=True)
        schema.add_field("id", types.VARCHAR, max_length=ID_LENGTH)
        schema.add_field("parts", types.VARCHAR, max_length=MAX_PARTS_BYTES)
        schema.add_field("metadata", types.JSON)
        schema.add_field("modality", types.VARCHAR, max_length=8)
        schema.add_field(
            "blobs", types.ARRAY, element_type=types.VARCHAR, max_capacity=MAX_IMAGES, max_length=64
        )
        schema.add_field("vector", types.FLOAT_VECTOR, dim=self.dim)
        self.client.create_collection(
            self.collection,
            schema=schema,
            index_params=self._index_params(index),
            consistency_level="Strong",
        )

    def _index_params(self, index: IndexConfig) -> Any:
        params = self.client.prepare_index_params()
        kind, build = vector_index(index)
        params.add_index("vector", index_type=kind, metric_type="IP", params=build)
        params.add_index("id", index_type="INVERTED")  # id lookups: dedup, get, delete
        return params

    def load(self) -> None:
        """Load the collection for searching (a restarted server starts with it released)."""
        state = str(self.client.get_load_state(self.collection).get("state", ""))
        if not state.endswith("Loaded"):
            self.client.load_collection(self.collection)

    def ensure_index(self, index: IndexConfig) -> None:
        """Rebuild the vector index when the manifest asks for another one."""
        kind, build = vector_index(index)
        current = self.client.describe_index(self.collection, "vector")
        if current.get("index_type") == kind and all(
            str(current.get(k)) == str(v) for k, v in build.items()
        ):
            return
        log.info("rebuilding the Milvus vector index as %s %s", kind, build)
        self.client.release_collection(self.collection)
        self.client.drop_index(self.collection, "vector")
        params = self.client.prepare_index_params()
        params.add_index("vector", index_type=kind, metric_type="IP", params=build)
        self.client.create_index(self.collection, params)
        self.client.load_collection(self.collection)

    def close(self) -> None:
        disconnect(self.client, self.uri)

    # --- reads ---------------------------------------------------------------------------
    def generation(self) -> int:
        """Milvus keeps no change counter: a fresh value at every call, so no caller caches."""
        return time.monotonic_ns()

    def count(self, filters: Filters | None = None) -> int:
        rows = self.client.query(
            self.collection, filter=filter_expr(filters), output_fields=["count(*)"]
        )
        return int(rows[0]["count(*)"])

    def _query(self, expr: str, fields: Sequence[str]) -> list[dict[str, Any]]:
        return list(self.client.query(self.collection, filter=expr, output_fields=list(fields)))

    def _query_in(
        self, field: str, values: Sequence[Any], fields: Sequence[str]
    ) -> Iterator[dict[str, Any]]:
        for start in range(0, len(values), IN_CHUNK):
            yield from self._query(_in(field, values[start : start + IN_CHUNK]), fields)

    def scan(self, expr: str, fields: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Every row matching `expr`, in batches (no limit on the number of rows)."""
        it = self.client.query_iterator(
            self.collection, batch_size=MAX_TOP_K // 2, filter=expr, output_fields=list(fields)
        )
        try:
            while batch := it.next():
                yield from batch
        finally:
            it.close()

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        return {r["id"] for r in self._query_in("id", sorted(set(ids)), ["id"])}

    def seqs_matching(self, filters: Filters) -> NDArray[np.int64]:
        seqs = sorted(int(r["seq"]) for r in self.scan(filter_expr(filters), ["seq"]))
        return np.asarray(seqs, np.int64)

    def max_seq(self) -> int:
        return max((int(r["seq"]) for r in self.scan("", ["seq"])), default=0)

    @staticmethod
    def _row(r: Mapping[str, Any]) -> Row:
        return Row(
            int(r["seq"]),
            r["id"],
            json.loads(r["parts"]),
            dict(r["metadata"] or {}),
            r["modality"],
            np.asarray(r["vector"], np.float32),
        )

    def rows_by_seq(self, seqs: Sequence[int]) -> dict[int, Row]:
        keys = sorted({int(s) for s in seqs})
        return {int(r["seq"]): self._row(r) for r in self._query_in("seq", keys, FIELDS)}

    def rows_by_id(self, ids: Sequence[str]) -> dict[str, Row]:
        return {r["id"]: self._row(r) for r in self._query_in("id", sorted(set(ids)), FIELDS)}

    def vectors(self, seqs: Sequence[int]) -> NDArray[np.float32]:
        keys = sorted({int(s) for s in seqs})
        found = {int(r["seq"]): r["vector"] for r in self._query_in("seq", keys, ["seq", "vector"])}
        if not len(seqs):
            return np.zeros((0, self.dim), np.float32)
        return np.asarray([found[int(s)] for s in seqs], np.float32)

    def referenced_blobs(self) -> set[str]:
        return {sha for r in self.scan("", ["blobs"]) for sha in r["blobs"] or ()}

    def search(
        self, queries: NDArray[np.float32], k: int, filters: Filters | None, index: IndexConfig
    ) -> list[list[tuple[int, float]]]:
        """Top-k (seq, inner product) per query row, best first."""
        if not len(queries):
            return []
        k = min(k, MAX_TOP_K)
        params: dict[str, Any] = {"metric_type": "IP"}
        if index.kind == "hnsw":
            params["params"] = {"ef": max(index.hnsw_ef_search, k)}
        elif index.kind == "ivf":
            params["params"] = {"nprobe": index.ivf_nprobe}
        hits = self.client.search(
            self.collection,
            data=np.asarray(queries, np.float32).tolist(),
            limit=k,
            filter=filter_expr(filters),
            search_params=params,
            output_fields=[],
        )
        return [[(int(h["seq"]), float(h["distance"])) for h in row] for row in hits]

    def stats(self) -> dict[str, Any]:
        by_modality = {m: self.count({MODALITY_KEY: m}) for m in ("text", "image", "mixed")}
        return {
            "count": sum(by_modality.values()),
            "by_modality": {m: n for m, n in by_modality.items() if n},
            "generation": self.generation(),
        }

    # --- writes --------------------------------------------------------------------------
    def _writer(self) -> SeqAllocator:
        if self.allocator is None:
            raise StoreError("this Milvus store is open read-only")
        return self.allocator

    def insert(self, rows: Iterable[NewRow]) -> list[tuple[str, int]]:
        """Insert rows whose id is not stored yet (the first of repeated ids in `rows`).
        Returns (id, seq) of the rows inserted."""
        allocator = self._writer()
        fresh: dict[str, NewRow] = {}
        for r in rows:
            if r.vector.shape != (self.dim,):
                raise StoreError(f"vector of shape {r.vector.shape}, expected ({self.dim},)")
            fresh.setdefault(r.id, r)
        for id_ in self.existing_ids(list(fresh)):
            del fresh[id_]
        if not fresh:
            return []
        seqs = allocator.take(len(fresh))
        data = [self._entity(seq, r) for seq, r in zip(seqs, fresh.values(), strict=True)]
        self.client.insert(self.collection, data)
        return [(r.id, seq) for seq, r in zip(seqs, fresh.values(), strict=True)]

    @staticmethod
    def _entity(seq: int, r: NewRow) -> dict[str, Any]:
        parts = json.dumps(r.parts, ensure_ascii=False)
        if len(parts.encode("utf-8")) > MAX_PARTS_BYTES:
            raise StoreError(
                f"document {r.id}: its parts take over {MAX_PARTS_BYTES} bytes, the most a "
                "Milvus VARCHAR field holds"
            )
        return {
            "seq": seq,
            "id": r.id,
            "parts": parts,
            "metadata": dict(r.metadata),
            "modality": r.modality,
            "blobs": list(r.blobs),
            "vector": np.asarray(r.vector, np.float32).tolist(),
        }

    def update_metadata(self, updates: Mapping[str, Mapping[str, Any]]) -> int:
        """Replace the metadata of stored documents (by id); vectors are unchanged. Milvus
        upserts whole rows, so the stored row is read and written back."""
        self._writer()
        rows = list(self._query_in("id", sorted(updates), FIELDS))
        for r in rows:
            r["metadata"] = dict(updates[r["id"]])
        if rows:
            self.client.upsert(self.collection, rows)
        return len(rows)

    def delete(self, ids: Sequence[str]) -> tuple[list[int], set[str]]:
        """Delete documents by id (unknown ids are ignored). Returns the seqs removed and the
        image blobs that no document references any more."""
        self._writer()
        found = list(self._query_in("id", sorted(set(ids)), ["seq", "blobs"]))
        if not found:
            return [], set()
        seqs = [int(r["seq"]) for r in found]
        self.client.delete(self.collection, ids=seqs)
        self._writer().count_deleted(len(seqs))
        shas = sorted({sha for r in found for sha in r["blobs"] or ()})
        still = {
            sha
            for sha in shas
            if self.client.query(
                self.collection, filter=f"array_contains(blobs, {json.dumps(sha)})", limit=1
            )
        }
        return seqs, set(shas) - still


def vector_index(index: IndexConfig) -> tuple[str, dict[str, Any]]:
    """The Milvus index type and build parameters for an `IndexConfig` (inner product)."""
    if index.kind == "hnsw":
        return "HNSW", {"M": index.hnsw_m, "efConstruction": index.hnsw_ef_construction}
    if index.kind == "ivf":
        return "IVF_FLAT", {"nlist": index.ivf_nlist or 1024}
    return "FLAT", {}
