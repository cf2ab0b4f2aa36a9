"""Ray ingest: read, decode and encode as a Ray Data pipeline; write from this process alone.

    sources ──read tasks──▶ rows ──decode tasks──▶ pixels ──encoder actors──▶ vectors ──▶ driver
    (one per source;        (new ids    (Pillow, bomb-      (batches, one       (Memory.add_encoded,
     skip stored ids)        only)       checked)            model each)          one writer)

The driver takes a snapshot of the ids the memory already holds (16 bytes each, shared
zero-copy with every read task through the object store), so a re-run after a killed ingest
skips what was committed before anything is decoded or encoded, as the single-process
`ingest` does. Only the driver writes, batch by batch, through the same `Memory.add_encoded`
(ids are content hashes; a document that two sources both hold is stored once), so nothing
is duplicated or lost. Rows are Arrow tables of plain columns: no pickled documents.

Sizing (FINDINGS: on 2 cores two encoder actors that each reserved a whole core starved the
read stage, and the job stalled): actors reserve the free CPUs minus `read_cpus`, shared
between them, and torch in each actor uses that many threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from tqdm.auto import tqdm

from mmrag.config import Config, ConfigError
from mmrag.documents import Document, DocumentError, Part, decode_image
from mmrag.memory.ingest import DocumentLimits, IngestError, IngestReport, describe_error
from mmrag.memory.memory import Memory

log = logging.getLogger(__name__)

INSTALL_HINT = "--ray needs Ray Data: pip install 'mmrag[scale]'"
ROWS_PER_BLOCK = 256  # documents per block out of a read task
KINDS = ("doc", "known", "error", "tally")  # what a row carries


@dataclasses.dataclass(frozen=True)
class RayIngestConfig(Config):
    """The Ray pipeline's shape. None means: work it out from the cluster's free CPUs."""

    preset_prefix: ClassVar[str] = "ray-ingest"

    address: str | None = None  # a Ray cluster to join; None: this one, or a new local one
    workers: int | None = None  # encoder actors; None: free CPUs - read_cpus, at least 1
    batch_size: int = 64  # documents per encoder call
    read_cpus: float = 0.5  # CPUs left to the read and decode tasks
    actor_cpus: float | None = None  # CPUs each actor reserves; None: the rest, shared
    # What one document may hold (over a limit: that document's error).
    limits: DocumentLimits = dataclasses.field(default_factory=DocumentLimits)
    object_store_mb: int | None = None  # a new local instance's object store; None: Ray's

    def validate(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError("RayIngestConfig: workers must be >= 1")
        if self.batch_size < 1 or self.read_cpus <= 0:
            raise ConfigError("RayIngestConfig: batch_size >= 1, read_cpus > 0")
        if self.actor_cpus is not None and self.actor_cpus <= 0:
            raise ConfigError("RayIngestConfig: actor_cpus must be > 0")


def _ray() -> Any:
    try:
        import ray
        import ray.data  # the Data library is an extra of ray: fail here, not mid-run
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return ray


# --- rows ------------------------------------------------------------------------------------


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("kind", pa.string()),
            ("id", pa.string()),
            ("source", pa.string()),
            ("kinds", pa.list_(pa.string())),  # per part: "text" or "image"
            ("texts", pa.list_(pa.string())),  # per part: the text, "" for an image
            ("images", pa.list_(pa.binary())),  # the image parts' encoded bytes, in order
            ("paths", pa.list_(pa.string())),  # the image parts' files ("" if none), for errors
            ("metadata", pa.string()),  # JSON
            ("error", pa.string()),
            ("read", pa.int64()),  # tally rows: records read by one task
            ("known", pa.int64()),  # tally rows: of which already stored
            ("pixels", pa.list_(pa.binary())),  # after decoding: RGB bytes per image
            ("shapes", pa.list_(pa.list_(pa.int64()))),  # (height, width) per image
            ("vector", pa.binary()),  # after encoding: float32 bytes
        ]
    )


def _table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=_schema())


def _doc_row(doc: Document) -> dict[str, Any]:
    return {
        "kind": "doc",
        "id": doc.id,
        "source": doc.source or "",
        "kinds": [p.kind for p in doc.parts],
        "texts": [p.text or "" for p in doc.parts],
        "images": [p.image_bytes() for p in doc.images],
        "paths": [p.path or "" for p in doc.images],
        "metadata": json.dumps(dict(doc.metadata), ensure_ascii=False),
    }


def _document(row: dict[str, Any]) -> Document:
    images = iter(row["images"])
    parts = [
        Part.of_text(text) if kind == "text" else Part.of_image(data=next(images))
        for kind, text in zip(row["kinds"], row["texts"], strict=True)
    ]
    return Document(tuple(parts), json.loads(row["metadata"]), source=row["source"] or None)


def _error_row(
    err: DocumentError, doc_source: str | None, fallback: str | None = None
) -> dict[str, Any]:
    where, reason = describe_error(err, doc_source, fallback)
    return {"kind": "error", "source": where, "error": reason}


def id_snapshot(ids: Iterable[str]) -> NDArray[np.bytes_]:
    """Sorted 16-byte ids (the 128-bit hex ids as bytes): exact membership at 16 bytes each."""
    raw = np.fromiter((bytes.fromhex(i) for i in ids), dtype="S16")
    raw.sort()
    return raw


def _stored(snapshot: NDArray[np.bytes_], ids: Sequence[str]) -> NDArray[np.bool_]:
    probe = np.asarray([bytes.fromhex(i) for i in ids], dtype="S16")
    at = np.minimum(np.searchsorted(snapshot, probe), max(len(snapshot) - 1, 0))
    return snapshot[at] == probe if len(snapshot) else np.zeros(len(ids), bool)


# --- the stages ------------------------------------------------------------------------------


def read_task(
    source: str,
    options: dict[str, str],
    snapshot_ref: Any,
    update_metadata: bool,
    limits_json: str = "{}",
) -> Iterator[Any]:
    """One source's documents as blocks of new-document and error rows, then a tally row.
    Known documents are dropped here (sent as metadata-only rows with `update_metadata`)."""
    from mmrag.data.readers import read_source

    snapshot = _ray().get(snapshot_ref)
    limits = DocumentLimits.from_json(limits_json)
    is_table = source.lower().endswith((".csv", ".parquet"))
    read = known = 0
    seen: set[str] = set()
    pending: list[Document | dict[str, Any]] = []

    def flush() -> tuple[Any, int]:
        ids = [d.id for d in pending if isinstance(d, Document)]
        stored = {i for i, hit in zip(ids, _stored(snapshot, ids), strict=True) if hit}
        rows = []
        for item in pending:
            if isinstance(item, dict):
                rows.append(item)
            elif item.id not in stored:
                rows.append(_doc_row(item))
            elif update_metadata:
                metadata = json.dumps(dict(item.metadata), ensure_ascii=False)
                rows.append({"kind": "known", "id": item.id, "metadata": metadata})
        pending.clear()
        return _table(rows), len(stored)

    for item in read_source(source, **(options if is_table else {})):
        read += 1
        if isinstance(item, Document):
            try:
                limits.check(item)
            except DocumentError as e:
                item = e.located(item.source, None)
        if isinstance(item, DocumentError):
            pending.append(_error_row(item, None, str(source)))
        elif item.id in seen:
            known += 1  # repeated in this source: as the single-process reader counts it
        else:
            seen.add(item.id)
            pending.append(item)
        if len(pending) >= ROWS_PER_BLOCK:
            block, hits = flush()
            known += hits
            yield block
    block, hits = flush()
    yield block
    yield _table([{"kind": "tally", "source": source, "read": read, "known": known + hits}])


def decode_batch(batch: Any, max_pixels: int) -> Any:
    """Decode every image of the document rows to RGB pixels; an undecodable document becomes
    an error row."""
    rows = batch.to_pylist()
    for row in rows:
        if row["kind"] != "doc":
            continue
        try:
            images = [
                decode_image(data, source=path or row["source"] or None, max_pixels=max_pixels)
                for data, path in zip(row["images"], row["paths"], strict=True)
            ]
        except DocumentError as e:
            row.update(_error_row(e, row["source"]), images=[], paths=[], kinds=[], texts=[])
            continue
        row["pixels"] = [image.tobytes() for image in images]
        row["shapes"] = [[image.height, image.width] for image in images]
    return _table(rows)


class EncoderActor:
    """Holds one encoder (checked against the memory's fingerprint) and encodes batches."""

    def __init__(self, spec_json: str, fingerprint: str, threads: int) -> None:
        from mmrag.encoders.base import EncoderSpec, load_encoder

        self.encoder = load_encoder(EncoderSpec.from_json(spec_json))
        if "torch" in sys.modules:  # a torch encoder: as many threads as CPUs reserved
            sys.modules["torch"].set_num_threads(threads)
        if self.encoder.fingerprint() != fingerprint:
            raise RuntimeError("the worker's encoder differs from the memory's (fingerprint)")

    def __call__(self, batch: Any) -> Any:
        from mmrag.encoders.mixed import encode_isolated

        rows = batch.to_pylist()
        docs = [r for r in rows if r["kind"] == "doc"]
        if docs:
            images = [
                [
                    Image.frombytes("RGB", (w, h), data)
                    for data, (h, w) in zip(r["pixels"], r["shapes"], strict=True)
                ]
                for r in docs
            ]
            vectors, errors = encode_isolated(self.encoder, [_document(r) for r in docs], images)
            for row, vector, error in zip(docs, vectors, errors, strict=True):
                if error is None:
                    row["vector"] = np.asarray(vector, np.float32).tobytes()
                else:  # this document alone: an error row, the others are stored
                    refused = DocumentError(f"the encoder refused it: {error}")
                    row.update(_error_row(refused, row["source"]), images=[], paths=[])
        for row in rows:
            row["pixels"], row["shapes"] = None, None  # the driver needs only the vector
        return _table(rows)


# --- the driver ------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_session(config: RayIngestConfig) -> Iterator[Any]:
    """Use the Ray instance this process already joined, else join `address` or start a
    local one (shut down afterwards)."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if config.address is None and config.object_store_mb is not None:
        options["object_store_memory"] = config.object_store_mb * 1024 * 1024
    ray.init(address=config.address, **options)
    try:
        yield ray
    finally:
        ray.shutdown()


def sources_datasource(
    sources: Sequence[str],
    options: dict[str, str],
    snapshot_ref: Any,
    update_metadata: bool,
    limits: DocumentLimits | None = None,
) -> Any:
    """A Ray Data source with one read task per source (file, folder or shard)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    limits_json = (limits or DocumentLimits()).to_json()

    class Sources(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self,
            parallelism: int,
            per_task_row_limit: int | None = None,
            data_context: Any = None,
        ) -> list[ReadTask]:
            return [
                ReadTask(
                    functools.partial(
                        read_task, s, options, snapshot_ref, update_metadata, limits_json
                    ),
                    BlockMetadata(
                        num_rows=None, size_bytes=None, exec_stats=None, input_files=(s,)
                    ),
                )
                for s in sources
            ]

    return Sources()


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data options for this run, restored afterwards: results in source order (so when
    two sources hold the same document, the first one's metadata is kept, as in `ingest`),
    and no progress bars of its own."""
    from ray.data import DataContext

    context = DataContext.get_current()
    before = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order, context.enable_progress_bars = True, False
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = before


def plan(free_cpus: float, config: RayIngestConfig) -> tuple[int, float, int]:
    """(actors, CPUs per actor, torch threads per actor) for a cluster with `free_cpus`."""
    spare = max(free_cpus - config.read_cpus, 0.5)
    workers = config.workers or max(1, int(spare))
    cpus = config.actor_cpus or spare / workers
    return workers, cpus, max(1, int(cpus))


def build_dataset(
    ray: Any,
    memory: Memory,
    sources: Sequence[str],
    config: RayIngestConfig,
    update_metadata: bool,
    table_options: dict[str, str],
) -> Any:
    from ray.data import ActorPoolStrategy

    snapshot_ref = ray.put(id_snapshot(memory.ids()))
    workers, cpus, threads = plan(ray.available_resources().get("CPU", 1.0), config)
    log.info("ray ingest: %d encoder actors x %.2f CPUs (%d threads)", workers, cpus, threads)

    share = config.read_cpus / 2
    return (
        ray.data.read_datasource(
            sources_datasource(
                sources, table_options, snapshot_ref, update_metadata, config.limits
            ),
            num_cpus=share,
        )
        .map_batches(
            decode_batch,
            fn_kwargs={"max_pixels": config.limits.max_pixels},
            batch_format="pyarrow",
            batch_size=config.batch_size,
            num_cpus=share,
        )
        .map_batches(
            EncoderActor,
            fn_constructor_kwargs={
                "spec_json": memory.manifest.encoder.to_json(),
                "fingerprint": memory.manifest.fingerprint,
                "threads": threads,
            },
            batch_format="pyarrow",
            batch_size=config.batch_size,
            compute=ActorPoolStrategy(size=workers),
            num_cpus=cpus,
        )
    )


def ray_ingest(
    memory: Memory,
    sources: Sequence[str | Path],
    config: RayIngestConfig | None = None,
    progress: bool = True,
    update_metadata: bool = False,
    table_options: dict[str, str] | None = None,
) -> IngestReport:
    """`ingest` with reading, decoding and encoding on Ray; same result, same report."""
    config = config or RayIngestConfig()
    memory._require_writer()
    report = IngestReport()
    start = time.perf_counter()
    with ray_session(config) as ray, _data_context():
        dataset = build_dataset(
            ray, memory, [str(s) for s in sources], config, update_metadata, table_options or {}
        )
        updated: set[str] = set()  # the first source holding a stored id sets its metadata
        with tqdm(desc="ingest (ray)", unit="doc", disable=not progress) as bar:
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    bar.update(_write(memory, batch.to_pylist(), report, updated))
            finally:
                memory.checkpoint()
    report.seconds = time.perf_counter() - start
    log.info(
        "ray ingest: %d read, %d added, %d already present, %d errors in %.1fs",
        report.read,
        report.added,
        report.existing,
        len(report.errors),
        report.seconds,
    )
    return report


def _write(
    memory: Memory, rows: list[dict[str, Any]], report: IngestReport, updated: set[str]
) -> int:
    """Store one batch of encoded rows; returns how many documents it accounted for.
    `updated` holds the stored ids whose metadata this run already considered."""
    docs = [_document(r) for r in rows if r["kind"] == "doc"]
    vectors = [np.frombuffer(r["vector"], np.float32) for r in rows if r["kind"] == "doc"]
    if docs:
        added = memory.add_encoded(docs, np.stack(vectors))
        report.added += len(added)
        report.existing += len(docs) - len(added)  # also held by a source read meanwhile
    known: dict[str, Any] = {}
    for r in rows:
        if r["kind"] == "known" and r["id"] not in updated and r["id"] not in known:
            known[r["id"]] = json.loads(r["metadata"])
    updated.update(known)
    if known:
        stored = {s.id: s.metadata for s in memory.get(sorted(known)) if s}
        changed = {i: m for i, m in known.items() if m != stored.get(i)}
        if changed:
            report.updated += memory.update_metadata(changed)
    for r in rows:
        if r["kind"] == "error":
            report.errors.append(IngestError(r["source"], r["error"]))
            log.warning("skipped %s: %s", r["source"], r["error"])
        elif r["kind"] == "tally":
            report.read += r["read"]
            report.existing += r["known"]
    return sum(r["kind"] != "tally" for r in rows)
