"""`mmrag serve`: the memory (and the generators, when present) over HTTP."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from mmrag.cli.common import EXIT_OK, AddCommand
from mmrag.cli.memory import add_memory_writer_options, encoder_spec

log = logging.getLogger("mmrag")


def cmd_serve(args: argparse.Namespace) -> int:
    from mmrag.server.config import ServerConfig
    from mmrag.server.run import serve

    config = ServerConfig.load(args.config) if args.config else ServerConfig()
    if args.open_reads is not None:
        config = config.replace(open_reads=args.open_reads)
    batching = {
        "encode_max_batch": args.encode_max_batch,
        "encode_max_wait_ms": args.encode_max_wait_ms,
        "encode_workers": args.encode_workers,
    }
    config = config.replace(**{k: v for k, v in batching.items() if v is not None})
    capabilities = _generation_capabilities(args)
    serve(
        args.memory,
        host=args.host,
        port=args.port,
        token_file=args.token_file,
        config=config,
        encoder=encoder_spec(args),
        access_log=not args.no_access_log,
        capabilities=capabilities,
    )
    return EXIT_OK


def _generation_capabilities(args: argparse.Namespace) -> Any:
    """RA-CM3 for /generate/*: --generator DIR, else the shipped model when present; and the
    chat for /chat (loaded on its first request) unless --no-chat."""
    from mmrag.server.chat_backend import with_chat

    generation = _ra_cm3_capabilities(args)
    return generation if args.no_chat else with_chat(generation)


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


def add_commands(add: AddCommand) -> None:
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
    p.add_argument(
        "--encode-max-batch",
        type=int,
        default=None,
        metavar="N",
        help="concurrent queries' texts (and images) encoded in one forward, at most N "
        "(default 32; 1 encodes each alone)",
    )
    p.add_argument(
        "--encode-max-wait-ms",
        type=float,
        default=None,
        metavar="MS",
        help="wait up to MS for more queries before encoding (default 0: take what is "
        "queued; batches form under load while the previous forward runs)",
    )
    p.add_argument(
        "--encode-workers",
        type=int,
        default=None,
        metavar="N",
        help="encoder worker threads, each running whole batches (default 0: one per core, "
        "at most 4)",
    )
    add_memory_writer_options(p)
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
    p.add_argument("--no-chat", action="store_true", help="no chat (/chat answers 501)")
