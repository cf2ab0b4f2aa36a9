"""`BatchingEncoder`: concurrent encoder calls run together, as one forward per batch.

A server answers many small queries at once; each alone runs the text tower at batch 1, where
most of a forward is fixed cost. Like Hugging Face text-embeddings-inference and Triton's
dynamic batcher, calls from any thread are queued; a worker takes what is waiting (up to
`max_batch` rows, optionally waiting `max_wait_ms` for more), runs one `encode_text` and one
`encode_image` over all of it on its own OpenMP team, and resolves each call's future. Under
no load a call runs at once, alone; under load, batches form while the previous one runs.

Rows are what the wrapped encoder gives in any batch: the `lite` text tower packs texts end to
end without padding (`bert_forward`), so a row is the same, to float rounding of a larger
matrix product, as when encoded alone (tests hold it to 1e-6). A call whose batch fails is
retried alone, so one bad input fails only its own call.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from mmrag.config import Config, ConfigError
from mmrag.encoders.base import Encoder, Vectors

log = logging.getLogger(__name__)

# Auto workers stop here: each takes a core from the HTTP side and the searches. Measured on
# 2 cores only (2 workers beat 1 and 3 there); more is a guess, so it stays small.
AUTO_MAX_WORKERS = 4


@dataclasses.dataclass(frozen=True)
class BatchingConfig(Config):
    """How concurrent encoder calls are grouped (docs/server.md, "Batching")."""

    # Most texts (and, separately, images) one forward takes.
    max_batch: int = 32
    # How long a worker waits for more calls once one is there; 0 takes what is queued.
    max_wait_ms: float = 0.0
    # Worker threads, each running whole batches on its own OpenMP team; 0: one per core
    # this process may use, at most AUTO_MAX_WORKERS (`workers_to_run`).
    workers: int = 0
    # OpenMP threads per worker's forward.
    threads: int = 1

    def validate(self) -> None:
        if not 1 <= self.max_batch <= 4096:
            raise ConfigError("BatchingConfig: max_batch must be in [1, 4096]")
        if not 0.0 <= self.max_wait_ms <= 1000.0:
            raise ConfigError("BatchingConfig: max_wait_ms must be in [0, 1000]")
        if not 0 <= self.workers <= 16:
            raise ConfigError("BatchingConfig: workers must be in [0 (auto), 16]")
        if not 1 <= self.threads <= 256:
            raise ConfigError("BatchingConfig: threads must be in [1, 256]")

    def workers_to_run(self) -> int:
        """`workers`, or for 0 one per core this process may use, at most AUTO_MAX_WORKERS.
        The lite text tower's forward holds no GIL (`bert_forward`), so two workers keep
        both cores of a 2-core server busy (docs/benchmarks.md, "Serving")."""
        if self.workers:
            return self.workers
        return max(1, min(AUTO_MAX_WORKERS, available_cores()))


def available_cores() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclasses.dataclass
class _Call:
    """One caller's inputs (all texts or all images) and the future its rows resolve."""

    kind: str  # "text" | "image"
    items: list[Any]
    future: Future[Vectors]


@dataclasses.dataclass
class BatchStats:
    """What the workers did: calls and rows encoded, forwards run, calls that failed."""

    calls: int = 0
    rows: int = 0
    batches: int = 0
    failed_calls: int = 0
    largest_batch: int = 0


_STOP = _Call("stop", [], Future())


