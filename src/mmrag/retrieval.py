"""`Retriever`: dense search over a memory with RA-CM3's retrieval strategy (section 3.2).

A query (text, image, or both) is encoded like a document; candidates are over-fetched
from the index, then filtered: excluded ids (self-exclusion in training), the relevance
cap (near copies of the query), and redundancy skipping or maximal marginal relevance.
Every result carries its id, score, parts, metadata and stored image path as evidence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from mmrag.config import RetrieverConfig
from mmrag.documents import decode_image
from mmrag.encoders.base import l2_normalize
from mmrag.encoders.mixed import encode_query
from mmrag.memory.memory import Memory, StoredDocument
from mmrag.memory.store import Filters

ImageInput = Image.Image | str | Path | bytes
MAX_REFETCH_ROUNDS = 4


@dataclasses.dataclass(frozen=True)
class SearchResult(StoredDocument):
    """One retrieved document (its parts, metadata and stored image files) and why: its
    score against the query."""

    score: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "score": round(self.score, 6),
            "text": self.text,
            "image": self.image,
            "metadata": self.metadata,
        }

    @classmethod
    def of(cls, doc: StoredDocument, score: float) -> SearchResult:
        """`doc` with its score. Built by copying doc's fields: one per result of every search,
        and the frozen dataclass constructor costs more than the rest of making a result."""
        result = object.__new__(cls)
        result.__dict__.update(doc.__dict__, score=score)
        return result


def drop_query_tokens(text: str, rate: float, rng: np.random.Generator) -> str:
    """RA-CM3's query dropout: drop each word with probability `rate` (keeping at least one)."""
    words = text.split()
    if rate <= 0 or len(words) < 2:
        return text
    keep = rng.random(len(words)) >= rate
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(w for w, k in zip(words, keep, strict=True) if k)


def load_query_image(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, bytes):
        return decode_image(image, source="<query image>")
    return decode_image(Path(image).read_bytes(), source=str(image))


def diversifies(config: RetrieverConfig) -> bool:
    """Whether choosing compares candidates with each other (MMR, redundancy skipping)."""
    return config.mmr_lambda is not None or config.redundancy_threshold is not None


def reranks(config: RetrieverConfig) -> bool:
    """Whether the top k candidates by score may not be the results (cap or diversity)."""
    return config.relevance_cap is not None or diversifies(config)


def select(
    scores: NDArray[np.float32], vectors: NDArray[np.float32], k: int, config: RetrieverConfig
) -> list[int]:
    """Positions of the chosen candidates (already ordered by score, excluded ones removed):
    relevance cap, then MMR or redundancy skipping, then the first k."""
    eligible = [
        i for i, s in enumerate(scores) if config.relevance_cap is None or s <= config.relevance_cap
    ]
    if not diversifies(config):
        return eligible[:k]
    chosen: list[int] = []
    max_sim = np.full(len(scores), -np.inf, dtype=np.float32)  # to anything chosen so far
    pool = list(eligible)
    while pool and len(chosen) < k:
        if config.mmr_lambda is not None:
            lam = config.mmr_lambda
            redundancy = np.where(np.isfinite(max_sim[pool]), max_sim[pool], 0.0)
            gains = lam * scores[pool] - (1.0 - lam) * redundancy
            pick = pool[int(np.argmax(gains))]
        else:
            pick = pool[0]
        pool.remove(pick)
        threshold = config.redundancy_threshold
        if threshold is not None and chosen and max_sim[pick] > threshold:
            continue  # too similar to a document already selected
        chosen.append(pick)
        max_sim = np.maximum(max_sim, vectors @ vectors[pick])
    return chosen


