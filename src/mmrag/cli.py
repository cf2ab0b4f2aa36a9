"""The `mmrag` command: thin wrappers over the public functions, one per subcommand."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmrag.config import ConfigError, IndexConfig, RetrieverConfig

log = logging.getLogger("mmrag")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
DATASET_NAMES = ("emoji", "photos", "fashion-mnist")


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


# --- helpers -------------------------------------------------------------------------------


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


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _print_results(results: Sequence[Any]) -> None:
    if not results:
        print("no results")
    for rank, r in enumerate(results, 1):
        text = (r.text[:70] + "…") if len(r.text) > 71 else r.text
        print(f"{rank:>3}  {r.score:.4f}  {r.id}  {text!r}  {r.image or ''}")


def _encoder_spec(args: argparse.Namespace) -> Any:
    """The encoder asked for, or None: a new memory then gets `lite`, an existing one keeps
    the encoder named in its manifest."""
    from mmrag.encoders.base import EncoderSpec

    if args.encoder is None and args.encoder_path is None:
        return None
    name = args.encoder or "lite"
    return EncoderSpec(name=name, path=args.encoder_path, batch_size=args.batch_size)


# --- commands ------------------------------------------------------------------------------


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


def cmd_ingest(args: argparse.Namespace) -> int:
    from mmrag.memory.ingest import ingest
    from mmrag.memory.memory import ensure_memory

    index = IndexConfig(kind=args.index) if args.index else None
    if args.ray_address and not args.ray:
        raise CommandError("--ray-address needs --ray")
    with ensure_memory(
        args.memory, _encoder_spec(args), index, backend=args.backend, uri=args.uri
    ) as memory:
        if args.ray:
            from mmrag.memory.ray_ingest import RayIngestConfig, ray_ingest

            report = ray_ingest(
                memory,
                args.sources,
                RayIngestConfig(
                    address=args.ray_address, workers=args.ray_workers, batch_size=args.batch_size
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
            )
        count = len(memory)
    if args.json:
        _print_json({**report.to_dict(), "count": count})
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
                    _print_json({"query": text, "results": [r.to_json() for r in results]})
                else:
                    print(f"# {text}")
                    _print_results(results)
            return EXIT_OK
        results = retriever.search(
            text=args.text, image=args.image, filters=filters, exclude_ids=args.exclude
        )
    if args.json:
        _print_json({"results": [r.to_json() for r in results]})
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
        _print_json(stats)
    else:
        for key, value in stats.items():
            print(f"{key}: {json.dumps(value, ensure_ascii=False)}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    if args.what == "encoder":
        from mmrag.train.encoder import main as train_encoder_main

        return train_encoder_main(args.rest)
    if args.what == "vq":
        from mmrag.train.vq import main as train_vq_main

        return train_vq_main(args.rest)
    if args.what == "ra-cm3":
        from mmrag.train.ra_cm3 import main as train_ra_cm3_main

        return train_ra_cm3_main(args.rest)
    if args.what == "fromage":
        from mmrag.train.fromage import main as train_fromage_main

        return train_fromage_main(args.rest)
    if args.what == "gill":
        from mmrag.train.gill import main as train_gill_main

        return train_gill_main(args.rest)
    raise CommandError(f"unknown training target {args.what!r}")


def cmd_generate(args: argparse.Namespace) -> int:
    from mmrag.generate_cli import main as generate_main

    return generate_main([args.what, *args.rest])


def cmd_eval(args: argparse.Namespace) -> int:
    if args.what == "ra-cm3":
        from mmrag.eval.ra_cm3 import main as eval_ra_cm3_main

        return eval_ra_cm3_main(args.rest)
    if args.what == "fromage":
        from mmrag.eval.fromage import main as eval_fromage_main

        return eval_fromage_main(args.rest)
    if args.what == "gill":
        from mmrag.eval.gill import main as eval_gill_main

        return eval_gill_main(args.rest)
    if args.what == "vq":
        from mmrag.eval.vq import main as eval_vq_main

        return eval_vq_main(args.rest)
    raise CommandError(f"unknown evaluation {args.what!r}")


def cmd_chat(args: argparse.Namespace) -> int:
    from mmrag.chat_cli import main as chat_main

    return chat_main(args.rest)


def cmd_demo(args: argparse.Namespace) -> int:
    from mmrag.demo import run_demo

    report = run_demo(
        Path(args.out),
        limit=args.limit,
        progress=not args.no_progress,
        rebuild=args.rebuild,
        chat=not args.no_chat,
    )
    print(f"demo report: {report}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from mmrag.server.config import ServerConfig
    from mmrag.server.run import serve

    config = ServerConfig.load(args.config) if args.config else ServerConfig()
    if args.open_reads is not None:
        config = config.replace(open_reads=args.open_reads)
    capabilities = _generation_capabilities(args)
    serve(
        args.memory,
        host=args.host,
        port=args.port,
        token_file=args.token_file,
        config=config,
        encoder=_encoder_spec(args),
        access_log=not args.no_access_log,
        capabilities=capabilities,
    )
    return EXIT_OK


def _generation_capabilities(args: argparse.Namespace) -> Any:
    """RA-CM3 for /generate/*: --generator DIR, else the shipped model when present; and
    FROMAGe / GILL for /chat when the memory was built with the fromage encoder."""
    from mmrag.server.chat_backend import with_chat

    return with_chat(_ra_cm3_capabilities(args))


def _ra_cm3_capabilities(args: argparse.Namespace) -> Any:
    from mmrag.checkpoints import CheckpointNotFoundError, checkpoint_dir
    from mmrag.server.ra_cm3_backend import ra_cm3_capabilities

    if args.no_generator:
        return None
    if args.generator is None:
        try:
            checkpoint_dir("ra-cm3")
        except CheckpointNotFoundError:
            log.info("no RA-CM3 checkpoint: /generate/* answer 501")
            return None
    return ra_cm3_capabilities(args.generator)


# --- the parser ----------------------------------------------------------------------------


def _add_memory_writer_options(p: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmrag", description="A persistent multimodal memory with dense retrieval."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        commands[name] = func
        return p

    p = add("data", cmd_data, "build an offline data set (images + documents.jsonl) in OUT")
    p.add_argument("name", choices=DATASET_NAMES, help="which data set")
    p.add_argument("out", help="output folder")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N documents")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = add("ingest", cmd_ingest, "add documents from SOURCE(s) to MEMORY (created if missing)")
    p.add_argument("memory", help="memory folder")
    p.add_argument(
        "sources",
        nargs="+",
        help="image folders (x.png + x.txt), .jsonl, .csv, .parquet, or WebDataset .tar shards",
    )
    _add_memory_writer_options(p)
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

    p = add("info", cmd_info, "show MEMORY's encoder, index and counts")
    p.add_argument("memory", help="memory folder")
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = add(
        "train",
        cmd_train,
        "train a component: encoder (the lite heads), vq (the image tokenizer), ra-cm3 (the "
        "generator; --retrieval off for the vanilla baseline), fromage (the "
        "frozen-LM adapters), gill (image tokens, mapper, decision on top of fromage); "
        "`mmrag train NAME --help` lists its options",
    )
    p.add_argument(
        "what", choices=["encoder", "vq", "ra-cm3", "fromage", "gill"], help="what to train"
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that trainer")

    p = add(
        "generate",
        cmd_generate,
        "generate with RA-CM3 from what MEMORY retrieves: image (caption -> image), caption "
        "(image -> caption), infill-image, infill-caption; `mmrag generate WHAT --help`",
    )
    p.add_argument(
        "what", choices=["image", "caption", "infill-image", "infill-caption"], help="what to make"
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options (see WHAT --help)")

    p = add(
        "eval",
        cmd_eval,
        "evaluate a model: ra-cm3 (retrieval vs none: FID, dual-encoder score, CIDEr, "
        "knowledge test), fromage (contextual image retrieval R@k, captioning CIDEr), gill "
        "(decision F1 and calibration, mapper, generated images), vq (held-out PSNR, code "
        "usage, reconstruction FID); `mmrag eval NAME --help`",
    )
    p.add_argument("what", choices=["ra-cm3", "fromage", "gill", "vq"], help="what to evaluate")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that evaluation")

    p = add(
        "chat",
        cmd_chat,
        "chat over MEMORY (built with --encoder fromage) with the frozen LM: text and images "
        "in, text and retrieved or generated images out; `mmrag chat MEMORY --help`",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="MEMORY and the chat options")

    p = add("demo", cmd_demo, "build the emoji + photos memory and write an HTML report")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument(
        "--limit", type=int, default=None, help="use only the first N emoji (default: all)"
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached memory")
    p.add_argument(
        "--no-chat",
        action="store_true",
        help="skip the scripted FROMAGe / GILL conversation (it builds a second memory with "
        "the fromage encoder)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = add("serve", cmd_serve, "serve MEMORY over HTTP: JSON API (/openapi.json) and web page (/)")
    p.add_argument("memory", help="memory folder (with a token, created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--token-file",
        default=None,
        help="file holding the bearer token that enables writes (default: $MMRAG_TOKEN; "
        "with neither, the memory is served read-only)",
    )
    reads = p.add_mutually_exclusive_group()
    reads.add_argument(
        "--open-reads",
        dest="open_reads",
        action="store_true",
        default=None,
        help="anyone who can reach the port may search and read (default)",
    )
    reads.add_argument(
        "--closed-reads", dest="open_reads", action="store_false", help="reads need the token too"
    )
    p.add_argument(
        "--config",
        default=None,
        help="ServerConfig JSON: upload, pixel, k and batch limits, worker threads",
    )
    _add_memory_writer_options(p)
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    p.add_argument(
        "--generator",
        default=None,
        metavar="DIR",
        help="RA-CM3 model folder for /generate/image and /generate/caption (default: the "
        "shipped checkpoints/ra-cm3 when present)",
    )
    p.add_argument(
        "--no-generator", action="store_true", help="do not load RA-CM3 (/generate/* answer 501)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from mmrag.documents import DocumentError
    from mmrag.memory.memory import MemoryFolderError
    from mmrag.memory.store import StoreError

    try:
        result: int = args.func(args)
        return result
    except (
        CommandError,
        ConfigError,
        DocumentError,
        MemoryFolderError,
        StoreError,
        FileNotFoundError,
        ImportError,
    ) as e:
        print(f"mmrag {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