class BatchingEncoder:
    """An `Encoder` that runs concurrent calls of many threads as shared batches.

    It has the wrapped encoder's name, dimension and fingerprint; `submit_text` /
    `submit_image` return a future (await it with `asyncio.wrap_future`), `encode_text` /
    `encode_image` wait for it. `close()` finishes what is queued and stops the workers.
    """

    def __init__(self, encoder: Encoder, config: BatchingConfig | None = None) -> None:
        self.encoder = encoder
        self.config = config or BatchingConfig()
        self.stats = BatchStats()
        self._queue: queue.Queue[_Call] = queue.Queue()
        self._stats_lock = threading.Lock()
        self._queue_lock = threading.Lock()  # no call is queued behind the stop signals
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, name=f"mmrag-encode-{i}", daemon=True)
            for i in range(self.config.workers_to_run())
        ]
        for worker in self._workers:
            worker.start()

    # --- the Encoder protocol ------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def fingerprint(self) -> str:
        return self.encoder.fingerprint()

    def encode_text(self, texts: Sequence[str]) -> Vectors:
        return self.submit_text(texts).result()

    def encode_image(self, images: Sequence[Image.Image]) -> Vectors:
        return self.submit_image(images).result()

    # --- queueing ------------------------------------------------------------------------------
    def submit_text(self, texts: Sequence[str]) -> Future[Vectors]:
        return self._submit("text", list(texts))

    def submit_image(self, images: Sequence[Image.Image]) -> Future[Vectors]:
        return self._submit("image", list(images))

    def _submit(self, kind: str, items: list[Any]) -> Future[Vectors]:
        future: Future[Vectors] = Future()
        if not items:
            future.set_result(np.zeros((0, self.dim), np.float32))
            return future
        with self._queue_lock:
            if self._closed:
                raise RuntimeError("the batching encoder is closed")
            self._queue.put(_Call(kind, items, future))
        return future

    def close(self) -> None:
        """Encode what is queued, then stop the workers (idempotent)."""
        with self._queue_lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._workers:
                self._queue.put(_STOP)
        for worker in self._workers:
            worker.join()

    # --- the workers ---------------------------------------------------------------------------
    def _work(self) -> None:
        with threadpool_limits(self.config.threads, user_api="openmp"):
            while True:
                calls, stop = self._take()
                if calls:
                    self._run(calls)
                if stop:
                    return

    def _take(self) -> tuple[list[_Call], bool]:
        """The calls of one batch: the first one waited for, then what is queued (or arrives
        within max_wait_ms) up to max_batch rows of each kind. True when told to stop."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        calls = [first]
        rows = {"text": 0, "image": 0}
        rows[first.kind] += len(first.items)
        deadline = time.monotonic() + self.config.max_wait_ms / 1000.0
        while rows["text"] < self.config.max_batch and rows["image"] < self.config.max_batch:
            try:
                wait = deadline - time.monotonic()
                call = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if call is _STOP:
                return calls, True
            calls.append(call)
            rows[call.kind] += len(call.items)
        return calls, False

    def _run(self, calls: list[_Call]) -> None:
        live = [c for c in calls if c.future.set_running_or_notify_cancel()]
        try:
            self._encode_together(live)
        except Exception:  # one input spoilt the batch: each call again, alone
            log.debug("a batch of %d calls failed; encoding them one by one", len(live))
            for call in live:
                try:
                    call.future.set_result(self._encode(call.kind, call.items))
                except Exception as e:
                    call.future.set_exception(e)
                    with self._stats_lock:
                        self.stats.failed_calls += 1
        with self._stats_lock:
            self.stats.calls += len(live)
            self.stats.rows += sum(len(c.items) for c in live)

    def _encode_together(self, calls: list[_Call]) -> None:
        results: dict[int, Vectors] = {}
        for kind in ("text", "image"):
            group = [c for c in calls if c.kind == kind]
            if not group:
                continue
            vectors = self._encode(kind, [item for c in group for item in c.items])
            start = 0
            for call in group:
                results[id(call)] = vectors[start : start + len(call.items)]
                start += len(call.items)
        for call in calls:  # only once every forward succeeded
            call.future.set_result(results[id(call)])

    def _encode(self, kind: str, items: list[Any]) -> Vectors:
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(items))
        if kind == "text":
            return self.encoder.encode_text(items)
        return self.encoder.encode_image(items)
