"""`check_memory`: verify a memory folder end to end (an fsck) and, when asked, repair it.

What is checked, cheapest first: the manifest; SQLite's own integrity check; every stored
document's JSON (NaN or Infinity written before they were refused break every metadata
filter); the kept document count against the rows and the manifest's count; every image blob
present and, unless told not to, hashing to its name; blob files no document references; and
the vector index against the store: the same ids, and a sample of vectors equal to the stored
ones.

With `repair`, the memory is opened as its writer and what can be fixed from the source of
truth (the SQLite store) is: the counts are recounted, unreadable JSON is rewritten with the
non-finite numbers as null, a corrupt blob is removed, the documents whose image is gone are
marked (`MISSING_IMAGES_KEY` in their metadata lists the hashes) and named, orphan blobs are
collected, and the index is rebuilt. A damaged SQLite file cannot be repaired here: restore it
or ingest the sources into a new memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from mmrag.memory.index import IndexFileError, load_index
from mmrag.memory.memory import INDEX, Memory, MemoryFolderError, read_manifest

log = logging.getLogger(__name__)

MISSING_IMAGES_KEY = "mmrag_missing_images"
SHOWN_IDS = 10  # ids named per finding in the text report (all are in the JSON)
HASH_CHUNK = 1 << 20


@dataclasses.dataclass
class Finding:
    """One problem: which check found it, what it is, the documents it touches, and whether
    `repair` fixed it."""

    check: str
    key: str  # what kind of problem, within its check
    message: str
    ids: list[str] = dataclasses.field(default_factory=list)
    repairable: bool = True
    repaired: bool = False

    def line(self) -> str:
        state = (
            "repaired" if self.repaired else "repairable" if self.repairable else "NOT repairable"
        )
        shown = ", ".join(self.ids[:SHOWN_IDS])
        more = f" (+{len(self.ids) - SHOWN_IDS} more)" if len(self.ids) > SHOWN_IDS else ""
        docs = f" [documents: {shown}{more}]" if self.ids else ""
        return f"{self.check}: {self.message}{docs} ({state})"


@dataclasses.dataclass
class CheckReport:
    """What was checked (counts) and what was found."""

    path: str
    checked: dict[str, Any]
    findings: list[Finding]
    repair: bool

    @property
    def ok(self) -> bool:
        """True when nothing is wrong any more (found problems all repaired)."""
        return all(f.repaired for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "repair": self.repair,
            "checked": self.checked,
            "findings": [dataclasses.asdict(f) for f in self.findings],
        }


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _finite(value: Any) -> Any:
    """`value` with NaN and +-Infinity replaced by None, at any depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class _Checker:
    """One pass over an open memory; `repair` needs it open as the writer."""

    def __init__(self, memory: Memory, hashes: bool, sample: int, repair: bool) -> None:
        self.memory, self.hashes, self.sample, self.repair = memory, hashes, sample, repair
        self.findings: list[Finding] = []
        self.checked: dict[str, Any] = {}

    def found(self, check: str, key: str, message: str, **kwargs: Any) -> None:
        self.findings.append(Finding(check, key, message, **kwargs))

    def run(self) -> None:
        if self.database():
            self.documents_json()
            self.counts()
            self.blobs()
            self.index()

    def database(self) -> bool:
        problems = self.memory.store.integrity()
        self.checked["database"] = "ok" if not problems else "damaged"
        if problems:
            self.found(
                "database",
                "integrity",
                f"SQLite integrity check failed: {'; '.join(problems[:3])}; restore the file "
                "from a backup or ingest the sources into a new memory",
                repairable=False,
            )
        return not problems

    def documents_json(self) -> None:
        bad = self.memory.store.unreadable_json()
        self.checked["unreadable_json"] = len(bad)
        if not bad:
            return
        self.found(
            "documents",
            "json",
            f"{len(bad)} documents hold JSON SQLite cannot read (NaN or Infinity): every "
            "metadata-filtered search fails while they are stored",
            ids=[b[0] for b in bad],
        )
        if self.repair:
            fixed = {id_: _finite(json.loads(metadata)) for id_, _, metadata in bad}
            self.memory.update_metadata(fixed)

    def counts(self) -> None:
        store = self.memory.store
        kept, rows = store.count(), store.counted()
        manifest = self.memory.manifest.count
        self.checked.update(documents=rows, kept_count=kept, manifest_count=manifest)
        if kept != rows:
            self.found("count", "kept", f"the kept count says {kept}, the store holds {rows}")
            if self.repair:
                store.recount()
        if manifest != rows:
            self.found("count", "manifest", f"the manifest counts {manifest}, the store {rows}")
            if self.repair:
                self.memory.checkpoint()

    def blobs(self) -> None:
        memory = self.memory
        referenced = memory.store.referenced_blobs()
        files = dict(memory.blobs.iter_names())
        missing = referenced - set(files)
        orphans = set(files) - referenced
        corrupt = set()
        if self.hashes:
            corrupt = {
                sha for sha, path in files.items() if sha in referenced and _sha256_of(path) != sha
            }
        self.checked.update(
            blobs=len(files),
            referenced_blobs=len(referenced),
            hashed=len(files) if self.hashes else 0,
        )
        if orphans:
            self.found("blobs", "orphans", f"{len(orphans)} image files no document references")
            if self.repair:
                memory.blobs.collect(referenced)
        users = self._unmarked(memory.store.blob_users(missing | corrupt))
        missing, corrupt = missing & set(users), corrupt & set(users)
        gone = missing | corrupt
        if not gone:
            return
        ids = sorted({i for sha in gone for i in users.get(sha, [])})
        what = []
        if missing:
            what.append(f"{len(missing)} stored images are missing")
        if corrupt:
            what.append(f"{len(corrupt)} do not hash to their name (corrupt)")
        self.found(
            "blobs",
            "images",
            f"{' and '.join(what)}: their documents keep their vectors and texts, not their "
            "images; repair marks them (metadata "
            f"'{MISSING_IMAGES_KEY}'); re-ingest their sources or delete them",
            ids=ids,
        )
        if self.repair:
            for sha in corrupt:
                memory.blobs.remove(sha)
            self._mark(users)

    def _unmarked(self, users: dict[str, list[str]]) -> dict[str, list[str]]:
        """The blobs (and their documents) not yet marked as gone by an earlier repair."""
        out = {}
        for sha, ids in users.items():
            docs = [d for d in self.memory.get(ids) if d is not None]
            unmarked = [d.id for d in docs if sha not in (d.metadata.get(MISSING_IMAGES_KEY) or [])]
            if unmarked:
                out[sha] = unmarked
        return out

    def _mark(self, users: dict[str, list[str]]) -> None:
        shas_of: dict[str, list[str]] = {}
        for sha, ids in users.items():
            for id_ in ids:
                shas_of.setdefault(id_, []).append(sha)
        docs = self.memory.get(sorted(shas_of))
        updates = {
            doc.id: {**doc.metadata, MISSING_IMAGES_KEY: sorted(shas_of[doc.id])}
            for doc in docs
            if doc is not None
        }
        self.memory.update_metadata(updates)

    def index(self) -> None:
        memory = self.memory
        path = memory.root / INDEX
        problems: list[str] = []
        if path.exists():
            try:
                _, generation, _ = load_index(path, memory.manifest.dim, memory.manifest.index)
            except IndexFileError as e:
                problems.append(f"the index file cannot be trusted ({e})")
            else:
                if generation > memory.store.generation():
                    problems.append("the index file is newer than the store")
        index = memory.index_snapshot()  # caught up with the store (rebuilt if untrusted)
        stored = memory.store.seqs()
        held = index.ids()
        self.checked.update(index_vectors=len(held))
        if len(held) != len(stored) or not np.array_equal(held, stored):
            extra = np.setdiff1d(held, stored).size
            lacking = np.setdiff1d(stored, held).size
            problems.append(
                f"the index holds {len(held)} vectors for {len(stored)} documents "
                f"({extra} unknown to the store, {lacking} documents without one)"
            )
        rng = np.random.default_rng(0)
        sample = (
            rng.choice(stored, min(self.sample, len(stored)), replace=False)
            if len(stored)
            else stored
        )
        held_set = set(held.tolist())
        common = [int(s) for s in sample if int(s) in held_set]
        if common:
            wrong = int(
                sum(
                    not np.allclose(index.vector(s), v, atol=1e-6)
                    for s, v in zip(common, memory.vectors(common), strict=True)
                )
            )
            self.checked["index_vectors_compared"] = len(common)
            if wrong:
                problems.append(f"{wrong} of {len(common)} sampled vectors differ from the store's")
        if not problems:
            return
        self.found("index", "index", "; ".join(problems))
        if self.repair:
            memory.rebuild_index()


