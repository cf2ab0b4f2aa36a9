"""Maximum inner product search: the `VectorIndex` Protocol, an exact NumPy oracle, and FAISS.

The index is a cache of the SQLite store's vectors, keyed by the store's `seq`. It is saved
to one file (magic, JSON header, checksum, FAISS bytes) written atomically; a file that is
missing, damaged or stale is rebuilt or caught up by the memory, never trusted blindly.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from mmrag.config import IndexConfig
from mmrag.fileio import atomic_write

MAGIC = b"MMRAGIDX"
FORMAT_VERSION = 2  # 2: the checksum covers the header too
IVF_MIN_TRAIN = 2048  # below this many vectors IVF stays exact (and flat is faster anyway)
IVF_POINTS_PER_LIST = 39  # FAISS's minimum for a stable k-means
IVF_RETRAIN_GROWTH = 8  # retrain once the index holds this many times what it was trained on
EXACT_FILTER_FRACTION = 0.1  # filters admitting less than this use exact search (ANN kinds)

Ids = NDArray[np.int64]
Vecs = NDArray[np.float32]


class IndexFileError(RuntimeError):
    """The saved index file is missing, damaged or of another format."""


class VectorIndex(Protocol):
    """Inner-product top-k over vectors with int64 ids. Missing results have id -1."""

    def __len__(self) -> int: ...

    def add(self, ids: Ids, vectors: Vecs) -> None: ...

    def remove(self, ids: Ids) -> None: ...

    def search(self, queries: Vecs, k: int, allowed: Ids | None = None) -> tuple[Vecs, Ids]:
        """(scores, ids), each (Q, k), best first; `allowed` restricts the candidates."""
        ...

    def needs_rebuild(self) -> bool: ...


def _top_k(scores: Vecs, ids: Ids, k: int) -> tuple[Vecs, Ids]:
    """Best-first top-k per row of a (Q, N) score matrix, padded with -1 ids."""
    q, n = scores.shape
    out_s = np.full((q, k), -np.inf, dtype=np.float32)
    out_i = np.full((q, k), -1, dtype=np.int64)
    take = min(k, n)
    if take == 0:
        return out_s, out_i
    part = np.argpartition(-scores, take - 1, axis=1)[:, :take]  # (Q, take)
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    out_s[:, :take] = np.take_along_axis(scores, best, axis=1)
    out_i[:, :take] = ids[best]
    return out_s, out_i


class NumpyIndex:
    """Exact brute force in NumPy: the reference every FAISS index is tested against."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._ids = np.zeros(0, np.int64)
        self._vecs = np.zeros((0, dim), np.float32)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, ids: Ids, vectors: Vecs) -> None:
        self._ids = np.concatenate([self._ids, np.asarray(ids, np.int64)])
        self._vecs = np.concatenate([self._vecs, np.asarray(vectors, np.float32)])

    def remove(self, ids: Ids) -> None:
        keep = ~np.isin(self._ids, ids)
        self._ids, self._vecs = self._ids[keep], self._vecs[keep]

    def search(self, queries: Vecs, k: int, allowed: Ids | None = None) -> tuple[Vecs, Ids]:
        ids, vecs = self._ids, self._vecs
        if allowed is not None:
            mask = np.isin(ids, allowed)
            ids, vecs = ids[mask], vecs[mask]
        return _top_k(np.asarray(queries, np.float32) @ vecs.T, ids, k)

    def needs_rebuild(self) -> bool:
        return False

    def vectors(self, ids: Ids) -> Vecs:
        pos = {int(i): j for j, i in enumerate(self._ids)}
        return self._vecs[[pos[int(i)] for i in ids]]


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a core dependency
        raise ImportError("the vector index needs faiss: pip install faiss-cpu") from e
    return faiss


