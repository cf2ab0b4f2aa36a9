"""chromadb's side of `bench_retriever.py`, run by an interpreter that has chromadb (mmrag does
not depend on it): the same vectors and documents in an in-process (ephemeral) collection,
HNSW with inner product, single queries returning documents, metadata and distances, timed
on one thread. Writes p50 / p99 and the ids found (for recall) as JSON.

Run: PY benchmarks/chroma_peer.py BASE.npy QUERIES.npy --k 10 --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

import chromadb
import numpy as np

ADD_BATCH = 4096


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base")
    p.add_argument("queries")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    base, queries = np.load(args.base), np.load(args.queries)
    client = chromadb.EphemeralClient()
    collection = client.create_collection(
        "bench",
        configuration={"hnsw": {"space": "ip", "num_threads": 1}},
    )
    start = time.perf_counter()
    for i in range(0, len(base), ADD_BATCH):
        rows = range(i, min(i + ADD_BATCH, len(base)))
        collection.add(
            ids=[str(j) for j in rows],
            embeddings=base[i : i + len(rows)],
            documents=[f"benchmark document {j}" for j in rows],
            metadatas=[{"i": j, "shard": j % 7} for j in rows],
        )
    load_s = time.perf_counter() - start
    include = ["documents", "metadatas", "distances"]
    for q in queries[:5]:  # warm-up
        collection.query(query_embeddings=[q], n_results=args.k, include=include)
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = collection.query(query_embeddings=[q], n_results=args.k, include=include)
        times.append(time.perf_counter() - t0)
        found.append([int(x) for x in hits["ids"][0]])
    ms = np.asarray(times) * 1e3
    result = {
        "chromadb": chromadb.__version__,
        "index": "HNSW (hnswlib), space ip, chromadb's default M / ef",
        "load_s": round(load_s, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "n": len(ms),
        "found": found,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
