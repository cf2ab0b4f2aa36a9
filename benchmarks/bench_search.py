"""Vector search: latency, QPS and recall@10 of the library's FAISS indexes against NumPy.

For each size (10k real embeddings; 100k and 1M clustered synthetic vectors of the
encoder's dimension) it builds `NumpyIndex` (the brute-force baseline), and `FaissIndex`
flat (exact: the recall reference), HNSW (sweeping efSearch) and IVF (sweeping nprobe),
then measures single-query latency on 1 thread (p50/p99) and batched throughput on all
cores (QPS), each as a ratio against NumPy brute force in the same run. Exact search is
compared with a memory-bandwidth bound measured here; at 10k, `Memory.search_vectors`
shows the memory layer's cost over the bare index.

Run: .venv/bin/python benchmarks/bench_search.py [--quick] [--sizes 10k,100k,1m] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

import search_data
from machine import RESULTS, WORK, QuietMeter, machine_info, parse_size, with_defaults, write_json
from mmrag.config import IndexConfig
from mmrag.documents import Document
from mmrag.encoders.base import Encoder, EncoderSpec, load_encoder
from mmrag.memory.index import IVF_POINTS_PER_LIST, FaissIndex, NumpyIndex
from mmrag.memory.memory import Memory

log = logging.getLogger("bench_search")

Vecs = NDArray[np.float32]
Ids = NDArray[np.int64]
SearchFn = Callable[[Vecs], tuple[Vecs, Ids]]

K = 10
TARGET_RECALL = 0.95
GOAL_BANDWIDTH_RATIO = 1.5  # exact search within 1.5x of the memory-bandwidth bound
GOAL_HNSW_SPEEDUP = 20.0  # HNSW at recall 0.95 vs NumPy brute force, at the largest size
NUMPY_QUERY_CHUNK = 64  # NumpyIndex materialises (Q, N) scores: bound them
LARGE = 1_000_000  # from this size on, IVF uses --ivf-nlist-1m lists
FULL: dict[str, Any] = {
    "sizes": "10k,100k,1m",
    "encoder": "lite",
    "n_queries": 1000,
    "single_queries": 200,
    "single_budget_s": 8.0,
    "ef_search": "16,24,32,48,64,96,128,192,256,512",
    "nprobe": "1,2,4,8,16,32,64",
    "ivf_nlist_1m": 1024,
    "centres": 4096,
    "noise": 0.75,
    "bandwidth_mb": 2048,
}
QUICK: dict[str, Any] = {
    "sizes": "300,3000",
    "encoder": "hashing",
    "n_queries": 50,
    "single_queries": 30,
    "single_budget_s": 0.5,
    "ef_search": "16,128",
    "nprobe": "1,8",
    "ivf_nlist_1m": 1024,
    "centres": 64,
    "noise": 0.75,
    "bandwidth_mb": 64,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_search.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help=f"seconds-long smoke run: {QUICK}")
    p.add_argument(
        "--sizes",
        help="comma-separated base sizes (10k, 100k, 1m or a number); the smallest uses real "
        f"embeddings, the others synthetic ones (full: {FULL['sizes']})",
    )
    p.add_argument("--encoder", help=f"registry name of the encoder ({FULL['encoder']})")
    p.add_argument("--encoder-path", help="checkpoint folder (default: the shipped one)")
    p.add_argument("--n-queries", type=int, help=f"batched queries ({FULL['n_queries']})")
    p.add_argument(
        "--single-queries",
        type=int,
        help=f"single queries timed per index, at most ({FULL['single_queries']})",
    )
    p.add_argument(
        "--single-budget-s",
        type=float,
        help="stop single-query timing after this long (at least 20 queries) "
        f"({FULL['single_budget_s']})",
    )
    p.add_argument("--ef-search", help=f"HNSW efSearch values swept ({FULL['ef_search']})")
    p.add_argument("--nprobe", help=f"IVF nprobe values swept ({FULL['nprobe']})")
    p.add_argument(
        "--ivf-nlist-1m",
        type=int,
        help="IVF lists at sizes >= 1M; 0 keeps the library default 4*sqrt(N), whose k-means "
        f"on N points takes many minutes on 2 cores ({FULL['ivf_nlist_1m']})",
    )
    p.add_argument(
        "--hnsw-ef-construction",
        type=int,
        default=0,
        help="HNSW efConstruction; 0 keeps the library default "
        f"({IndexConfig().hnsw_ef_construction})",
    )
    p.add_argument("--centres", type=int, help=f"mixture centres ({FULL['centres']})")
    p.add_argument(
        "--noise", type=float, help=f"mixture noise norm relative to a centre ({FULL['noise']})"
    )
    p.add_argument(
        "--bandwidth-mb", type=int, help=f"read-bandwidth buffer, MiB ({FULL['bandwidth_mb']})"
    )
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    p.add_argument("--work", type=Path, default=WORK, help="cache of real embeddings, scratch")
    p.add_argument(
        "--data-root", type=Path, default=WORK.parent / "data", help="shared data sets folder"
    )
    p.add_argument(
        "--out", type=Path, help="result JSON (default: benchmarks/results/search[-quick].json)"
    )
    args = p.parse_args(argv)
    with_defaults(args, QUICK if args.quick else FULL)
    if args.out is None:
        args.out = RESULTS / ("search-quick.json" if args.quick else "search.json")
    return args


# --- machine bounds ---------------------------------------------------------------------------


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


READ_KERNELS: dict[str, Callable[[Vecs, Vecs], object]] = {  # each reads its slice once
    "np.add.reduce (flat)": lambda x, v: np.add.reduce(x.reshape(-1)),
    "np.add.reduce (axis 0)": lambda x, v: np.add.reduce(x, axis=0),
    "np.maximum.reduce": lambda x, v: np.maximum.reduce(x.reshape(-1)),
    "einsum gemv": lambda x, v: np.einsum("ij,j->i", x, v),
    "BLAS sgemv (x @ v)": lambda x, v: x @ v,
}


def _read_gbps(buf: Vecs, vec: Vecs, kernel: Callable[[Vecs, Vecs], object], threads: int) -> float:
    """Best of 4: `threads` Python threads (NumPy releases the GIL) each read a slice."""
    slices = np.array_split(buf, threads)
    with ThreadPoolExecutor(threads) as pool, threadpool_limits(limits=1):
        seconds = _best_of(lambda: list(pool.map(lambda x: kernel(x, vec), slices)), 4)
    return buf.nbytes / seconds / 1e9


GEMM_SHAPES = ((1024, 256, 8192), (2048, 2048, 2048))  # (M, K, N): search-like K = D, square


def _gemm_gflops(a: Vecs, b: Vecs) -> float:
    a @ b  # warm-up (BLAS threads start)
    return 2 * a.size * b.shape[1] / _best_of(lambda: a @ b, 5) / 1e9


def machine_bounds(mb: int, cores: int) -> dict[str, Any]:
    """Streaming read bandwidth (NumPy, a buffer far larger than the caches) and SGEMM
    throughput, on 1 thread and on all cores. The fastest kernel or shape sets each bound,
    so the bounds are as tight as NumPy can make them."""
    buf = np.ones((mb * 2**20 // (4 * 256), 256), np.float32)  # written: pages resident
    vec = np.ones(256, np.float32)
    gemms = [(np.ones((m, k), np.float32), np.ones((k, n), np.float32)) for m, k, n in GEMM_SHAPES]
    out: dict[str, Any] = {"buffer_mib": mb, "kernels_gbps": {}, "gemm_gflops": {}}
    out["sgemm_gflops"] = {}  # the fastest shape, per thread count
    for threads in sorted({1, cores}):
        gbps = {name: _read_gbps(buf, vec, k, threads) for name, k in READ_KERNELS.items()}
        with threadpool_limits(limits=threads):
            rates = {
                f"{m}x{k}x{n}": _gemm_gflops(a, b)
                for (m, k, n), (a, b) in zip(GEMM_SHAPES, gemms, strict=True)
            }
        key = f"{threads}_thread"
        out["kernels_gbps"][key] = {k: round(v, 2) for k, v in gbps.items()}
        out[f"read_gbps_{key}"] = round(max(gbps.values()), 2)
        out["gemm_gflops"][key] = {k: round(v, 1) for k, v in rates.items()}
        out["sgemm_gflops"][key] = round(max(rates.values()), 1)
    return out


# --- timing -----------------------------------------------------------------------------------


def single_latency(search: SearchFn, queries: Vecs, max_n: int, budget_s: float) -> dict[str, Any]:
    """One query per call on 1 thread: p50 / p99 / mean in ms, and QPS = 1 / mean."""
    times: list[float] = []
    with threadpool_limits(limits=1):
        for i in range(min(3, len(queries))):  # warm-up
            search(queries[i : i + 1])
        start = time.perf_counter()
        for i in range(max_n):
            j = i % len(queries)
            t0 = time.perf_counter()
            search(queries[j : j + 1])
            times.append(time.perf_counter() - t0)
            if len(times) >= 20 and time.perf_counter() - start > budget_s:
                break
    ms = np.asarray(times) * 1e3
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "qps": round(1e3 / float(ms.mean()), 1),
    }


def batched(
    search: SearchFn, queries: Vecs, cores: int, budget_s: float
) -> tuple[dict[str, Any], Ids]:
    """All queries in one call on all cores; best of up to 3 runs that fit in the budget."""
    times: list[float] = []
    with threadpool_limits(limits=cores):
        while len(times) < 3 and (not times or sum(times) + times[0] < budget_s):
            t0 = time.perf_counter()
            _, ids = search(queries)
            times.append(time.perf_counter() - t0)
    best = min(times)
    stats = {"n_queries": len(queries), "seconds": round(best, 5), "runs": len(times)}
    stats["qps"] = round(len(queries) / best, 1)
    return stats, ids


def recall_at_k(found: Ids, truth: Ids) -> float:
    """Mean fraction of each exact top-k found in the approximate top-k."""
    hits = (found[:, :, None] == truth[:, None, :]) & (truth[:, None, :] >= 0)
    return round(float(hits.any(axis=1).sum() / truth.size), 4)


def numpy_search(index: NumpyIndex) -> SearchFn:
    """NumpyIndex scores all queries at once, (Q, N) floats; chunk the queries to bound that."""

    def search(q: Vecs) -> tuple[Vecs, Ids]:
        parts = [
            index.search(q[i : i + NUMPY_QUERY_CHUNK], K)
            for i in range(0, len(q), NUMPY_QUERY_CHUNK)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return search


def faiss_search(index: FaissIndex) -> SearchFn:
    return lambda q: index.search(q, K)


def with_search_config(index: FaissIndex, config: IndexConfig) -> FaissIndex:
    """The same FAISS structure searched with other query-time parameters (efSearch,
    nprobe): what building with `config` gives, without building again."""
    return FaissIndex(index.dim, config, index=index._index, trained_on=index.trained_on)


class Runner:
    """Measures one index at one size: single-query latency, batched QPS, recall."""

    def __init__(self, queries: Vecs, args: argparse.Namespace, cores: int) -> None:
        self.queries, self.args, self.cores = queries, args, cores
        self.truth: Ids | None = None

    def measure(
        self, name: str, search: SearchFn, params: dict[str, Any], build_s: float
    ) -> dict[str, Any]:
        a = self.args
        batch, ids = batched(search, self.queries, self.cores, 4 * a.single_budget_s)
        if self.truth is None:
            self.truth = ids  # the first index measured is the exact flat one
        single = single_latency(search, self.queries, a.single_queries, a.single_budget_s)
        row = {"index": name, "params": params, "build_s": round(build_s, 3)}
        row.update(recall_at_10=recall_at_k(ids, self.truth), single=single, batched=batch)
        log.info(
            "%-6s %-26s recall %.4f  p50 %8.3f ms  p99 %8.3f ms  batched %9.1f QPS",
            name, params, row["recall_at_10"], single["p50_ms"], single["p99_ms"], batch["qps"],
        )  # fmt: skip
        return row


def _timed_build(build: Callable[[], Any], cores: int) -> tuple[Any, float]:
    with threadpool_limits(limits=cores):
        start = time.perf_counter()
        index = build()
        return index, time.perf_counter() - start


# --- one size ---------------------------------------------------------------------------------


def _sweep(
    runner: Runner, name: str, base: FaissIndex, key: str, values: list[int], build_s: float
) -> list[dict[str, Any]]:
    rows = []
    for value in values:
        config = base.config.replace(**{key: value})
        params = {key: value}
        if name == "ivf":
            params["nlist"] = int(base._index.nlist) if base.is_ivf else 0
        rows.append(
            runner.measure(name, faiss_search(with_search_config(base, config)), params, build_s)
        )
    return rows


def _smallest_meeting_target(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    meeting = [r for r in rows if r["recall_at_10"] >= TARGET_RECALL]
    return meeting[0] if meeting else None


def _add_ratios(rows: list[dict[str, Any]], numpy_row: dict[str, Any]) -> None:
    """Each row against NumPy brute force measured in the same run."""
    for r in rows:
        r["vs_numpy"] = {
            "single_p50_speedup": round(numpy_row["single"]["p50_ms"] / r["single"]["p50_ms"], 2),
            "single_p99_speedup": round(numpy_row["single"]["p99_ms"] / r["single"]["p99_ms"], 2),
            "batched_qps_ratio": round(r["batched"]["qps"] / numpy_row["batched"]["qps"], 2),
        }


def bandwidth_bound(
    n: int, dim: int, n_queries: int, bounds: dict[str, Any], rows: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Measured exact search against what streaming the vectors once must cost.

    Single query (1 thread): N*D*4 bytes at the 1-thread read bandwidth. Batch (all cores):
    the same bytes once, at the all-core bandwidth, if the kernel streams the data once for
    the whole batch; a batch also needs 2*Q*N*D flops, so its roofline bound is the larger
    of the two (compute, at the measured SGEMM rate, dominates for large Q).
    """
    cores_key = max(int(k.split("_")[0]) for k in bounds["sgemm_gflops"])
    nbytes = n * dim * 4
    single_ms = nbytes / (bounds["read_gbps_1_thread"] * 1e9) * 1e3
    batch_bw_ms = nbytes / (bounds[f"read_gbps_{cores_key}_thread"] * 1e9) * 1e3
    flops = 2.0 * n_queries * n * dim
    batch_compute_ms = flops / (bounds["sgemm_gflops"][f"{cores_key}_thread"] * 1e9) * 1e3
    roofline_ms = max(batch_bw_ms, batch_compute_ms)
    out: dict[str, Any] = {
        "vector_mib": round(nbytes / 2**20, 1),
        "single_bound_ms": round(single_ms, 4),
        "batch_bandwidth_bound_ms": round(batch_bw_ms, 4),
        "batch_compute_bound_ms": round(batch_compute_ms, 4),
        "batch_roofline_bound_ms": round(roofline_ms, 4),
    }
    for name, row in rows.items():
        batch_ms = row["batched"]["seconds"] * 1e3
        out[name] = {
            "single_p50_over_bound": round(row["single"]["p50_ms"] / single_ms, 3),
            "batch_over_bandwidth_bound": round(batch_ms / batch_bw_ms, 3),
            "batch_over_roofline_bound": round(batch_ms / roofline_ms, 3),
            "batch_effective_gbps": round(nbytes / (batch_ms / 1e3) / 1e9, 2),
            "batch_gflops": round(flops / (batch_ms / 1e3) / 1e9, 1),
        }
    return out