class FaissIndex:
    """FAISS flat (exact), HNSW or IVF-Flat over inner product, with int64 ids.

    HNSW cannot delete in place: deleted ids become tombstones excluded at search time,
    and `needs_rebuild` asks for a rebuild once they pass `max_tombstone_fraction`. IVF
    stays an exact flat index until it holds `IVF_MIN_TRAIN` vectors, then asks to be
    rebuilt (trained), and again after growing `IVF_RETRAIN_GROWTH` times.
    """

    def __init__(
        self,
        dim: int,
        config: IndexConfig,
        index: Any = None,
        tombstones: Ids | None = None,
        trained_on: int = 0,
    ) -> None:
        self.dim, self.config = dim, config
        self.trained_on = trained_on
        self._tombstones: set[int] = set() if tombstones is None else {int(t) for t in tombstones}
        self._index = index if index is not None else self._empty()

    # --- construction -------------------------------------------------------------------
    def _empty(self) -> Any:
        faiss = _faiss()
        if self.config.kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self.config.hnsw_ef_construction
            return faiss.IndexIDMap2(hnsw)
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    @classmethod
    def build(
        cls, dim: int, config: IndexConfig, ids: Ids, vectors: Vecs, seed: int = 0
    ) -> FaissIndex:
        """A fresh index over all given vectors (IVF is trained here when big enough)."""
        n = len(ids)
        if config.kind != "ivf" or n < IVF_MIN_TRAIN:
            index = cls(dim, config)
            index.add(ids, vectors)
            return index
        faiss = _faiss()
        nlist = config.ivf_nlist or int(4 * np.sqrt(n))
        nlist = max(1, min(nlist, n // IVF_POINTS_PER_LIST))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = seed
        rng = np.random.default_rng(seed)
        sample = vectors if n <= nlist * 256 else vectors[rng.choice(n, nlist * 256, replace=False)]
        ivf.train(np.ascontiguousarray(sample, np.float32))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        index = cls(dim, config, index=ivf, trained_on=n)
        index.add(ids, vectors)
        return index

    # --- the Protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._index.ntotal) - len(self._tombstones)

    @property
    def is_ivf(self) -> bool:
        return self.trained_on > 0

    def add(self, ids: Ids, vectors: Vecs) -> None:
        if len(ids):
            self._index.add_with_ids(
                np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64)
            )

    def remove(self, ids: Ids) -> None:
        ids = np.ascontiguousarray(ids, np.int64)
        if not len(ids):
            return
        if self.config.kind == "hnsw":
            present = ids[[self._contains(int(i)) for i in ids]]
            self._tombstones.update(int(i) for i in present)
        else:
            self._index.remove_ids(ids)

    def _contains(self, i: int) -> bool:
        try:
            self._index.reconstruct(i)
        except RuntimeError:
            return False
        return i not in self._tombstones

    def needs_rebuild(self) -> bool:
        physical = max(1, int(self._index.ntotal))
        if len(self._tombstones) > self.config.max_tombstone_fraction * physical:
            return True
        if self.config.kind == "ivf":
            n = len(self)
            if not self.is_ivf:
                return n >= IVF_MIN_TRAIN
            return n > IVF_RETRAIN_GROWTH * self.trained_on
        return False

    def search(self, queries: Vecs, k: int, allowed: Ids | None = None) -> tuple[Vecs, Ids]:
        queries = np.ascontiguousarray(queries, np.float32)
        if allowed is not None:
            allowed = np.asarray(allowed, np.int64)
            if self._tombstones:
                allowed = allowed[~np.isin(allowed, list(self._tombstones))]
            if self.config.kind != "flat" and len(allowed) < EXACT_FILTER_FRACTION * len(self):
                return self._exact(queries, k, allowed)
        elif self._tombstones:
            allowed = None  # handled by the selector below
        scores, ids = self._index.search(queries, k, params=self._params(allowed))
        return scores.astype(np.float32), ids.astype(np.int64)

    def ids(self) -> Ids:
        """Every id the index holds (tombstones excluded), sorted: for `mmrag check`."""
        faiss = _faiss()
        if self.is_ivf:
            lists = self._index.invlists
            parts = [
                faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                for i in range(lists.nlist)
            ]
            found = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        else:
            found = faiss.vector_to_array(self._index.id_map)
        found = np.asarray(found, np.int64)
        if self._tombstones:
            found = found[~np.isin(found, list(self._tombstones))]
        return np.sort(found)

    def vector(self, i: int) -> Vecs:
        """The stored vector of id `i` (RuntimeError if absent)."""
        return np.asarray(self._index.reconstruct(int(i)), np.float32)

    def _exact(self, queries: Vecs, k: int, allowed: Ids) -> tuple[Vecs, Ids]:
        """Brute force over a small allowed set (ANN graphs lose recall under tight filters)."""
        if not len(allowed):
            return _top_k(np.zeros((len(queries), 0), np.float32), allowed, k)
        vecs = np.stack([self._index.reconstruct(int(i)) for i in allowed])
        return _top_k(queries @ vecs.T, allowed, k)

    def _params(self, allowed: Ids | None) -> Any:
        faiss = _faiss()
        sel = None
        if allowed is not None:
            sel = faiss.IDSelectorBatch(allowed)
        elif self._tombstones:
            sel = faiss.IDSelectorNot(
                faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64))
            )
        self._selector_refs = sel  # the C++ params hold a raw pointer: keep it alive
        if self.config.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=self.config.hnsw_ef_search, sel=sel)
        if self.is_ivf:
            return faiss.SearchParametersIVF(nprobe=self.config.ivf_nprobe, sel=sel)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    # --- persistence --------------------------------------------------------------------
    def to_bytes(self) -> tuple[dict[str, Any], bytes]:
        state = {"tombstones": sorted(self._tombstones), "trained_on": self.trained_on}
        return state, _faiss().serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(
        cls, dim: int, config: IndexConfig, state: dict[str, Any], data: bytes
    ) -> FaissIndex:
        index = _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.d != dim:
            raise IndexFileError(f"index has dimension {index.d}, expected {dim}")
        return cls(
            dim,
            config,
            index=index,
            tombstones=np.asarray(state["tombstones"], np.int64),
            trained_on=int(state["trained_on"]),
        )