def _check(root: Path, hashes: bool, sample: int, repair: bool = False) -> _Checker:
    """One pass: read-only, or repairing as the writer."""
    memory = Memory.open(root, "a" if repair else "r")
    try:
        checker = _Checker(memory, hashes, sample, repair)
        checker.run()
    finally:
        memory.close()
    return checker


def check_memory(
    path: str | Path, repair: bool = False, hashes: bool = True, sample: int = 256
) -> CheckReport:
    """Check the memory at `path` (read-only), and with `repair` fix what can be fixed (as
    its writer: fails if another process is writing), then check again: the report lists
    what the first pass found, each marked repaired when the last pass no longer finds it.
    `hashes=False` skips hashing every blob; `sample` vectors are compared between the
    index and the store."""
    root = Path(path)
    manifest = read_manifest(root)
    if manifest.backend != "embedded":
        raise MemoryFolderError(
            f"{root}: `mmrag check` covers embedded memories; a {manifest.backend} memory's "
            "documents live in its own database"
        )
    first = _check(root, hashes, sample)
    if repair and first.findings:
        _check(root, hashes, sample, repair=True)  # the writer also collects orphans, recounts
        left = {(f.check, f.key) for f in _check(root, hashes, sample).findings}
        for finding in first.findings:
            finding.repaired = finding.repairable and (finding.check, finding.key) not in left
    report = CheckReport(str(root), first.checked, first.findings, repair)
    for finding in report.findings:
        log.info("%s", finding.line())
    return report