def direct_faiss(index: FaissIndex, ef_search: int | None, runner: Runner) -> dict[str, Any]:
    """Single-query latency of the bare FAISS object, without `FaissIndex.search`'s wrapper
    (search-parameter objects built per call, dtype copies): the wrapper's cost."""
    raw = index._index
    if ef_search is not None:
        import faiss

        graph: Any = faiss.downcast_index(raw.index)
        graph.hnsw.efSearch = ef_search
    a = runner.args
    return single_latency(
        lambda q: raw.search(q, K), runner.queries, a.single_queries, a.single_budget_s
    )


def _kmeans_work(n: int, nlist: int | None) -> int:
    """Training points x lists of `FaissIndex.build`'s k-means (its cost, up to a constant)."""
    lists = nlist or int(4 * np.sqrt(n))
    lists = max(1, min(lists, n // IVF_POINTS_PER_LIST))
    return min(n, lists * 256) * lists


def ivf_default_estimate(sizes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Where the largest size's IVF used a non-default nlist: its default build time,
    extrapolated from a smaller size built with the default (k-means work ratio)."""
    largest = max(sizes, key=lambda s: s["n"])
    if largest["index_configs"]["ivf"]["ivf_nlist"] is None:
        return None
    refs = [
        s
        for s in sizes
        if s["index_configs"]["ivf"]["ivf_nlist"] is None and s["index_configs"]["ivf"]["trained"]
    ]
    if not refs:
        return None
    ref = max(refs, key=lambda s: s["n"])
    ratio = _kmeans_work(largest["n"], None) / _kmeans_work(ref["n"], None)
    ref_s = next(r["build_s"] for r in ref["results"] if r["index"] == "ivf")
    return {
        "n": largest["n"],
        "default_nlist": max(
            1, min(int(4 * np.sqrt(largest["n"])), largest["n"] // IVF_POINTS_PER_LIST)
        ),
        "from_n": ref["n"],
        "from_build_s": ref_s,
        "kmeans_work_ratio": round(ratio, 1),
        "estimated_build_s": round(ref_s * ratio, 0),
        "note": "an extrapolation, not a measurement: build time scales with k-means training "
        "points x lists (FaissIndex.build trains on min(N, 256 x nlist) points)",
    }


SINGLE_KERNELS: dict[str, Callable[[Vecs, Vecs], object]] = {  # one query's N scores
    "q @ vecs.T (NumpyIndex's expression)": lambda vecs, q: q @ vecs.T,
    "vecs @ q[0] (sgemv)": lambda vecs, q: vecs @ q[0],
    "einsum('nd,d->n')": lambda vecs, q: np.einsum("nd,d->n", vecs, q[0]),
}


def numpy_single_kernels(base: Vecs, queries: Vecs, runner: Runner) -> dict[str, Any]:
    """Scoring alone (no top-k), one query on 1 thread, by three NumPy expressions of the
    same product: how much of NumpyIndex's latency is its choice of expression."""
    out = {}
    budget = runner.args.single_budget_s / 4
    for name, kernel in SINGLE_KERNELS.items():
        stats = single_latency(_scoring_only(kernel, base), queries, 50, budget)
        out[name] = {"p50_ms": stats["p50_ms"], "n": stats["n"]}
    return out


def _scoring_only(kernel: Callable[[Vecs, Vecs], object], base: Vecs) -> SearchFn:
    def search(q: Vecs) -> tuple[Vecs, Ids]:
        kernel(base, q)
        return q, np.zeros(0, np.int64)

    return search


def _measure_numpy(runner: Runner, ids: Ids, base: Vecs, cores: int) -> dict[str, Any]:
    """The baseline, in a function of its own so its copy of the vectors is freed on return."""
    npi = NumpyIndex(base.shape[1])
    _, build_s = _timed_build(lambda: npi.add(ids, base), cores)
    return runner.measure("numpy", numpy_search(npi), {"query_chunk": NUMPY_QUERY_CHUNK}, build_s)


def bench_size(
    n: int,
    base: Vecs,
    queries: Vecs,
    meta: dict[str, Any],
    args: argparse.Namespace,
    bounds: dict[str, Any],
    cores: int,
) -> tuple[dict[str, Any], Runner]:
    dim = base.shape[1]
    ids = np.arange(n, dtype=np.int64)
    runner = Runner(queries, args, cores)
    log.info("size %d (%s): building and measuring", n, meta["kind"])

    flat, flat_s = _timed_build(
        lambda: FaissIndex.build(dim, IndexConfig(kind="flat"), ids, base), cores
    )
    flat_row = runner.measure("flat", faiss_search(flat), {}, flat_s)
    numpy_row = _measure_numpy(runner, ids, base, cores)

    hnsw_config = IndexConfig(kind="hnsw")
    if args.hnsw_ef_construction:
        hnsw_config = hnsw_config.replace(hnsw_ef_construction=args.hnsw_ef_construction)
    hnsw, hnsw_s = _timed_build(lambda: FaissIndex.build(dim, hnsw_config, ids, base), cores)
    log.info(
        "HNSW (M %d, efConstruction %d) built in %.1f s",
        hnsw.config.hnsw_m,
        hnsw.config.hnsw_ef_construction,
        hnsw_s,
    )
    efs = sorted(int(x) for x in args.ef_search.split(","))
    hnsw_rows = _sweep(runner, "hnsw", hnsw, "hnsw_ef_search", efs, hnsw_s)

    nlist = args.ivf_nlist_1m if n >= LARGE and args.ivf_nlist_1m > 0 else None
    ivf_config = IndexConfig(kind="ivf", ivf_nlist=nlist)
    ivf, ivf_s = _timed_build(lambda: FaissIndex.build(dim, ivf_config, ids, base), cores)
    log.info("IVF (nlist %s) built in %.1f s", nlist or "default", ivf_s)
    nprobes = sorted(int(x) for x in args.nprobe.split(","))
    ivf_rows = _sweep(runner, "ivf", ivf, "ivf_nprobe", nprobes, ivf_s)

    rows = [numpy_row, flat_row, *hnsw_rows, *ivf_rows]
    _add_ratios(rows, numpy_row)
    hnsw_best = _smallest_meeting_target(hnsw_rows)
    ef_best = hnsw_best["params"]["hnsw_ef_search"] if hnsw_best else max(efs)
    result: dict[str, Any] = {
        "n": n,
        "dim": dim,
        "data": meta,
        "index_configs": {
            "hnsw": hnsw.config.to_dict(),
            "ivf": {
                **ivf.config.to_dict(),
                "trained": ivf.is_ivf,
                "nlist": int(ivf._index.nlist) if ivf.is_ivf else 0,
                "kmeans_points_x_lists": _kmeans_work(n, nlist) if ivf.is_ivf else 0,
            },
        },
        "results": rows,
        "hnsw_at_target": hnsw_best,
        "ivf_at_target": _smallest_meeting_target(ivf_rows),
        "bandwidth_bound": bandwidth_bound(
            n, dim, len(queries), bounds, {"flat": flat_row, "numpy": numpy_row}
        ),
        "numpy_single_kernels": numpy_single_kernels(base, queries, runner),
        "faiss_direct_single": {
            "flat": direct_faiss(flat, None, runner),
            f"hnsw_ef{ef_best}": direct_faiss(hnsw, ef_best, runner),
        },
    }
    return result, runner


# --- the memory layer -------------------------------------------------------------------------


def _memory_search(memory: Memory, position: dict[int, int]) -> SearchFn:
    """`Memory.search_vectors` (results as (seq, score) lists); the seqs are mapped back to
    positions for the recall check (a dict lookup per result, inside the timed call)."""

    def search(q: Vecs) -> tuple[Vecs, Ids]:
        hits = memory.search_vectors(q, K)
        ids = np.full((len(q), K), -1, np.int64)
        for row, found in enumerate(hits):
            ids[row, : len(found)] = [position[seq] for seq, _ in found]
        return np.zeros(ids.shape, np.float32), ids

    return search


def memory_layer(
    base: Vecs,
    runner: Runner,
    encoder: Encoder,
    spec: EncoderSpec,
    work: Path,
    bare: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """`Memory.search_vectors` over the same vectors (flat, and HNSW with its default
    efSearch) against the bare `FaissIndex` rows of the same configuration, and against the
    memory's own index object (for HNSW the memory's graph, built in 1,000-vector steps,
    is not the bare one's)."""
    out: dict[str, Any] = {}
    docs = [Document.of(text=f"benchmark vector {i}") for i in range(len(base))]
    kinds: tuple[Literal["flat", "hnsw"], ...] = ("flat", "hnsw")
    for kind in kinds:
        if kind not in bare:  # the efSearch sweep skipped HNSW's default
            continue
        bare_row = bare[kind]
        path = work / f"search-memory-{kind}"
        if path.exists():
            shutil.rmtree(path)
        memory = Memory.create(path, encoder, spec, IndexConfig(kind=kind))
        try:
            start = time.perf_counter()
            for i in range(0, len(docs), 1000):
                memory.add_encoded(docs[i : i + 1000], base[i : i + 1000])
            memory.checkpoint()
            load_s = time.perf_counter() - start
            stored = memory.get([d.id for d in docs])
            position = {s.seq: i for i, s in enumerate(stored) if s is not None}
            row = runner.measure(f"memory/{kind}", _memory_search(memory, position), {}, load_s)
            with memory._lock:
                own = memory._sync()  # the memory's own FaissIndex: the same graph, unwrapped
            own_row = runner.measure(f"memory/{kind}/index", faiss_search(own), {}, 0.0)
        finally:
            memory.close()
        shutil.rmtree(path)
        row["vs_bare_index"] = {
            "bare": {"index": bare_row["index"], "params": bare_row["params"]},
            "single_p50_ratio": round(row["single"]["p50_ms"] / bare_row["single"]["p50_ms"], 3),
            "single_p50_added_ms": round(row["single"]["p50_ms"] - bare_row["single"]["p50_ms"], 4),
            "batched_qps_ratio": round(row["batched"]["qps"] / bare_row["batched"]["qps"], 3),
        }
        row["vs_own_index"] = {  # same index object, so only the memory layer differs
            "index_single_p50_ms": own_row["single"]["p50_ms"],
            "index_batched_qps": own_row["batched"]["qps"],
            "single_p50_ratio": round(row["single"]["p50_ms"] / own_row["single"]["p50_ms"], 3),
            "single_p50_added_ms": round(row["single"]["p50_ms"] - own_row["single"]["p50_ms"], 4),
            "batched_qps_ratio": round(row["batched"]["qps"] / own_row["batched"]["qps"], 3),
        }
        out[kind] = row
    return out


# --- goals and main ---------------------------------------------------------------------------


def goals(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    largest = max(sizes, key=lambda s: s["n"])
    bound = largest["bandwidth_bound"]["flat"]
    exact = {
        "n": largest["n"],
        "goal": f"flat single-query p50 <= {GOAL_BANDWIDTH_RATIO} x bandwidth bound",
        "single_ratio": bound["single_p50_over_bound"],
        "batched_ratio_vs_bandwidth_bound": bound["batch_over_bandwidth_bound"],
        "batched_ratio_vs_roofline_bound": bound["batch_over_roofline_bound"],
        "pass": bound["single_p50_over_bound"] <= GOAL_BANDWIDTH_RATIO,
    }
    best = largest["hnsw_at_target"]
    hnsw: dict[str, Any] = {
        "n": largest["n"],
        "goal": f"HNSW at recall@10 >= {TARGET_RECALL} >= {GOAL_HNSW_SPEEDUP}x NumPy brute force",
    }
    if best is None:
        hnsw.update(pass_single=False, pass_batched=False, note="no efSearch reached the recall")
    else:
        hnsw.update(
            ef_search=best["params"]["hnsw_ef_search"],
            recall_at_10=best["recall_at_10"],
            build_s=best["build_s"],
            single_p50_speedup=best["vs_numpy"]["single_p50_speedup"],
            batched_qps_ratio=best["vs_numpy"]["batched_qps_ratio"],
            pass_single=best["vs_numpy"]["single_p50_speedup"] >= GOAL_HNSW_SPEEDUP,
            pass_batched=best["vs_numpy"]["batched_qps_ratio"] >= GOAL_HNSW_SPEEDUP,
        )
    return {"exact_within_bandwidth_bound": exact, "hnsw_speedup": hnsw}


def run(args: argparse.Namespace) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0))
    spec = EncoderSpec(name=args.encoder, path=args.encoder_path)
    encoder = load_encoder(spec)
    dim = encoder.dim
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    meter = QuietMeter()
    bounds = machine_bounds(args.bandwidth_mb, cores)
    log.info("machine bounds: %s", bounds)
    results = []
    for i, n in enumerate(sizes):
        if i == 0:  # the smallest size: real embeddings
            base, queries, meta = search_data.real_embeddings(
                encoder, args.data_root, args.work, n, args.n_queries, with_fashion=not args.quick
            )
        else:
            base, queries, meta = search_data.synthetic(
                n, args.n_queries, dim, args.centres, args.noise, args.seed
            )
        size_meter = QuietMeter()
        size_result, runner = bench_size(n, base, queries, meta, args, bounds, cores)
        if i == 0:
            default_ef = IndexConfig().hnsw_ef_search
            bare = {
                r["index"]: r
                for r in size_result["results"]
                if r["index"] == "flat"
                or (r["index"] == "hnsw" and r["params"]["hnsw_ef_search"] == default_ef)
            }
            size_result["memory_layer"] = memory_layer(base, runner, encoder, spec, args.work, bare)
        size_result["quiet"] = size_meter.report()
        results.append(size_result)
        del base, queries
        gc.collect()
    return {
        "benchmark": "search",
        "machine": machine_info(),
        "quiet": meter.report(),
        "config": {
            **{k: getattr(args, k) for k in FULL},
            "quick": args.quick,
            "encoder_fingerprint": encoder.fingerprint(),
            "dim": dim,
            "k": K,
            "threads": {"single_query": 1, "batched_and_builds": cores},
            "numpy_baseline": "mmrag NumpyIndex.search, queries in chunks of "
            f"{NUMPY_QUERY_CHUNK} (it materialises a (Q, N) score matrix)",
            "recall_reference": "FaissIndex flat (exact) on the same queries",
        },
        "bounds": bounds,
        "sizes": results,
        "goals": goals(results),
        "ivf_default_at_largest": ivf_default_estimate(results),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    result = run(args)
    write_json(args.out, result)
    g = result["goals"]
    print(f"exact/bandwidth: {g['exact_within_bandwidth_bound']}")
    print(f"hnsw speedup: {g['hnsw_speedup']}")
    print(f"quiet: {result['quiet']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