def _checksum(header: dict[str, Any], payload: bytes) -> str:
    """BLAKE2b of the header (without its checksum) and the FAISS bytes: editing either, the
    generation or `max_seq` included, makes the file untrusted (and the index rebuilt)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
    digest.update(payload)
    return digest.hexdigest()


def save_index(path: Path, index: FaissIndex, generation: int, max_seq: int) -> None:
    """One self-checking file: MAGIC, header length, JSON header, FAISS bytes."""
    state, payload = index.to_bytes()
    header = {
        "format": FORMAT_VERSION,
        "dim": index.dim,
        "config": index.config.to_dict(),
        "generation": generation,
        "max_seq": max_seq,
        "state": state,
    }
    header["blake2b"] = _checksum(header, payload)
    head = json.dumps(header).encode("utf-8")
    atomic_write(path, MAGIC + struct.pack("<Q", len(head)) + head + payload)


def load_index(path: Path, dim: int, config: IndexConfig) -> tuple[FaissIndex, int, int]:
    """Returns (index, generation, max_seq); raises IndexFileError if it cannot be trusted."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise IndexFileError(f"cannot read {path}: {e}") from e
    if len(raw) < len(MAGIC) + 8 or not raw.startswith(MAGIC):
        raise IndexFileError(f"{path} is not an mmrag index file")
    (n,) = struct.unpack("<Q", raw[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    try:
        header = json.loads(raw[start : start + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"{path}: damaged header") from e
    if not isinstance(header, dict):
        raise IndexFileError(f"{path}: damaged header")
    payload = raw[start + n :]
    if header.get("format") != FORMAT_VERSION or header.get("dim") != dim:
        raise IndexFileError(f"{path}: other format or dimension")
    if header.get("config") != config.to_dict():
        raise IndexFileError(f"{path}: built with another index configuration")
    expected = header.pop("blake2b", None)
    if _checksum(header, payload) != expected:
        raise IndexFileError(f"{path}: checksum mismatch (damaged)")
    try:
        index = FaissIndex.from_bytes(dim, config, header["state"], payload)
    except (RuntimeError, KeyError) as e:
        raise IndexFileError(f"{path}: cannot deserialise: {e}") from e
    return index, int(header["generation"]), int(header["max_seq"])
