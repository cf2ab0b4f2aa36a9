"""`MemoryService`: the one open memory behind the server, with its single-writer discipline.

All library calls of the HTTP layer go through here. Writes (add, delete) run one at a time
under one lock, blob writes included, so a delete never removes an image that a concurrent
add has just referenced; reads run concurrently. Every encoder call (search queries,
documents, and the generation and chat capabilities, which use the memory's encoder) goes
through one `BatchingEncoder`: concurrent queries share forwards, run on the encoder's own
worker.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from PIL import Image

from mmrag.config import RetrieverConfig
from mmrag.documents import Document, DocumentError, decode_image
from mmrag.encoders.base import EncoderSpec, Vectors, load_encoder
from mmrag.encoders.batching import BatchingConfig, BatchingEncoder
from mmrag.encoders.mixed import encode_documents, query_vector
from mmrag.memory.memory import Memory, StoredDocument, ensure_memory
from mmrag.memory.store import Filters
from mmrag.retrieval import Retriever, SearchResult

log = logging.getLogger(__name__)

STATS_ATTEMPTS = 3
WARM_UP_SIDE = 32  # pixels of the blank image encoded at startup

# Stored image formats (blobs.image_extension) and how to serve them.
MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "img": "application/octet-stream",
}


async def _rows(future: Future[Vectors] | None) -> Vectors | None:
    if future is None:
        return None
    rows: Vectors = await asyncio.wrap_future(future)
    return rows


class Thumbnails:
    """A bounded LRU cache of PNG thumbnails keyed by (sha256, size)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: tuple[str, int], png: bytes) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = png
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


class MemoryService:
    """One memory, opened for writing only when writes are enabled."""

    def __init__(
        self,
        memory: Memory,
        retriever_config: RetrieverConfig | None = None,
        max_pixels: int = 40_000_000,
        thumbnail_cache: int = 512,
        batching: BatchingConfig | None = None,
    ) -> None:
        self.memory = memory
        self.encoder = BatchingEncoder(memory.encoder, batching)
        memory.use_encoder(self.encoder)
        self.retriever = Retriever(memory, retriever_config)
        self.max_pixels = max_pixels
        self._write_lock = threading.Lock()
        self._thumbnails = Thumbnails(thumbnail_cache)

    @classmethod
    def open(
        cls, path: str | Path, writable: bool, encoder: EncoderSpec | None = None, **kwargs: Any
    ) -> MemoryService:
        """Open (writers: create if missing) the memory and load its encoder now, so the
        first request does not pay for it and a broken encoder fails at startup."""
        if writable:
            memory = ensure_memory(path, encoder)
        else:
            memory = Memory.open(path, "r", load_encoder(encoder) if encoder else None)
        try:
            service = cls(memory, **kwargs)
        except BaseException:
            memory.close()
            raise
        try:
            service.warm_up()
        except BaseException:
            service.close()
            raise
        return service

    def warm_up(self) -> None:
        """Encode one text and one image through the batching encoder: encoders that load
        their models on first use (the lite towers) load them now, on the encoder's worker."""
        start = time.perf_counter()
        self.encoder.encode_text(["warm-up"])
        self.encoder.encode_image([Image.new("RGB", (WARM_UP_SIDE, WARM_UP_SIDE))])
        log.info("encoder warmed up in %.1f s", time.perf_counter() - start)

    @property
    def writable(self) -> bool:
        return self.memory.mode == "a"

    def close(self) -> None:
        with self._write_lock:
            self.memory.close()
        self.encoder.close()

    # --- reads ----------------------------------------------------------------------------
    def count(self) -> int:
        """len(memory): the count the store keeps (one row read)."""
        return len(self.memory)

    async def encode_query(self, text: str | None, image: Image.Image | None) -> Vectors:
        """The query's vector, its text and image queued on the batching encoder (awaited,
        so a waiting query holds no thread); equal to `Retriever.encode(text, image)`."""
        text_future = self.encoder.submit_text([text]) if text else None
        image_future = self.encoder.submit_image([image]) if image is not None else None
        return query_vector(await _rows(text_future), await _rows(image_future))

    def search_vector(
        self,
        vector: Vectors,
        k: int,
        filters: Filters | None = None,
        exclude_ids: Sequence[str] = (),
        config: RetrieverConfig | None = None,
    ) -> tuple[list[SearchResult], int]:
        """Top-k documents for an encoded query, and the memory's count."""
        results = self.retriever.search_vectors(
            vector[None], k, filters or None, [list(exclude_ids)], config
        )[0]
        return results, self.count()

    def get(self, doc_id: str) -> StoredDocument | None:
        return self.memory.get([doc_id])[0]

    def stats(self) -> dict[str, Any]:
        """Memory.stats() sizes every blob file; one deleted meanwhile raises. Our own deletes
        are held off by the write lock; another process's (read-only server) are retried."""
        for attempt in range(STATS_ATTEMPTS):
            try:
                if self.writable:
                    with self._write_lock:
                        return self.memory.stats()
                return self.memory.stats()
            except FileNotFoundError:
                if attempt == STATS_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def image(self, sha256: str) -> tuple[bytes, str] | None:
        """A stored image's bytes and media type. `sha256` must already be validated."""
        for ext, media_type in MEDIA_TYPES.items():
            path = self.memory.blobs.path(sha256, ext)
            try:
                return path.read_bytes(), media_type
            except FileNotFoundError:
                continue
        return None

    def thumbnail(self, sha256: str, size: int) -> bytes | None:
        """A PNG no larger than size x size, decoded within the pixel limit, cached."""
        cached = self._thumbnails.get((sha256, size))
        if cached is not None:
            return cached
        found = self.image(sha256)
        if found is None:
            return None
        try:
            img = decode_image(found[0], source=sha256, max_pixels=self.max_pixels)
        except DocumentError as e:
            log.warning("cannot thumbnail stored image %s: %s", sha256, e)
            return None
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False)
        png = buf.getvalue()
        self._thumbnails.put((sha256, size), png)
        return png

    # --- writes ---------------------------------------------------------------------------
    def add(self, docs: Sequence[Document], images: Sequence[Sequence[Image.Image]]) -> list[bool]:
        """Store the documents (images already decoded); True where a document was new."""
        known = self.memory.contains([d.id for d in docs])
        todo: dict[str, int] = {}
        for i, doc in enumerate(docs):
            if doc.id not in known and doc.id not in todo:
                todo[doc.id] = i
        added: set[str] = set()
        if todo:
            rows = list(todo.values())
            vectors = encode_documents(
                self.memory.encoder, [docs[i] for i in rows], [images[i] for i in rows]
            )
            with self._write_lock:
                added = set(self.memory.add_encoded([docs[i] for i in rows], vectors))
        return [doc.id in added and todo.get(doc.id) == i for i, doc in enumerate(docs)]

    def delete(self, doc_id: str) -> bool:
        with self._write_lock:
            return self.memory.delete([doc_id]) == 1
