"""The SQLite store: the source of truth for documents, metadata, vectors and the change log.

Every write transaction bumps a `generation` counter. Rows get a monotonically increasing
`seq` (never reused), which is the id the vector index knows them by; deletions are logged
with the generation that made them. A cached index that remembers the generation and the
largest `seq` it has seen can therefore catch up with any later state exactly.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson
from numpy.typing import NDArray

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
MODALITY_KEY = "modality"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    parts TEXT NOT NULL,
    metadata TEXT NOT NULL,
    modality TEXT NOT NULL,
    vector BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS doc_blobs (
    seq INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (seq, sha256)
);
CREATE INDEX IF NOT EXISTS doc_blobs_sha ON doc_blobs (sha256);
CREATE TABLE IF NOT EXISTS deletions (seq INTEGER PRIMARY KEY, generation INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS deletions_gen ON deletions (generation);
"""

Filters = Mapping[str, Any]


class StoreError(RuntimeError):
    """The SQLite store is unusable or was asked something invalid."""


class Row(NamedTuple):
    """One stored document as the store knows it (parts are JSON, images by sha256). Reads
    of documents leave the vector out (None); `Store.vectors` reads vectors. A named tuple:
    a search builds one per result, and a tuple builds several times faster than a frozen
    dataclass."""

    seq: int
    id: str
    parts: list[dict[str, str]]
    metadata: dict[str, Any]
    modality: str
    vector: NDArray[np.float32] | None = None


@dataclass(frozen=True)
class NewRow:
    id: str
    parts: list[dict[str, str]]
    metadata: dict[str, Any]
    modality: str
    vector: NDArray[np.float32]
    blobs: tuple[str, ...]


@dataclass(frozen=True)
class Changes:
    """What happened after a given generation: rows added and seqs deleted."""

    generation: int
    added_seqs: NDArray[np.int64]
    added_vectors: NDArray[np.float32]
    deleted_seqs: NDArray[np.int64]


def _loads(text: str) -> Any:
    """orjson (several times faster on the small documents a search returns), falling back
    to the standard parser for what orjson refuses and `json` wrote: integers beyond 64 bits,
    and NaN in metadata stored before it was refused."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def filter_sql(filters: Filters | None) -> tuple[str, list[Any]]:
    """Translate filters to a WHERE clause. A list value means membership, a scalar equality;
    the key `modality` matches the document's modality (text, image, mixed)."""
    if not filters:
        return "1", []
    clauses: list[str] = []
    params: list[Any] = []
    for key, value in filters.items():
        if not KEY_PATTERN.match(key):
            raise StoreError(f"invalid filter key {key!r}: use letters, digits, '_', '-', '.'")
        values = list(value) if isinstance(value, list | tuple | set | frozenset) else [value]
        if not values:
            raise StoreError(f"filter {key!r} has an empty list of values")
        for v in values:
            if not (v is None or isinstance(v, str | int | float | bool)):
                raise StoreError(f"filter {key!r}: values must be JSON scalars, got {v!r}")
        column = "modality" if key == MODALITY_KEY else "json_extract(metadata, ?)"
        if key != MODALITY_KEY:
            params.append(f'$."{key}"')
        non_null = [v for v in values if v is not None]
        arms = []
        if non_null:
            arms.append(f"{column} IN ({','.join('?' * len(non_null))})")
            params.extend(non_null)
        if len(non_null) < len(values):
            arms.append(f"{column} IS NULL")
            if non_null and key != MODALITY_KEY:
                params.append(f'$."{key}"')
        clauses.append("(" + " OR ".join(arms) + ")")
    return " AND ".join(clauses), params


