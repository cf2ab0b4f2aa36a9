"""`ServerConfig`: the service's limits and access rules (the token itself is never config)."""

from __future__ import annotations

import dataclasses

from mmrag.config import Config, ConfigError
from mmrag.encoders.batching import BatchingConfig, available_cores
from mmrag.memory.ingest import DocumentLimits

MB = 1024 * 1024
HARD_MAX_K = 100  # the schema's bound; a config may only lower it
HARD_MAX_BATCH = 1000
HARD_MAX_TEXT_CHARS = 100_000


@dataclasses.dataclass(frozen=True)
class ServerConfig(Config):
    """Limits on what one request may ask for, and whether reads need the token."""

    # One uploaded image, in encoded bytes (multipart file or decoded base64).
    max_upload_bytes: int = 10 * MB
    # One request body that may carry many images (POST /documents, POST /chat).
    max_request_bytes: int = 64 * MB
    # Decoded image size; larger images (and decompression bombs) are refused unread.
    max_pixels: int = 40_000_000
    max_k: int = HARD_MAX_K
    max_batch_documents: int = 256
    max_text_chars: int = 20_000
    # Reads (search, stats, images, generation) are open to anyone who can reach the port;
    # False makes them require the bearer token too.
    open_reads: bool = True
    # Threads that run library calls (searches, reads, the decoding and writing of adds); 0:
    # two per core this process may use (`threads_to_run`). Fixed, so the memory's per-thread
    # SQLite connections stay bounded (a pool whose idle threads exit would leak one
    # connection per thread).
    worker_threads: int = 0
    # OpenMP threads one library call may use on a worker (FAISS search, torch encoders). A
    # server's parallelism comes from concurrent requests; an OpenMP team on a busy machine
    # mostly waits for its other members (docs/benchmarks.md, "Measurements behind defaults").
    openmp_threads: int = 1
    thumbnail_cache: int = 512
    # A request body whose next piece takes longer than this to arrive is answered 408.
    body_read_timeout_s: float = 30.0
    # Query and document encodings of concurrent requests run as shared batches
    # (`mmrag.encoders.batching`): at most this many texts (or images) per forward, ...
    encode_max_batch: int = 32
    # ... after waiting this long for more once one is queued (0: take what is waiting; under
    # load, batches form while the previous one runs), ...
    encode_max_wait_ms: float = 0.0
    # ... on this many encoder workers, each with `openmp_threads` threads (0: one per core
    # this process may use, at most 4).
    encode_workers: int = 0

    def validate(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_batch_documents", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServerConfig: {name} must be >= 1")
        if self.max_request_bytes < self.max_upload_bytes:
            raise ConfigError("ServerConfig: max_request_bytes must be >= max_upload_bytes")
        if not 1 <= self.max_k <= HARD_MAX_K:
            raise ConfigError(f"ServerConfig: max_k must be in [1, {HARD_MAX_K}]")
        if self.max_batch_documents > HARD_MAX_BATCH:
            raise ConfigError(f"ServerConfig: max_batch_documents must be <= {HARD_MAX_BATCH}")
        if self.max_text_chars > HARD_MAX_TEXT_CHARS:
            raise ConfigError(f"ServerConfig: max_text_chars must be <= {HARD_MAX_TEXT_CHARS}")
        if not 0 <= self.worker_threads <= 64:
            raise ConfigError("ServerConfig: worker_threads must be in [0 (auto), 64]")
        if not 1 <= self.openmp_threads <= 256:
            raise ConfigError("ServerConfig: openmp_threads must be in [1, 256]")
        if not 0.1 <= self.body_read_timeout_s <= 3600:
            raise ConfigError("ServerConfig: body_read_timeout_s must be in [0.1, 3600]")
        if self.thumbnail_cache < 0:
            raise ConfigError("ServerConfig: thumbnail_cache must be >= 0")
        self.batching()  # its own checks

    def document_limits(self) -> DocumentLimits:
        """The ingest's per-document limits, with this service's own text and image bounds
        (metadata size and depth as the ingest's): one rule for files and the API."""
        return DocumentLimits(
            max_text_chars=self.max_text_chars,
            max_image_bytes=self.max_upload_bytes,
            max_pixels=self.max_pixels,
        )

    def threads_to_run(self) -> int:
        """`worker_threads`, or for 0 two per core (at most 64). Searches are short and
        CPU-bound: threads beyond a couple per core only queue on the memory's lock and the
        GIL (docs/benchmarks.md, "Measurements behind defaults"); two per core leave one
        free while a slow add decodes its images."""
        return self.worker_threads or min(64, 2 * available_cores())

    def batching(self) -> BatchingConfig:
        """The batching encoder's settings."""
        return BatchingConfig(
            max_batch=self.encode_max_batch,
            max_wait_ms=self.encode_max_wait_ms,
            workers=self.encode_workers,
            threads=self.openmp_threads,
        )
