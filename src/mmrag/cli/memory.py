"""`mmrag data | ingest | search | delete | info`: building data sets and using a memory."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmrag.cli.common import (
    DATASET_NAMES,
    EXIT_ERROR,
    EXIT_OK,
    AddCommand,
    CommandError,
    print_json,
)
from mmrag.config import IndexConfig, RetrieverConfig

if TYPE_CHECKING:
    from mmrag.memory.ingest import DocumentLimits


def parse_filters(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs: values are JSON when they parse (numbers, booleans, lists), else
    strings; a repeated key or a JSON list means membership (any of the values)."""
    filters: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--filter {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        values = value if isinstance(value, list) else [value]
        filters.setdefault(key.strip(), []).extend(values)
    return {k: v[0] if len(v) == 1 else v for k, v in filters.items()}


def _print_results(results: Sequence[Any]) -> None:
    if not results:
        print("no results")
    for rank, r in enumerate(results, 1):
        text = (r.text[:70] + "…") if len(r.text) > 71 else r.text
        print(f"{rank:>3}  {r.score:.4f}  {r.id}  {text!r}  {r.image or ''}")


def encoder_spec(args: argparse.Namespace) -> Any:
    """The encoder asked for, or None: a new memory then gets `lite`, an existing one keeps
    the encoder named in its manifest."""
    from mmrag.encoders.base import EncoderSpec

    if args.encoder is None and args.encoder_path is None:
        return None
    name = args.encoder or "lite"
    return EncoderSpec(name=name, path=args.encoder_path, batch_size=args.batch_size)


def cmd_data(args: argparse.Namespace) -> int:
    from mmrag.data.datasets import build_dataset

    summary = build_dataset(
        args.name, Path(args.out), limit=args.limit, progress=not args.no_progress
    )
    print(f"wrote {summary.count} documents to {Path(args.out) / 'documents.jsonl'}")
    return EXIT_OK


def _table_options(image_column: str | None, text_column: str | None) -> dict[str, str]:
    return {k: v for k, v in (("image_column", image_column), ("text_column", text_column)) if v}


def _read_all(sources: Sequence[str], image_column: str | None, text_column: str | None) -> Any:
    """Chain the sources; column names apply to the CSV / Parquet tables among them."""
    from mmrag.data.readers import read_source

    options = _table_options(image_column, text_column)
    for source in sources:
        is_table = source.lower().endswith((".csv", ".parquet"))
        yield from read_source(source, **(options if is_table else {}))


def _reencode(args: argparse.Namespace) -> None:
    from mmrag.memory.reencode import reencode

    # A folder without a memory: Memory.open's MemoryFolderError says so, in one line.
    done = reencode(
        args.memory, encoder_spec(args), batch_size=args.batch_size, progress=not args.no_progress
    )
    if done.skipped:
        print(f"{args.memory} already uses this encoder ({done.new_fingerprint[:16]}); unchanged")
    else:
        print(
            f"re-encoded {done.count} documents in {done.seconds:.1f} s "
            f"({done.old_fingerprint[:16]} -> {done.new_fingerprint[:16]})"
        )


def cmd_ingest(args: argparse.Namespace) -> int:
    from mmrag.memory.ingest import ingest
    from mmrag.memory.memory import ensure_memory

    if args.reencode:
        if args.ray or args.backend or args.uri:
            raise CommandError("--reencode works on an embedded memory, without --ray")
        _reencode(args)
        if not args.sources:
            return EXIT_OK
    elif not args.sources:
        raise CommandError("give at least one SOURCE to ingest (or --reencode)")
    index = IndexConfig(kind=args.index) if args.index else None
    limits = _limits(args)
    if args.ray_address and not args.ray:
        raise CommandError("--ray-address needs --ray")
    with ensure_memory(
        args.memory, encoder_spec(args), index, backend=args.backend, uri=args.uri
    ) as memory:
        if args.ray:
            from mmrag.memory.ray_ingest import RayIngestConfig, ray_ingest

            report = ray_ingest(
                memory,
                args.sources,
                RayIngestConfig(
                    address=args.ray_address,
                    workers=args.ray_workers,
                    batch_size=args.batch_size,
                    limits=limits,
                ),
                progress=not args.no_progress,
                update_metadata=args.update_metadata,
                table_options=_table_options(args.image_column, args.text_column),
            )
        else:
            report = ingest(
                memory,
                _read_all(args.sources, args.image_column, args.text_column),
                batch_size=args.batch_size,
                progress=not args.no_progress,
                update_metadata=args.update_metadata,
                limits=limits,
            )
        count = len(memory)
    if args.json:
        print_json({**report.to_dict(), "count": count})
    else:
        for err in report.errors:
            print(f"skipped {err.source}: {err.reason}", file=sys.stderr)
        print(
            f"added {report.added}, already present {report.existing}, "
            f"updated {report.updated}, skipped {len(report.errors)} bad; "
            f"memory holds {count} documents ({report.docs_per_second:.1f} docs/s)"
        )
    return EXIT_ERROR if args.strict and report.errors else EXIT_OK


def cmd_search(args: argparse.Namespace) -> int:
    from mmrag.memory.memory import Memory
    from mmrag.retrieval import Retriever

    if args.queries is None and args.text is None and args.image is None:
        raise CommandError("give --text, --image (or both), or --queries FILE")
    if args.queries is not None and (args.text is not None or args.image is not None):
        raise CommandError("--queries cannot be combined with --text/--image")
    config = RetrieverConfig(
        k=args.k,
        relevance_cap=args.relevance_cap,
        mmr_lambda=args.mmr,
        redundancy_threshold=args.redundancy,
    )
    filters = parse_filters(args.filter)
    with Memory.open(args.memory) as memory:
        retriever = Retriever(memory, config)
        if args.queries is not None:
            lines = Path(args.queries).read_text(encoding="utf-8").splitlines()
            texts = [t.strip() for t in lines if t.strip()]
            batches = retriever.search_batch(texts, filters=filters) if texts else []
            for text, results in zip(texts, batches, strict=True):
                if args.json:
                    print_json({"query": text, "results": [r.to_json() for r in results]})
                else:
                    print(f"# {text}")
                    _print_results(results)
            return EXIT_OK
        results = retriever.search(
            text=args.text, image=args.image, filters=filters, exclude_ids=args.exclude
        )
    if args.json:
        print_json({"results": [r.to_json() for r in results]})
    else:
        _print_results(results)
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    from mmrag.memory.memory import Memory

    with Memory.open(args.memory, mode="a") as memory:
        removed = memory.delete(args.ids)
        count = len(memory)
    print(f"deleted {removed} of {len(args.ids)} ids; memory holds {count} documents")
    return EXIT_OK if removed == len(set(args.ids)) else EXIT_ERROR


def cmd_info(args: argparse.Namespace) -> int:
    from mmrag.memory.memory import Memory

    with Memory.open(args.memory) as memory:
        stats = memory.stats()
    if args.json:
        print_json(stats)
    else:
        for key, value in stats.items():
            print(f"{key}: {json.dumps(value, ensure_ascii=False)}")
    return EXIT_OK


def _limits(args: argparse.Namespace) -> DocumentLimits:
    from mmrag.memory.ingest import DocumentLimits

    limits = DocumentLimits.load(args.limits) if args.limits else DocumentLimits()
    if args.max_text_chars is not None:
        limits = limits.replace(max_text_chars=args.max_text_chars)
    return limits


def cmd_check(args: argparse.Namespace) -> int:
    from mmrag.memory.check import check_memory

    report = check_memory(
        args.memory, repair=args.repair, hashes=not args.no_hashes, sample=args.sample
    )
    if args.json:
        print_json(report.to_json())
    else:
        for key, value in report.checked.items():
            print(f"{key}: {value}")
        for finding in report.findings:
            print(finding.line())
        print("ok" if report.ok else "problems found" + ("" if args.repair else ": --repair"))
    return EXIT_OK if report.ok else EXIT_ERROR


def add_memory_writer_options(p: argparse.ArgumentParser) -> None:
    from mmrag.encoders.base import ENCODERS

    p.add_argument(
        "--encoder",
        default=None,
        choices=sorted(ENCODERS),
        help="encoder for a new memory (default: lite, the offline dual encoder); "
        "an existing memory keeps the one in its manifest and refuses another",
    )
    p.add_argument(
        "--encoder-path",
        default=None,
        help="checkpoint for the encoder: a folder for lite/hf_clip, "
        "MODEL:FILE for open_clip (default: the shipped lite heads)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="documents encoded per batch")


def add_commands(add: AddCommand) -> None:
    p = add("data", cmd_data, "build an offline data set (images + documents.jsonl) in OUT")
    p.add_argument("name", choices=DATASET_NAMES, help="which data set")
    p.add_argument("out", help="output folder")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N documents")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = add("ingest", cmd_ingest, "add documents from SOURCE(s) to MEMORY (created if missing)")
    p.add_argument("memory", help="memory folder")
    p.add_argument(
        "sources",
        nargs="*",
        help="image folders (x.png + x.txt), .jsonl, .csv, .parquet, or WebDataset .tar shards",
    )
    add_memory_writer_options(p)
    p.add_argument(
        "--reencode",
        action="store_true",
        help="first re-encode every stored document in place (from the memory's own texts "
        "and image blobs; crash-safe) with --encoder/--encoder-path, by default the encoder "
        "the manifest names as installed now: for a memory built with older heads",
    )
    p.add_argument(
        "--index",
        choices=["flat", "hnsw", "ivf"],
        default=None,
        help="vector index kind (default: flat, exact; an existing memory switches "
        "and rebuilds when this differs)",
    )
    p.add_argument(
        "--backend",
        choices=["embedded", "milvus"],
        default=None,
        help="where a new memory keeps documents and vectors: embedded (SQLite + FAISS in "
        "the folder, the default) or milvus (a Milvus collection at --uri); recorded in the "
        "manifest, so search, info, delete and serve find it",
    )
    p.add_argument(
        "--uri",
        default=None,
        help="Milvus URI for --backend milvus: a local file ending in .db is milvus-lite "
        "(default: MEMORY/milvus.db), http://HOST:19530 a Milvus server (token from "
        "$MILVUS_TOKEN)",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="read, decode and encode as a Ray Data pipeline (encoder actors); this process "
        "still writes the memory, so the result equals a plain ingest",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join with --ray (default: start a local Ray instance)",
    )
    p.add_argument(
        "--ray-workers",
        type=int,
        default=None,
        help="encoder actors with --ray (default: the cluster's free CPUs less half a CPU "
        "left for reading and decoding, at least 1)",
    )
    p.add_argument(
        "--limits",
        default=None,
        metavar="JSON_FILE",
        help="DocumentLimits JSON: max_text_chars, max_metadata_bytes, max_metadata_depth, "
        "max_image_bytes, max_pixels (defaults in docs/format.md); a document over a limit is "
        "reported and skipped",
    )
    p.add_argument(
        "--max-text-chars",
        type=int,
        default=None,
        metavar="N",
        help="most characters of text one document may hold (default 100000)",
    )
    p.add_argument(
        "--image-column",
        default=None,
        help="CSV/Parquet column holding image paths (default: image)",
    )
    p.add_argument(
        "--text-column",
        default=None,
        help="CSV/Parquet column holding captions (default: text, else caption)",
    )
    p.add_argument(
        "--update-metadata",
        action="store_true",
        help="for documents already stored, replace their metadata by the new one",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 if any input was skipped")
    p.add_argument("--json", action="store_true", help="print the ingest report as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = add("search", cmd_search, "search MEMORY by text, image, or both")
    p.add_argument("memory", help="memory folder")
    p.add_argument("--text", help="text query")
    p.add_argument("--image", help="image query (a file); with --text, a mixed query")
    p.add_argument("--queries", help="a file of text queries, one per line (models load once)")
    p.add_argument("-k", type=int, default=5, help="number of results (default 5)")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata filter; repeat a key for any-of; `modality=image|text|mixed` "
        "filters on the document's parts; values parse as JSON when they can",
    )
    p.add_argument(
        "--relevance-cap",
        type=float,
        default=None,
        help="skip results scoring above this (near copies of the query)",
    )
    p.add_argument(
        "--redundancy",
        type=float,
        default=None,
        help="skip results more similar than this to one already chosen",
    )
    p.add_argument(
        "--mmr",
        type=float,
        default=None,
        help="maximal marginal relevance weight in [0, 1] (1 = relevance only)",
    )
    p.add_argument(
        "--exclude", action="append", default=[], metavar="ID", help="never return this document id"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"results": [{"id", "score", "text", "image", "metadata"}]} '
        "(JSON Lines with --queries)",
    )

    p = add("delete", cmd_delete, "delete documents by id from MEMORY")
    p.add_argument("memory", help="memory folder")
    p.add_argument("ids", nargs="+", help="document ids")

    p = add(
        "check",
        cmd_check,
        "verify MEMORY: database integrity, documents' JSON, counts, image blobs (present, "
        "hashing to their name, none orphaned), the index against the store; --repair fixes "
        "what the store can rebuild (exit 1 while problems remain)",
    )
    p.add_argument("memory", help="memory folder")
    p.add_argument(
        "--repair",
        action="store_true",
        help="fix what can be fixed, as the memory's writer: recount, rewrite unreadable JSON, "
        "collect orphan blobs, remove corrupt ones and mark the documents whose image is gone "
        "(metadata 'mmrag_missing_images'), rebuild the index",
    )
    p.add_argument("--no-hashes", action="store_true", help="do not hash every image blob (faster)")
    p.add_argument(
        "--sample",
        type=int,
        default=256,
        metavar="N",
        help="vectors compared between the index and the store (default 256)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = add("info", cmd_info, "show MEMORY's encoder, index and counts")
    p.add_argument("memory", help="memory folder")
    p.add_argument("--json", action="store_true", help="print as JSON")
