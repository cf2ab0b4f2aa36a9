"""The vectors `bench_search.py` searches: real encoder embeddings, and a clustered mixture.

Real (10k): documents of the emoji, photos and Fashion-MNIST data sets encoded with the
benchmark's encoder; the queries are the *text* embeddings of the captions of emoji
documents held aside from the base set (a text-to-document search, as users run it).
The embeddings are cached as .npy files keyed by the encoder's fingerprint.

Synthetic (100k, 1M): a Gaussian mixture on the unit sphere. On uniform random vectors
every approximate index is meaningless (FINDINGS.md), so the points cluster around
thousands of centres; base and queries are independent draws from the same mixture, so no
query is in the base set.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from mmrag.data.datasets import build_dataset
from mmrag.data.readers import read_sources
from mmrag.documents import Document, decode_image
from mmrag.encoders.base import Encoder
from mmrag.encoders.mixed import encode_documents

log = logging.getLogger(__name__)

Vecs = NDArray[np.float32]

ENCODE_BATCH = 64
CHUNK = 1 << 16  # rows generated at a time (bounds the float32 noise temporaries)


# --- real embeddings --------------------------------------------------------------------------


def _dataset(data_root: Path, work: Path, name: str, limit: int | None) -> list[Document]:
    """The first `limit` documents of a data set: from the shared copy under `data_root` when
    it is there, else built (only `limit` of them) into the scratch folder."""
    jsonl = data_root / name / "documents.jsonl"
    if not jsonl.is_file():
        folder = work / (name if limit is None else f"{name}-{limit}")
        jsonl = folder / "documents.jsonl"
        if not jsonl.is_file():
            log.info("building data set %s (limit %s) into %s", name, limit, folder)
            build_dataset(name, folder, limit=limit, progress=False)
    return _documents(jsonl)[:limit]


def _documents(jsonl: Path) -> list[Document]:
    return [d for d in read_sources([jsonl]) if isinstance(d, Document)]


def _encode(encoder: Encoder, docs: list[Document]) -> Vecs:
    out = []
    for i in range(0, len(docs), ENCODE_BATCH):
        batch = docs[i : i + ENCODE_BATCH]
        images: list[list[Image.Image]] = [
            [decode_image(p.image_bytes()) for p in d.images] for d in batch
        ]
        out.append(encode_documents(encoder, batch, images))
        if (i // ENCODE_BATCH) % 20 == 0:
            log.info("encoded %d / %d documents", i + len(batch), len(docs))
    return np.concatenate(out).astype(np.float32)


def real_embeddings(
    encoder: Encoder,
    data_root: Path,
    work: Path,
    n_base: int,
    n_queries: int,
    with_fashion: bool = True,
) -> tuple[Vecs, Vecs, dict[str, Any]]:
    """(base (n_base, D), queries (n_queries, D), description), cached under `work`.

    `n_queries` emoji documents, evenly spaced, are held aside: their captions' text
    embeddings are the queries. The base is the other emoji documents, the photos, and as
    many Fashion-MNIST documents as it takes to reach `n_base`.
    """
    key = f"real-{encoder.fingerprint()[:24]}-{n_base}-{n_queries}-{int(with_fashion)}"
    base_path, query_path = work / f"{key}-base.npy", work / f"{key}-queries.npy"
    meta_path = work / f"{key}.json"
    if base_path.is_file() and query_path.is_file() and meta_path.is_file():
        log.info("real embeddings from cache %s", base_path)
        base = np.load(base_path, allow_pickle=False)
        queries = np.load(query_path, allow_pickle=False)
        return base, queries, json.loads(meta_path.read_text(encoding="utf-8"))

    emoji = _dataset(data_root, work, "emoji", None if with_fashion else n_base + n_queries)
    held = {i * len(emoji) // n_queries for i in range(n_queries)}
    query_docs = [d for i, d in enumerate(emoji) if i in held]
    base_docs = [d for i, d in enumerate(emoji) if i not in held]
    counts = {"emoji": len(base_docs)}
    if with_fashion:
        photos = _dataset(data_root, work, "photos", None)
        base_docs += photos
        counts["photos"] = len(photos)
        missing = n_base - len(base_docs)
        if missing > 0:
            fashion = _dataset(data_root, work, "fashion-mnist", missing)
            base_docs += fashion
            counts["fashion-mnist"] = len(fashion)
    base_docs = base_docs[:n_base]
    if len(base_docs) < n_base:
        raise SystemExit(f"only {len(base_docs)} real documents available, need {n_base}")

    log.info("encoding %d real documents and %d query captions", len(base_docs), n_queries)
    base = _encode(encoder, base_docs)
    queries = encoder.encode_text([d.text for d in query_docs]).astype(np.float32)
    meta = {
        "kind": "real",
        "base": f"{len(base_docs)} documents (image + caption, mixed-modal vectors): {counts}",
        "queries": f"text embeddings of the captions of {n_queries} emoji documents held aside "
        "from the base (evenly spaced over the emoji set)",
        "encoder_fingerprint": encoder.fingerprint(),
    }
    work.mkdir(parents=True, exist_ok=True)
    np.save(base_path, base, allow_pickle=False)
    np.save(query_path, queries, allow_pickle=False)
    meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return base, queries, meta


# --- synthetic mixture ------------------------------------------------------------------------


def _unit(x: Vecs) -> Vecs:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mixture_centres(dim: int, centres: int, seed: int) -> tuple[Vecs, Vecs]:
    """Unit centres (C, D), and each centre's spread (C,) drawn in [0.5, 1.5] x the base."""
    rng = np.random.default_rng(seed)
    mu = _unit(rng.standard_normal((centres, dim), dtype=np.float32))
    spread = rng.uniform(0.5, 1.5, size=centres).astype(np.float32)
    return mu, spread


def mixture_sample(
    mu: Vecs, spread: Vecs, n: int, noise: float, seed: int
) -> tuple[Vecs, NDArray[np.int64]]:
    """n unit vectors: a uniformly chosen centre plus isotropic Gaussian noise whose expected
    norm is `noise` x that centre's spread, normalised. Returns (vectors, centre ids)."""
    rng = np.random.default_rng(seed)
    dim = mu.shape[1]
    out = np.empty((n, dim), np.float32)
    labels = rng.integers(0, len(mu), size=n)
    sigma = noise / np.sqrt(dim)
    for start in range(0, n, CHUNK):
        lab = labels[start : start + CHUNK]
        eps = rng.standard_normal((len(lab), dim), dtype=np.float32)
        eps *= (sigma * spread[lab])[:, None]
        out[start : start + len(lab)] = _unit(mu[lab] + eps)
    return out, labels


def synthetic(
    n: int, n_queries: int, dim: int, centres: int, noise: float, seed: int
) -> tuple[Vecs, Vecs, dict[str, Any]]:
    """Base (n, D) and queries (n_queries, D): independent draws from one mixture (the same
    centres at every size, so sizes differ only in how densely the mixture is sampled)."""
    mu, spread = mixture_centres(dim, centres, seed)
    base, _ = mixture_sample(mu, spread, n, noise, seed + 1)
    queries, _ = mixture_sample(mu, spread, n_queries, noise, seed + 2)
    meta = {
        "kind": "synthetic",
        "base": f"{n} unit vectors from a Gaussian mixture: {centres} unit centres, noise "
        f"norm {noise} x a per-centre spread in [0.5, 1.5], normalised (seed {seed})",
        "queries": f"{n_queries} fresh draws from the same mixture (not in the base)",
        "centres": centres,
        "noise": noise,
        "seed": seed,
    }
    return base, queries, meta