class Store:
    """SQLite (WAL) with one connection per thread; writes are serialised by the caller."""

    def __init__(self, path: Path, dim: int, readonly: bool = False) -> None:
        self.path = path
        self.dim = dim
        self.readonly = readonly
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if not readonly:
            self._connect().executescript(SCHEMA)  # idempotent; executescript commits itself
            with self.transaction() as con:
                con.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('generation', '0')",
                    (str(SCHEMA_VERSION),),
                )
                # The document count, kept by every write in its own transaction (stores
                # made before it existed count once, here): COUNT(*) reads the whole table.
                con.execute("INSERT OR IGNORE INTO meta SELECT 'count', COUNT(*) FROM documents")

    # --- connections -------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            uri = f"file:{self.path}?mode={'ro' if self.readonly else 'rwc'}"
            try:
                con = sqlite3.connect(
                    uri,
                    uri=True,
                    timeout=BUSY_TIMEOUT_S,
                    isolation_level=None,
                    check_same_thread=False,
                )
            except sqlite3.OperationalError as e:
                raise StoreError(f"cannot open {self.path}: {e}") from e
            con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if not self.readonly:
                con.execute("PRAGMA journal_mode = WAL")
                con.execute("PRAGMA synchronous = NORMAL")
            self._local.con = con
            with self._lock:
                self._connections.append(con)
        return con

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE for writes (so the generation bump is atomic), BEGIN for reads
        (a consistent snapshot under WAL)."""
        con = self._connect()
        con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for con in self._connections:
                con.close()
            self._connections.clear()
        self._local = threading.local()

    # --- reads -------------------------------------------------------------------------
    def generation(self) -> int:
        row = self._connect().execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0]) if row else 0

    def count(self, filters: Filters | None = None) -> int:
        """Documents matching `filters`; without filters the kept count (one row read)."""
        con = self._connect()
        if not filters:
            row = con.execute("SELECT value FROM meta WHERE key='count'").fetchone()
            if row is not None:
                return int(row[0])
            # A store made before the kept count, opened read-only: count the rows.
            return int(con.execute("SELECT COUNT(*) FROM documents").fetchone()[0])
        where, params = filter_sql(filters)
        return int(
            self._connect()
            .execute(f"SELECT COUNT(*) FROM documents WHERE {where}", params)
            .fetchone()[0]
        )

    def counted(self) -> int:
        """The documents counted row by row (COUNT(*) reads the whole table): `mmrag check`
        compares it with the kept count."""
        return int(self._connect().execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    def recount(self) -> int:
        """Set the kept count to the counted rows (a repair); returns the count."""
        with self.transaction() as con:
            n = int(con.execute("SELECT COUNT(*) FROM documents").fetchone()[0])
            con.execute("INSERT OR REPLACE INTO meta VALUES ('count', ?)", (str(n),))
        return n

    def integrity(self) -> list[str]:
        """SQLite's own integrity check: [] when the database file is sound."""
        rows = [r[0] for r in self._connect().execute("PRAGMA integrity_check")]
        return [] if rows == ["ok"] else rows

    def unreadable_json(self) -> list[tuple[str, str, str]]:
        """(id, parts, metadata) of documents whose stored JSON SQLite cannot read (NaN or
        Infinity written before they were refused: every metadata filter fails on them)."""
        q = (
            "SELECT id, parts, metadata FROM documents "
            "WHERE json_valid(parts) = 0 OR json_valid(metadata) = 0"
        )
        return [(r[0], r[1], r[2]) for r in self._connect().execute(q)]

    def seqs(self) -> NDArray[np.int64]:
        """Every stored seq, sorted."""
        rows = self._connect().execute("SELECT seq FROM documents ORDER BY seq")
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def blob_users(self, shas: Iterable[str]) -> dict[str, list[str]]:
        """The ids of the documents holding each image blob."""
        out: dict[str, list[str]] = {}
        con = self._connect()
        for sha in sorted(set(shas)):
            q = "SELECT d.id FROM doc_blobs b JOIN documents d USING (seq) WHERE b.sha256 = ?"
            out[sha] = [r[0] for r in con.execute(q, (sha,))]
        return out

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        con = self._connect()
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            q = f"SELECT id FROM documents WHERE id IN ({','.join('?' * len(chunk))})"
            found.update(r[0] for r in con.execute(q, chunk))
        return found

    def seqs_matching(self, filters: Filters) -> NDArray[np.int64]:
        where, params = filter_sql(filters)
        rows = self._connect().execute(f"SELECT seq FROM documents WHERE {where}", params)
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def rows_by_seq(self, seqs: Sequence[int]) -> dict[int, Row]:
        return self._rows("seq", [int(s) for s in seqs])

    def rows_by_id(self, ids: Sequence[str]) -> dict[str, Row]:
        return {row.id: row for row in self._rows("id", list(ids)).values()}

    def _rows(self, column: str, keys: list[Any]) -> dict[int, Row]:
        out: dict[int, Row] = {}
        con = self._connect()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            q = (
                "SELECT seq, id, parts, metadata, modality FROM documents "
                f"WHERE {column} IN ({','.join('?' * len(chunk))})"
            )
            for seq, id_, parts, metadata, modality in con.execute(q, chunk):
                out[seq] = Row(seq, id_, _loads(parts), _loads(metadata), modality)
        return out

    def stored_dim(self) -> int | None:
        """The dimension of the stored vectors (from one row), None when the store is empty."""
        row = self._connect().execute("SELECT length(vector) FROM documents LIMIT 1").fetchone()
        return None if row is None else int(row[0]) // 4  # float32

    def rows_after(self, seq: int, limit: int) -> list[Row]:
        """Up to `limit` rows with a seq above `seq`, in seq order (a full scan in pages)."""
        con = self._connect()
        seqs = [
            r[0]
            for r in con.execute(
                "SELECT seq FROM documents WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            )
        ]
        rows = self.rows_by_seq(seqs)
        return [rows[s] for s in seqs if s in rows]

    def self_contained(self) -> None:
        """Fold the write-ahead log into the database file and stop using one (a file about
        to be moved into place alone; callers hold the only connection)."""
        self._connect().execute("PRAGMA journal_mode = DELETE")

    def vectors(self, seqs: Sequence[int]) -> NDArray[np.float32]:
        """The stored vectors of `seqs`, in that order (KeyError for a seq not stored)."""
        keys = [int(s) for s in seqs]
        found: dict[int, bytes] = {}
        con = self._connect()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            q = f"SELECT seq, vector FROM documents WHERE seq IN ({','.join('?' * len(chunk))})"
            found.update(con.execute(q, chunk).fetchall())
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        return np.frombuffer(b"".join(found[s] for s in keys), np.float32).reshape(-1, self.dim)

    def changes_since(self, generation: int, max_seq: int) -> Changes:
        """Rows added (seq > max_seq, still present) and seqs deleted after `generation`,
        read in one snapshot."""
        with self.transaction(write=False) as con:
            now = int(con.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
            seqs: list[int] = []
            blobs: list[bytes] = []
            for seq, vector in con.execute(
                "SELECT seq, vector FROM documents WHERE seq > ? ORDER BY seq", (max_seq,)
            ):
                seqs.append(seq)
                blobs.append(vector)
            deleted = [
                r[0]
                for r in con.execute(
                    "SELECT seq FROM deletions WHERE generation > ? AND seq <= ?",
                    (generation, max_seq),
                )
            ]
        vecs = (
            np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(-1, self.dim)
            if blobs
            else np.zeros((0, self.dim), np.float32)
        )
        return Changes(now, np.asarray(seqs, np.int64), vecs, np.asarray(deleted, np.int64))

    def iter_all(
        self, batch: int = 4096
    ) -> Iterator[tuple[NDArray[np.int64], NDArray[np.float32]]]:
        """All (seqs, vectors) in seq order, in batches, for rebuilding an index."""
        last = 0
        con = self._connect()
        while True:
            rows = con.execute(
                "SELECT seq, vector FROM documents WHERE seq > ? ORDER BY seq LIMIT ?",
                (last, batch),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield (
                np.asarray([r[0] for r in rows], np.int64),
                np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(-1, self.dim),
            )

    def referenced_blobs(self) -> set[str]:
        return {r[0] for r in self._connect().execute("SELECT DISTINCT sha256 FROM doc_blobs")}

    def stats(self) -> dict[str, Any]:
        con = self._connect()
        by_modality = dict(
            con.execute("SELECT modality, COUNT(*) FROM documents GROUP BY modality")
        )
        return {
            "count": sum(by_modality.values()),
            "by_modality": by_modality,
            "images": int(
                con.execute("SELECT COUNT(DISTINCT sha256) FROM doc_blobs").fetchone()[0]
            ),
            "generation": self.generation(),
            "deleted_total": int(con.execute("SELECT COUNT(*) FROM deletions").fetchone()[0]),
        }

    # --- writes ------------------------------------------------------------------------
    def _bump(self, con: sqlite3.Connection, added: int = 0) -> int:
        """A write's bookkeeping, in its transaction: the next generation, and the kept count
        moved by the documents it added (negative: deleted)."""
        con.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        if added:
            con.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key='count'", (added,)
            )
        return int(con.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def insert(self, rows: Iterable[NewRow]) -> list[tuple[str, int]]:
        """Insert new rows in one transaction; rows whose id exists are ignored.
        Returns (id, seq) of the rows actually inserted."""
        inserted: list[tuple[str, int]] = []
        now = time.time()
        with self.transaction() as con:
            for r in rows:
                if r.vector.shape != (self.dim,):
                    raise StoreError(f"vector of shape {r.vector.shape}, expected ({self.dim},)")
                cur = con.execute(
                    "INSERT OR IGNORE INTO documents"
                    " (id, parts, metadata, modality, vector, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        r.id,
                        json.dumps(r.parts, ensure_ascii=False),
                        json.dumps(r.metadata, ensure_ascii=False),
                        r.modality,
                        np.ascontiguousarray(r.vector, dtype=np.float32).tobytes(),
                        now,
                    ),
                )
                if cur.rowcount == 1 and cur.lastrowid is not None:
                    seq = int(cur.lastrowid)
                    con.executemany(
                        "INSERT OR IGNORE INTO doc_blobs VALUES (?, ?)", [(seq, b) for b in r.blobs]
                    )
                    inserted.append((r.id, seq))
            if inserted:
                self._bump(con, len(inserted))
        return inserted

    def update_metadata(self, updates: Mapping[str, Mapping[str, Any]]) -> int:
        """Replace the metadata of existing documents (by id); vectors are unchanged."""
        with self.transaction() as con:
            n = 0
            for id_, metadata in updates.items():
                n += con.execute(
                    "UPDATE documents SET metadata = ? WHERE id = ?",
                    (json.dumps(dict(metadata), ensure_ascii=False), id_),
                ).rowcount
            if n:
                self._bump(con)
        return n

    def delete(self, ids: Sequence[str]) -> tuple[list[int], set[str]]:
        """Delete documents by id (unknown ids are ignored). Returns the seqs removed and the
        image blobs that no document references any more."""
        with self.transaction() as con:
            seqs: list[int] = []
            for start in range(0, len(ids), 500):
                chunk = list(ids[start : start + 500])
                seqs += [
                    r[0]
                    for r in con.execute(
                        f"SELECT seq FROM documents WHERE id IN ({','.join('?' * len(chunk))})",
                        chunk,
                    )
                ]
            seqs = sorted(set(seqs))  # an id given twice is deleted (and counted) once
            if not seqs:
                return [], set()
            shas = {
                r[0]
                for s in seqs
                for r in con.execute("SELECT sha256 FROM doc_blobs WHERE seq = ?", (s,))
            }
            generation = self._bump(con, -len(seqs))
            con.executemany("DELETE FROM documents WHERE seq = ?", [(s,) for s in seqs])
            con.executemany("DELETE FROM doc_blobs WHERE seq = ?", [(s,) for s in seqs])
            con.executemany(
                "INSERT OR REPLACE INTO deletions VALUES (?, ?)", [(s, generation) for s in seqs]
            )
            orphans = {
                sha
                for sha in shas
                if con.execute(
                    "SELECT 1 FROM doc_blobs WHERE sha256 = ? LIMIT 1", (sha,)
                ).fetchone()
                is None
            }
        return seqs, orphans
