"""Scale-out engines against the embedded defaults, each measured in the same run.

Ingest: a fixed emoji subset (as `bench_ingest.py` picks it) into fresh memories by the
single-process `ingest` (the baseline: one process, torch on every core, a reader thread)
and by `ray_ingest` with `--workers` encoder actors on a local Ray instance started before
the clock (the actors load their model inside the timed call: a user pays that every run).
Figure: Ray docs/s over single-process docs/s, the median of interleaved pairs.

Search: the same clustered unit vectors (`search_data.synthetic`, as `bench_search.py`)
stored as documents in an embedded memory (FAISS) and a Milvus memory (milvus-lite, the
same MilvusClient calls as a cluster), flat and HNSW (M 32, efConstruction 200, ef 128).
`Memory.search_vectors` single-query p50 / p99 on 1 thread, batched QPS on all cores,
recall@10 against the embedded flat; also one full `Retriever` query (search + documents).
Figure: milvus-lite p50 over FAISS p50. Plus the bytes per document of each memory folder.

Run: flock /tmp/mmrag-timing.lock .venv/bin/python benchmarks/bench_scale.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench_ingest import DEFAULT_DATA, ensure_data, write_subset
from bench_search import batched, recall_at_k, single_latency
from machine import RESULTS, WORK, QuietMeter, machine_info, write_json
from mmrag.config import IndexConfig, RetrieverConfig
from mmrag.data.readers import read_sources
from mmrag.documents import Document
from mmrag.encoders.base import Encoder, EncoderSpec, load_encoder
from mmrag.encoders.hashing import HashingEncoder
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory, ensure_memory
from mmrag.memory.milvus import MilvusMemory
from mmrag.memory.ray_ingest import RayIngestConfig, ray_ingest
from mmrag.retrieval import Retriever
from search_data import synthetic

QUICK: dict[str, Any] = {
    "n_docs": 24,
    "batch_size": 8,
    "encoder": "hashing",
    "workers": 2,
    "repeats": 1,
    "search_n": 600,
    "n_queries": 10,
    "single_queries": 10,
    "centres": 16,
}
FULL: dict[str, Any] = {
    "n_docs": 480,
    "batch_size": 32,
    "encoder": "lite",
    "workers": 2,
    "repeats": 3,
    "search_n": 100_000,
    "n_queries": 200,
    "single_queries": 200,
    "centres": 4096,
}
DIM = 256  # the lite encoder's
NOISE = 0.75
INSERT_BATCH = 2000
SINGLE_BUDGET_S = 20.0
INDEX_WAIT_S = 900.0  # milvus-lite builds its indexes in the background


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_scale.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help=f"seconds-long smoke run ({QUICK})")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="emoji data set folder")
    p.add_argument("--n-docs", type=int, help=f"documents ingested ({FULL['n_docs']})")
    p.add_argument("--batch-size", type=int, help=f"encoder batch ({FULL['batch_size']})")
    p.add_argument("--encoder", help=f"registry name of the encoder ({FULL['encoder']})")
    p.add_argument("--workers", type=int, help=f"Ray encoder actors ({FULL['workers']})")
    p.add_argument("--repeats", type=int, help=f"interleaved ingest pairs ({FULL['repeats']})")
    p.add_argument("--search-n", type=int, help=f"vectors searched ({FULL['search_n']})")
    p.add_argument("--n-queries", type=int, help=f"batched queries ({FULL['n_queries']})")
    p.add_argument(
        "--single-queries", type=int, help=f"single-query timings ({FULL['single_queries']})"
    )
    p.add_argument("--centres", type=int, help=f"mixture centres ({FULL['centres']})")
    p.add_argument("--skip-ingest", action="store_true", help="only the search comparison")
    p.add_argument("--skip-search", action="store_true", help="only the ingest comparison")
    p.add_argument("--work", type=Path, default=WORK, help="scratch folder")
    p.add_argument("--out", type=Path, help="result JSON (default: results/scale[-quick].json)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = RESULTS / ("scale-quick.json" if args.quick else "scale.json")
    return args


def _sig(x: float, digits: int = 4) -> float:
    """Round to significant digits, so that small quick-mode ratios keep their precision."""
    return float(f"{x:.{digits}g}")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- ingest -----------------------------------------------------------------------------------


def _fresh(path: Path, encoder: Encoder, spec: EncoderSpec) -> Memory:
    if path.exists():
        shutil.rmtree(path)
    return ensure_memory(path, spec, encoder=encoder)


def _single(subset: Path, path: Path, encoder: Encoder, spec: EncoderSpec, batch: int) -> float:
    with _fresh(path, encoder, spec) as memory:
        start = time.perf_counter()
        report = ingest(memory, read_sources([subset]), batch_size=batch, progress=False)
        seconds = time.perf_counter() - start
    assert not report.errors, report.errors[:3]
    return seconds


def _ray(
    subset: Path, path: Path, encoder: Encoder, spec: EncoderSpec, config: RayIngestConfig
) -> float:
    with _fresh(path, encoder, spec) as memory:
        start = time.perf_counter()
        report = ray_ingest(memory, [subset], config, progress=False)
        seconds = time.perf_counter() - start
    assert not report.errors, report.errors[:3]
    return seconds


def bench_ingest(args: argparse.Namespace) -> dict[str, Any]:
    import os

    import ray

    spec = EncoderSpec(name=args.encoder, batch_size=args.batch_size)
    encoder = load_encoder(spec)
    jsonl = ensure_data(args.data, args.quick, args.n_docs, args.work)
    subset = write_subset(jsonl, args.n_docs, args.work / "scale-subset" / "documents.jsonl")
    cores = os.cpu_count() or 1
    # Ray starts its workers at niceness 15; on a machine shared with other jobs that would
    # handicap the Ray side against the single process (niceness 0). Same priority for both.
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray reads this exact name)
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    config = RayIngestConfig(workers=args.workers, batch_size=args.batch_size)
    try:
        if not args.quick:  # warm-up: model pages, worker imports
            warm = write_subset(
                subset, args.batch_size, args.work / "scale-warm" / "documents.jsonl"
            )
            _single(warm, args.work / "scale-warm-one", encoder, spec, args.batch_size)
            _ray(warm, args.work / "scale-warm-ray", encoder, spec, config)
        single_s, ray_s = [], []
        for _ in range(args.repeats):  # interleaved: drift in machine load hits both sides
            one, two = args.work / "scale-one", args.work / "scale-ray"
            single_s.append(_single(subset, one, encoder, spec, args.batch_size))
            ray_s.append(_ray(subset, two, encoder, spec, config))
        with Memory.open(one) as a, Memory.open(two) as b:
            same = set(a.ids()) == set(b.ids()) and len(a) == args.n_docs
    finally:
        ray.shutdown()
    paired = [s / r for s, r in zip(single_s, ray_s, strict=True)]
    n = args.n_docs
    return {
        "n_docs": n,
        "encoder": spec.name,
        "encoder_fingerprint": encoder.fingerprint(),
        "batch_size": args.batch_size,
        "same_documents": same,
        "single": {
            "what": "ingest(memory, read_sources([jsonl])): reader thread + torch on all cores",
            "seconds": [_sig(x) for x in single_s],
            "docs_per_s": round(n / statistics.median(single_s), 2),
        },
        "ray": {
            "what": f"ray_ingest with {args.workers} encoder actors on a local {cores}-CPU "
            "Ray instance (started before timing; actor start-up and model loading timed; "
            "workers at niceness 0, like the single process)",
            "workers": args.workers,
            "seconds": [_sig(x) for x in ray_s],
            "docs_per_s": round(n / statistics.median(ray_s), 2),
        },
        "ratio": {
            "estimator": "median over the repeats of single time / Ray time of each pair",
            "paired": [_sig(x) for x in paired],
            "ray_speedup": _sig(statistics.median(paired)),
        },
    }


# --- search -----------------------------------------------------------------------------------


def _memory(path: Path, backend: str, index: IndexConfig, base: np.ndarray) -> Memory:
    """A memory holding one text document per vector (created with a 256-d hashing encoder
    as a stand-in: only the vectors are searched)."""
    if path.exists():
        shutil.rmtree(path)
    memory = Memory.create(path, HashingEncoder(DIM), EncoderSpec(name="hashing"), index, backend)
    for start in range(0, len(base), INSERT_BATCH):
        docs = [Document.of(text=f"vector {i}") for i in range(start, start + INSERT_BATCH)]
        memory.add_encoded(docs[: len(base) - start], base[start : start + INSERT_BATCH])
    memory.checkpoint()
    if isinstance(memory, MilvusMemory):  # time the index, not the interim brute force
        store, deadline = memory.store, time.monotonic() + INDEX_WAIT_S
        store.client.flush(store.collection)
        while time.monotonic() < deadline:
            state = store.client.describe_index(store.collection, "vector")
            if state.get("pending_index_rows", 0) == 0 and state.get("indexed_rows") == len(base):
                break
            time.sleep(1.0)
        else:
            logging.warning("milvus-lite index still building after %.0f s", INDEX_WAIT_S)
    return memory


def _first_seq(memory: Memory, n: int) -> int:
    """Documents were added in order, so vector i has seq first + i (checked on a sample)."""
    stored = memory.get([Document.of(text="vector 0").id])[0]
    assert stored is not None
    for i in np.linspace(0, n - 1, 7).astype(int):
        doc = memory.get_by_seq([stored.seq + int(i)])[0]
        assert doc is not None and doc.text == f"vector {i}", (i, doc)
    return stored.seq


def _search(memory: Memory, first: int) -> Any:
    """`Memory.search_vectors` as bench_search's SearchFn: (scores, row numbers)."""

    def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hits = memory.search_vectors(q, 10)
        ids = np.full((len(q), 10), -1, np.int64)
        for row, found in enumerate(hits):
            ids[row, : len(found)] = [s - first for s, _ in found]
        return np.zeros(ids.shape, np.float32), ids

    return search