class Retriever:
    """Search a memory by text, image, or both; see `RetrieverConfig` for the strategy."""

    def __init__(self, memory: Memory, config: RetrieverConfig | None = None) -> None:
        self.memory = memory
        self.config = config or RetrieverConfig()

    def encode(
        self,
        text: str | None = None,
        image: ImageInput | Sequence[ImageInput] | None = None,
        rng: np.random.Generator | None = None,
    ) -> NDArray[np.float32]:
        """The query vector. With `rng` and `config.query_dropout`, words are dropped first."""
        if text and rng is not None and self.config.query_dropout > 0:
            text = drop_query_tokens(text, self.config.query_dropout, rng)
        if image is None:
            images: list[ImageInput] = []
        elif isinstance(image, Image.Image | str | Path | bytes):
            images = [image]
        else:
            images = list(image)
        return encode_query(self.memory.encoder, text, [load_query_image(i) for i in images])

    def search(
        self,
        text: str | None = None,
        image: ImageInput | Sequence[ImageInput] | None = None,
        k: int | None = None,
        filters: Filters | None = None,
        exclude_ids: Sequence[str] = (),
        config: RetrieverConfig | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[SearchResult]:
        """Top-k documents for a text, an image, or both (a mixed query)."""
        vector = self.encode(text, image, rng)
        return self.search_vectors(vector[None], k, filters, [exclude_ids], config)[0]

    def search_batch(
        self,
        texts: Sequence[str],
        k: int | None = None,
        filters: Filters | None = None,
        config: RetrieverConfig | None = None,
    ) -> list[list[SearchResult]]:
        """Many text queries with one encoder call and one index search."""
        vectors = l2_normalize(self.memory.encoder.encode_text(list(texts)))
        return self.search_vectors(vectors, k, filters, None, config)

    def search_vectors(
        self,
        vectors: NDArray[np.float32],
        k: int | None = None,
        filters: Filters | None = None,
        exclude_ids: Sequence[Sequence[str]] | None = None,
        config: RetrieverConfig | None = None,
    ) -> list[list[SearchResult]]:
        """Search precomputed query vectors (Q, D); `exclude_ids[q]` are never returned for q."""
        config = config or self.config
        k = k or config.k
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        excludes = [set(e) for e in exclude_ids] if exclude_ids else [set() for _ in vectors]
        # Only the cap and the diversity options choose among more than k candidates; without
        # them k (plus what exclusion may remove) is enough, and a refetch covers the rest.
        pool = k * config.candidate_factor if reranks(config) else k
        fetch = pool + max(len(e) for e in excludes)
        results: list[list[SearchResult] | None] = [None] * len(vectors)
        for _ in range(MAX_REFETCH_ROUNDS):
            pending = [q for q, r in enumerate(results) if r is None]
            hits = self.memory.search_vectors(vectors[pending], fetch, filters)
            # each document once, however many of the queries found it
            seqs = list(dict.fromkeys(seq for found in hits for seq, _ in found))
            docs = dict(zip(seqs, self.memory.get_by_seq(seqs), strict=True))
            for q, candidates in zip(pending, hits, strict=True):
                chosen = self._choose(candidates, docs, excludes[q], k, config)
                if len(chosen) >= k or len(candidates) < fetch:  # enough, or all there is
                    results[q] = chosen
            if all(r is not None for r in results):
                break
            fetch *= 4
        return [r if r is not None else [] for r in results]

    def _choose(
        self,
        candidates: list[tuple[int, float]],
        docs: Mapping[int, StoredDocument | None],
        exclude: set[str],
        k: int,
        config: RetrieverConfig,
    ) -> list[SearchResult]:
        kept = [
            SearchResult.of(doc, score)
            for seq, score in candidates
            if (doc := docs[seq]) is not None and doc.id not in exclude
        ]
        if not reranks(config):
            return kept[:k]
        scores = np.asarray([r.score for r in kept], np.float32)
        vectors = (
            self.memory.vectors([r.seq for r in kept])
            if diversifies(config)
            else np.zeros((len(kept), 0), np.float32)
        )
        return [kept[i] for i in select(scores, vectors, k, config)]
