"""Is the retriever as fast as its index? `Retriever.search_vectors` (documents returned)
against the bare FAISS object it searches, one query at a time, interleaved.

For each size (clustered synthetic vectors of the encoder's dimension, one text document and
a small metadata object each) and index kind (flat, HNSW with the library's efSearch), a
memory is built and every timed query runs, in turn: the memory's own FAISS object searched
directly (the same graph and efSearch: the floor), `Memory.search_vectors` (seqs and scores)
and `Retriever.search_vectors` (documents with text, metadata and image paths), k = 10, one
thread. The goal is the retriever's p50 within 1.5x of the bare index's. Optionally the same
vectors and documents go into chromadb (in-process, HNSW, inner product) run by another
interpreter that has it installed (`--chroma-python`; chromadb is no dependency of mmrag),
timed the same way: the retriever should be faster.

Wrap timing runs in `flock /tmp/mmrag-timing.lock` so they do not overlap another benchmark.

Run: .venv/bin/python benchmarks/bench_retriever.py [--quick] [--chroma-python PY]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

import search_data
from machine import (
    REPO,
    RESULTS,
    WORK,
    QuietMeter,
    machine_info,
    parse_size,
    with_defaults,
    write_json,
)
from mmrag.config import IndexConfig
from mmrag.documents import Document
from mmrag.encoders.base import EncoderSpec, load_encoder
from mmrag.memory.memory import Memory
from mmrag.retrieval import Retriever

log = logging.getLogger("bench_retriever")

Vecs = NDArray[np.float32]
K = 10
GOAL_RATIO = 1.5
CHROMA_PEER = Path(__file__).with_name("chroma_peer.py")
FULL: dict[str, Any] = {"sizes": "10k,100k", "encoder": "lite", "queries": 400, "centres": 4096}
QUICK: dict[str, Any] = {"sizes": "2000", "encoder": "hashing", "queries": 60, "centres": 64}
KINDS: tuple[Literal["flat", "hnsw"], ...] = ("flat", "hnsw")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_retriever.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help=f"seconds-long smoke run: {QUICK}")
    p.add_argument(
        "--sizes", help=f"comma-separated sizes, 10k / 100k or numbers ({FULL['sizes']})"
    )
    p.add_argument(
        "--encoder", help=f"registry name of the encoder: its dimension ({FULL['encoder']})"
    )
    p.add_argument(
        "--queries", type=int, help=f"timed single queries per index ({FULL['queries']})"
    )
    p.add_argument("--centres", type=int, help=f"mixture centres ({FULL['centres']})")
    p.add_argument(
        "--chroma-python",
        help="a Python interpreter with chromadb installed: also time chromadb in-process on "
        "the same vectors and documents (e.g. python3 -m venv /tmp/chroma && "
        "/tmp/chroma/bin/pip install chromadb numpy)",
    )
    p.add_argument("--work", type=Path, default=WORK, help="scratch folder for the memories")
    p.add_argument("--out", type=Path, help="result JSON (default: results/retriever[-quick].json)")
    args = p.parse_args(argv)
    with_defaults(args, QUICK if args.quick else FULL)
    if args.out is None:
        args.out = RESULTS / ("retriever-quick.json" if args.quick else "retriever.json")
    return args


def documents(n: int) -> list[Document]:
    """What a search returns for each vector: a short text and a small metadata object."""
    return [
        Document.of(text=f"benchmark document {i}", metadata={"i": i, "shard": i % 7})
        for i in range(n)
    ]


def build_memory(
    path: Path, spec: EncoderSpec, kind: Literal["flat", "hnsw"], base: Vecs, docs: list[Document]
) -> Memory:
    if path.exists():
        shutil.rmtree(path)
    memory = Memory.create(path, load_encoder(spec), spec, IndexConfig(kind=kind))
    for start in range(0, len(docs), 5000):
        memory.add_encoded(docs[start : start + 5000], base[start : start + 5000])
    memory.checkpoint()
    return memory


def bare_search(memory: Memory) -> Callable[[Vecs], object]:
    """The memory's own FAISS object, searched without any wrapper, at the memory's efSearch."""
    with memory._lock:
        index = memory._sync()
    raw = index._index
    if index.config.kind == "hnsw":
        import faiss

        faiss.downcast_index(raw.index).hnsw.efSearch = index.config.hnsw_ef_search
    return lambda q: raw.search(q, K)


def interleaved(systems: dict[str, Callable[[Vecs], object]], queries: Vecs) -> dict[str, Any]:
    """Every query through every system in turn (so drifts in machine load hit all alike), one
    thread; p50 / p99 in ms per system."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    with threadpool_limits(limits=1):
        for i in range(min(5, len(queries))):  # warm-up
            for fn in systems.values():
                fn(queries[i : i + 1])
        for i in range(len(queries)):
            q = queries[i : i + 1]
            for name, fn in systems.items():
                t0 = time.perf_counter()
                fn(q)
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, values in times.items():
        ms = np.asarray(values) * 1e3
        out[name] = {
            "p50_ms": round(float(np.percentile(ms, 50)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "n": len(ms),
        }
    return out


def recall_at_k(found: list[list[int]], truth: list[list[int]]) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def chroma(python: str, base: Vecs, queries: Vecs, work: Path) -> dict[str, Any]:
    """chromadb in another interpreter (its own dependencies), on the same vectors."""
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "chroma-base.npy", base)
    np.save(work / "chroma-queries.npy", queries)
    out = work / "chroma-result.json"
    subprocess.run(
        [
            python,
            str(CHROMA_PEER),
            str(work / "chroma-base.npy"),
            str(work / "chroma-queries.npy"),
            "--k",
            str(K),
            "--out",
            str(out),
        ],
        check=True,
        cwd=REPO,
    )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def bench_size(n: int, dim: int, args: argparse.Namespace) -> dict[str, Any]:
    base, queries, meta = search_data.synthetic(n, args.queries, dim, args.centres, 0.75, 0)
    docs = documents(n)
    truth: list[list[int]] = []
    result: dict[str, Any] = {"n": n, "dim": dim, "data": meta, "kinds": {}}
    for kind in KINDS:
        log.info("size %d, %s: building the memory", n, kind)
        path = args.work / f"retriever-{n}-{kind}"
        memory = build_memory(path, EncoderSpec(name=args.encoder), kind, base, docs)
        try:
            retriever = Retriever(memory)
            seq_of = {
                d.id: s.seq
                for d, s in zip(docs, memory.get([d.id for d in docs]), strict=True)
                if s
            }
            position = {seq: i for i, seq in enumerate(seq_of[d.id] for d in docs)}
            timings = interleaved(
                {
                    "faiss": bare_search(memory),
                    "memory": partial(memory.search_vectors, k=K),
                    "retriever": partial(retriever.search_vectors, k=K),
                },
                queries,
            )
            found = [
                [position[r.seq] for r in rows] for rows in retriever.search_vectors(queries, K)
            ]
        finally:
            memory.close()
            shutil.rmtree(path)
        if kind == "flat":
            truth = found
        ratio = timings["retriever"]["p50_ms"] / timings["faiss"]["p50_ms"]
        result["kinds"][kind] = {
            **timings,
            "retriever_over_faiss_p50": round(ratio, 3),
            "recall_at_10": round(recall_at_k(found, truth), 4),
            "pass": ratio <= GOAL_RATIO,
        }
        log.info("size %d, %s: %s", n, kind, result["kinds"][kind])
    if args.chroma_python:
        log.info("size %d: chromadb", n)
        peer = chroma(args.chroma_python, base, queries, args.work)
        peer["recall_at_10"] = round(recall_at_k(peer.pop("found"), truth), 4)
        ours = result["kinds"]["hnsw"]["retriever"]["p50_ms"]
        peer["retriever_hnsw_over_chroma_p50"] = round(ours / peer["p50_ms"], 3)
        peer["pass"] = ours < peer["p50_ms"]
        result["chromadb"] = peer
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    dim = load_encoder(EncoderSpec(name=args.encoder)).dim
    meter = QuietMeter()
    sizes = [bench_size(parse_size(s), dim, args) for s in args.sizes.split(",")]
    goals = {
        f"{s['n']}/{kind}": s["kinds"][kind]["retriever_over_faiss_p50"]
        for s in sizes
        for kind in KINDS
    }
    return {
        "benchmark": "retriever",
        "machine": machine_info(),
        "quiet": meter.report(),
        "config": {
            "k": K,
            "threads": 1,
            "encoder": args.encoder,
            "queries": args.queries,
            "index": IndexConfig().to_dict(),
            "goal": f"Retriever.search_vectors p50 <= {GOAL_RATIO} x the bare FAISS p50; "
            "faster than chromadb in-process",
        },
        "sizes": sizes,
        "goals": {
            "retriever_over_faiss_p50": goals,
            "pass": all(v <= GOAL_RATIO for v in goals.values()),
            "faster_than_chromadb": [s["chromadb"]["pass"] for s in sizes if "chromadb" in s],
        },
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    result = run(args)
    write_json(args.out, result)
    print(json.dumps(result["goals"]), f"quiet: {result['quiet']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