def _retrieve(memory: Memory) -> Any:
    """One `Retriever` query: search, then fetch the documents (what a user waits for)."""
    retriever = Retriever(memory, RetrieverConfig(k=10))

    def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        retriever.search_vectors(q)
        return np.zeros((len(q), 10), np.float32), np.zeros((len(q), 10), np.int64)

    return search


def bench_search(args: argparse.Namespace) -> dict[str, Any]:
    import os

    cores = os.cpu_count() or 1
    base, queries, data = synthetic(args.search_n, args.n_queries, DIM, args.centres, NOISE, 0)
    rows: list[dict[str, Any]] = []
    truth: np.ndarray | None = None
    for kind in ("flat", "hnsw"):
        index = IndexConfig(kind=kind)
        for backend in ("embedded", "milvus"):
            path = args.work / f"scale-search-{backend}-{kind}"
            start = time.perf_counter()
            memory = _memory(path, backend, index, base)
            build_s = time.perf_counter() - start
            try:
                search = _search(memory, _first_seq(memory, len(base)))
                single = single_latency(search, queries, args.single_queries, SINGLE_BUDGET_S)
                batch, ids = batched(search, queries, cores, SINGLE_BUDGET_S)
                full = single_latency(
                    _retrieve(memory), queries, args.single_queries, SINGLE_BUDGET_S
                )
            finally:
                memory.close()
            if truth is None:
                truth = ids
            rows.append(
                {
                    "backend": backend,
                    "index": kind,
                    "engine": "faiss" if backend == "embedded" else "milvus-lite",
                    "build_s": round(build_s, 2),
                    "single": single,
                    "batched": batch,
                    "retriever_single": full,
                    "recall_at_10": recall_at_k(ids, truth),
                    "folder_bytes_per_doc": round(folder_bytes(path) / len(base), 1),
                }
            )
            logging.info("%s %s: %s", backend, kind, rows[-1]["single"])
    ratios = {}
    for kind in ("flat", "hnsw"):
        faiss, milvus = (
            next(r for r in rows if r["index"] == kind and r["backend"] == b)
            for b in ("embedded", "milvus")
        )
        ratios[kind] = {
            "milvus_over_faiss_p50": round(
                milvus["single"]["p50_ms"] / faiss["single"]["p50_ms"], 1
            ),
            "faiss_over_milvus_batched_qps": round(
                faiss["batched"]["qps"] / milvus["batched"]["qps"], 1
            ),
            "milvus_over_faiss_retriever_p50": round(
                milvus["retriever_single"]["p50_ms"] / faiss["retriever_single"]["p50_ms"], 1
            ),
        }
    return {"n": len(base), "dim": DIM, "data": data, "results": rows, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    meter = QuietMeter()
    result: dict[str, Any] = {"benchmark": "scale", "machine": machine_info()}
    result["config"] = {k: v for k, v in vars(args).items() if not isinstance(v, Path)}
    if not args.skip_ingest:
        result["ingest"] = bench_ingest(args)
    if not args.skip_search:
        result["search"] = bench_search(args)
    result["quiet"] = meter.report()
    write_json(args.out, result)
    if "ingest" in result:
        i = result["ingest"]
        print(
            f"ingest: single {i['single']['docs_per_s']} docs/s, ray x{i['ray']['workers']} "
            f"{i['ray']['docs_per_s']} docs/s (x{i['ratio']['ray_speedup']})"
        )
    if "search" in result:
        for kind, r in result["search"]["ratios"].items():
            print(f"search {kind}: milvus-lite p50 = {r['milvus_over_faiss_p50']}x FAISS")
    print(f"quiet={result['quiet']['quiet']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
