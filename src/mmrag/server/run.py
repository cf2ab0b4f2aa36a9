"""`serve`: run the app with uvicorn in one process (the single writer), on loopback by default."""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
from collections.abc import Mapping
from pathlib import Path

import uvicorn

from mmrag.encoders.base import EncoderSpec
from mmrag.server.app import create_app
from mmrag.server.auth import TOKEN_ENV, load_token
from mmrag.server.capabilities import Capabilities, CapabilitiesFactory
from mmrag.server.config import ServerConfig

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settle_heap() -> None:
    """Move everything alive once the app is built (models, modules, the memory) out of the
    garbage collector's sight. Otherwise every full collection under load walks the millions
    of objects torch and transformers hold, with the GIL held, stalling every request in
    flight: those pauses set the p99 (docs/benchmarks.md, "Serving"). Frozen
    objects are never collected, which is what a server's startup state should be."""
    gc.collect()
    gc.freeze()
    log.debug("gc: %d objects frozen at startup", gc.get_freeze_count())


def serve(
    memory: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token_file: str | Path | None = None,
    config: ServerConfig | None = None,
    encoder: EncoderSpec | None = None,
    capabilities: Capabilities | CapabilitiesFactory | None = None,
    access_log: bool = True,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Serve MEMORY over HTTP until interrupted (Ctrl-C / SIGTERM close the memory cleanly).

    The token comes from `token_file`, else from $MMRAG_TOKEN; without one the memory is
    served read-only."""
    config = config or ServerConfig()
    token = load_token(token_file, environ)
    app = create_app(memory, config=config, token=token, encoder=encoder, capabilities=capabilities)
    settle_heap()
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=1,  # one process: the memory has exactly one writer
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    announce = logging.getLogger("uvicorn.error")  # configured by uvicorn.Config
    writes = "enabled (bearer token)" if token else f"disabled (no {TOKEN_ENV} / --token-file)"
    reads = "open" if config.open_reads else "closed (bearer token)"
    announce.info("mmrag: serving %s; writes %s; reads %s", memory, writes, reads)
    if not is_loopback(host):
        announce.warning(
            "mmrag: listening on %s, reachable from other machines; reads are %s and traffic "
            "is not encrypted (put a TLS proxy in front)",
            host,
            reads,
        )
    with contextlib.suppress(KeyboardInterrupt):  # re-raised by uvicorn after a clean shutdown
        uvicorn.Server(uv_config).run()
