"""Ingest throughput: the full `ingest` pipeline against the encoder's own forward pass.

Baseline (the pure model cost): `encode_documents(encoder, docs, images)` over the same
documents in the same batches, with every image already decoded in memory (text tower,
image tower, combination). Measured: `ingest(memory, read_sources([jsonl]), batch_size=B)`
into a fresh memory, which also reads the JSONL and the image files, hashes them, decodes
them, writes the blobs (fsync each), inserts into SQLite and updates and saves the index.
The figure of merit is pipeline time / model time on the same documents (the median over
interleaved repeats of each adjacent pair's ratio); the goal is < 1.2.

Run: .venv/bin/python benchmarks/bench_ingest.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from machine import RESULTS, WORK, QuietMeter, machine_info, write_json
from mmrag.data.readers import read_sources
from mmrag.documents import Document, decode_image
from mmrag.encoders.base import Encoder, EncoderSpec, load_encoder
from mmrag.encoders.mixed import encode_documents
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory, ensure_memory

DEFAULT_DATA = WORK.parent / "data" / "emoji"
GOAL_MAX_OVERHEAD = 0.20  # the pipeline may cost at most 20% on top of the model
QUICK = {"n_docs": 96, "batch_size": 16, "repeats": 2, "encoder": "hashing"}
FULL = {"n_docs": 1000, "batch_size": 64, "repeats": 5, "encoder": "lite"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_ingest.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"seconds-long smoke run ({QUICK}); what the tests run",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="a data set folder with documents.jsonl (built with build_dataset('emoji') "
        "if missing)",
    )
    p.add_argument("--n-docs", type=int, help=f"documents in the fixed subset ({FULL['n_docs']})")
    p.add_argument(
        "--batch-size", type=int, help=f"ingest and encoder batch ({FULL['batch_size']})"
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="timed runs of each side, interleaved; the median paired ratio is the result "
        f"({FULL['repeats']})",
    )
    p.add_argument("--encoder", help=f"registry name of the encoder ({FULL['encoder']})")
    p.add_argument("--encoder-path", help="checkpoint folder (default: the shipped one)")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    p.add_argument(
        "--work", type=Path, default=WORK, help="scratch folder for the subset and memories"
    )
    p.add_argument(
        "--out", type=Path, help="result JSON (default: benchmarks/results/ingest[-quick].json)"
    )
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.n_docs < 1 or args.batch_size < 1 or args.repeats < 1:
        p.error("--n-docs, --batch-size and --repeats must be >= 1")
    if args.out is None:
        args.out = RESULTS / ("ingest-quick.json" if args.quick else "ingest.json")
    return args


# --- data -------------------------------------------------------------------------------------


def ensure_data(folder: Path, quick: bool, n_docs: int, work: Path) -> Path:
    """The data set's documents.jsonl. A missing emoji set is built: in full into `folder`,
    or (quick) only its first `n_docs` into the scratch folder."""
    jsonl = folder / "documents.jsonl"
    if jsonl.is_file():
        return jsonl
    from mmrag.data.datasets import build_dataset

    if quick:
        folder = work / "emoji-quick"
        jsonl = folder / "documents.jsonl"
        if jsonl.is_file():
            return jsonl
    logging.info("building the emoji data set into %s", folder)
    build_dataset("emoji", folder, limit=n_docs if quick else None, progress=False)
    return jsonl


def write_subset(jsonl: Path, n: int, out: Path) -> Path:
    """A fixed, evenly spaced subset of `jsonl` (image paths made absolute) at `out`."""
    lines = [line for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n > len(lines):
        raise SystemExit(f"{jsonl} has {len(lines)} documents, fewer than --n-docs {n}")
    picked = [lines[i * len(lines) // n] for i in range(n)]
    rows = []
    for line in picked:
        obj = json.loads(line)
        for part in obj.get("parts", []):
            if "image" in part:
                part["image"] = str((jsonl.parent / part["image"]).resolve())
        rows.append(json.dumps(obj, ensure_ascii=False, sort_keys=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return out


def load_decoded(subset: Path) -> tuple[list[Document], list[list[Image.Image]]]:
    docs = [d for d in read_sources([subset]) if isinstance(d, Document)]
    images = [[decode_image(p.image_bytes()) for p in d.images] for d in docs]
    return docs, images


# --- the two sides ----------------------------------------------------------------------------


def model_pass(
    encoder: Encoder, docs: Sequence[Document], images: Sequence[list[Image.Image]], batch: int
) -> float:
    """Seconds for `encode_documents` over pre-decoded images, batch by batch."""
    start = time.perf_counter()
    for i in range(0, len(docs), batch):
        encode_documents(encoder, docs[i : i + batch], images[i : i + batch])
    return time.perf_counter() - start


def fresh_memory(path: Path, encoder: Encoder, spec: EncoderSpec) -> Memory:
    if path.exists():
        shutil.rmtree(path)
    return ensure_memory(path, spec, encoder=encoder)


def pipeline_pass(
    subset: Path, memory_dir: Path, encoder: Encoder, spec: EncoderSpec, batch: int
) -> tuple[float, int]:
    """Seconds for the full `ingest` into a fresh memory (creating it is not timed)."""
    memory = fresh_memory(memory_dir, encoder, spec)
    try:
        start = time.perf_counter()
        report = ingest(memory, read_sources([subset]), batch_size=batch, progress=False)
        seconds = time.perf_counter() - start
    finally:
        memory.close()
    if report.errors:
        raise RuntimeError(f"ingest reported errors: {report.errors[:3]}")
    return seconds, report.added


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def stage_breakdown(
    subset: Path,
    work: Path,
    encoder: Encoder,
    spec: EncoderSpec,
    batch: int,
    model_s: float,
) -> dict[str, Any]:
    """Each pipeline stage timed alone, one after the other (no overlap), in seconds.

    In `ingest` the reader-thread stages (read, ids, lookup, decode, blobs) overlap the
    encoder; the store/index stages and the final checkpoint run after it, serially.
    """
    docs: list[Document] = []
    s: dict[str, float] = {}
    s["read_parse_hash"] = _timed(
        lambda: docs.extend(d for d in read_sources([subset]) if isinstance(d, Document))
    )
    ids: list[str] = []
    s["document_ids"] = _timed(lambda: ids.extend(d.id for d in docs))
    memory = fresh_memory(work / "stages-memory", encoder, spec)
    try:
        s["known_id_lookup"] = _timed(
            lambda: [memory.contains(ids[i : i + batch]) for i in range(0, len(ids), batch)]
        )
        images: list[list[Image.Image]] = []
        s["decode"] = _timed(
            lambda: images.extend([decode_image(p.image_bytes()) for p in d.images] for d in docs)
        )
        s["blob_writes_fsync"] = _timed(
            lambda: [
                memory.blobs.put(p.sha256 or "", p.image_bytes()) for d in docs for p in d.images
            ]
        )
        texts = [d.text for d in docs if d.text]
        flat = [img for imgs in images for img in imgs]
        s["model_text_tower"] = _timed(lambda: encoder.encode_text(texts))
        s["model_image_tower"] = _timed(lambda: encoder.encode_image(flat))
        vectors = encode_documents(encoder, docs, images)
        s["store_and_index"] = _timed(
            lambda: [
                memory.add_encoded(docs[i : i + batch], vectors[i : i + batch])
                for i in range(0, len(docs), batch)
            ]
        )
        s["checkpoint"] = _timed(memory.checkpoint)
    finally:
        memory.close()
    reader = ("read_parse_hash", "document_ids", "known_id_lookup", "decode", "blob_writes_fsync")
    serial = ("store_and_index", "checkpoint")
    return {
        "seconds": {k: round(v, 4) for k, v in s.items()},
        "fraction_of_model": {k: round(v / model_s, 4) for k, v in s.items()},
        "reader_thread_s": round(sum(s[k] for k in reader), 4),
        "after_encoder_serial_s": round(sum(s[k] for k in serial), 4),
        "note": "each stage alone, sequential; in ingest the reader-thread stages overlap the "
        "encoder, the store/index stages follow it. model_* time the towers on all documents "
        "in the encoder's own batches.",
    }


# --- main -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = EncoderSpec(name=args.encoder, path=args.encoder_path, batch_size=args.batch_size)
    encoder = load_encoder(spec)
    jsonl = ensure_data(args.data, args.quick, args.n_docs, args.work)
    work: Path = args.work
    subset = write_subset(jsonl, args.n_docs, work / "ingest-subset" / "documents.jsonl")
    docs, images = load_decoded(subset)
    batch = args.batch_size

    # Warm-up: a full model pass (every batch shape: oneDNN primitives, allocator) and a
    # one-batch ingest (imports, SQLite, FAISS). Without it the first pairs run slower.
    model_pass(encoder, docs, images, batch)
    warm = write_subset(subset, min(batch, len(docs)), work / "ingest-warmup" / "documents.jsonl")
    pipeline_pass(warm, work / "ingest-warmup-memory", encoder, spec, batch)

    meter = QuietMeter()
    model_s: list[float] = []
    pipe_s: list[float] = []
    added = 0
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides
        model_s.append(model_pass(encoder, docs, images, batch))
        seconds, added = pipeline_pass(subset, work / "ingest-memory", encoder, spec, batch)
        pipe_s.append(seconds)
    quiet = meter.report()
    n = len(docs)
    best_model, best_pipe = min(model_s), min(pipe_s)
    paired = [p / m for p, m in zip(pipe_s, model_s, strict=True)]
    ratio = statistics.median(paired)
    result: dict[str, Any] = {
        "benchmark": "ingest",
        "machine": machine_info(),
        "quiet": quiet,
        "config": {
            "quick": args.quick,
            "encoder": spec.name,
            "encoder_path": spec.path,
            "encoder_fingerprint": encoder.fingerprint(),
            "dim": encoder.dim,
            "data": str(jsonl),
            "n_docs": n,
            "images": sum(len(i) for i in images),
            "batch_size": batch,
            "repeats": args.repeats,
            "threads": "torch default (all cores); ingest adds its reader thread",
        },
        "model": {
            "what": "encode_documents on pre-decoded images, same documents and batches",
            "seconds": [round(x, 4) for x in model_s],
            "docs_per_s": round(n / best_model, 2),
            "docs_per_s_median": round(n / statistics.median(model_s), 2),
        },
        "pipeline": {
            "what": "ingest(memory, read_sources([jsonl]), batch_size) into a fresh memory",
            "seconds": [round(x, 4) for x in pipe_s],
            "docs_per_s": round(n / best_pipe, 2),
            "docs_per_s_median": round(n / statistics.median(pipe_s), 2),
            "added": added,
        },
        "ratio": {
            "estimator": "median over the repeats of pipeline time / model time of each "
            "adjacent (model, pipeline) pair: robust to slow drift in machine speed",
            "paired": [round(x, 4) for x in paired],
            "pipeline_time_over_model_time": round(ratio, 4),
            "overhead": round(ratio - 1, 4),
            "best_of_overhead": round(best_pipe / best_model - 1, 4),
            "median_of_each_overhead": round(
                statistics.median(pipe_s) / statistics.median(model_s) - 1, 4
            ),
            "goal_max_overhead": GOAL_MAX_OVERHEAD,
            "pass": ratio - 1 < GOAL_MAX_OVERHEAD,
        },
    }
    if not args.no_stages:
        result["stages"] = stage_breakdown(subset, work, encoder, spec, batch, best_model)
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    result = run(args)
    write_json(args.out, result)
    r = result["ratio"]
    print(
        f"model {result['model']['docs_per_s']} docs/s, pipeline "
        f"{result['pipeline']['docs_per_s']} docs/s, overhead {r['overhead']:+.1%} "
        f"(goal < {GOAL_MAX_OVERHEAD:.0%}: {'PASS' if r['pass'] else 'FAIL'}); "
        f"quiet={result['quiet']['quiet']} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
