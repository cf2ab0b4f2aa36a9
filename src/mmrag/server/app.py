"""`create_app`: the FastAPI application. Handlers validate, call the library, serialise.

One process holds the memory: opened for writing (mode "a", the memory's single writer) only
when a token is configured, else read-only. Library calls run on a fixed pool of threads;
generation runs on one thread of its own, so a slow model never starves searches.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from threadpoolctl import threadpool_limits

from mmrag import __version__
from mmrag.config import RetrieverConfig
from mmrag.encoders.base import EncoderSpec
from mmrag.server.auth import BearerAuth, TokenError
from mmrag.server.bodies import FORM_OVERHEAD, BodyLimit
from mmrag.server.capabilities import Capabilities, CapabilitiesFactory
from mmrag.server.config import ServerConfig
from mmrag.server.context import Access, Context
from mmrag.server.generation_api import generation_router
from mmrag.server.memory_api import memory_router
from mmrag.server.openapi import install_openapi
from mmrag.server.service import MemoryService

STATIC = resources.files("mmrag.server").joinpath("static")
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
]
BIG_BODY_PATHS = ("/documents", "/chat")


class SecurityHeaders:
    """ASGI middleware: no sniffing, no framing, a strict Content-Security-Policy."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


# --- error answers -----------------------------------------------------------------------------


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # one route per method: list the methods of all of them
        methods: set[str] = set()
        for route in request.app.routes:
            regex, allowed = getattr(route, "path_regex", None), getattr(route, "methods", None)
            if regex is not None and allowed and regex.match(request.url.path):
                methods |= allowed
        headers["Allow"] = ", ".join(sorted(methods))
    return JSONResponse(
        {"detail": str(exc.detail), "errors": []}, status_code=exc.status_code, headers=headers
    )


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": [x if isinstance(x, int) else str(x) for x in e.get("loc", ())],
            "msg": str(e.get("msg", "invalid")),
            "type": str(e.get("type", "value_error")),
        }
        for e in exc.errors()
    ]
    shown = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return JSONResponse({"detail": f"invalid request: {shown}{more}", "errors": errors}, 422)


# --- the app ---------------------------------------------------------------------------------


def create_app(
    memory_path: str | Path,
    *,
    config: ServerConfig | None = None,
    token: str | None = None,
    encoder: EncoderSpec | None = None,
    retriever_config: RetrieverConfig | None = None,
    capabilities: Capabilities | CapabilitiesFactory | None = None,
) -> FastAPI:
    """The service over the memory at `memory_path`, opened now.

    With a `token`, writes are enabled (the memory is opened, or created with `encoder`, as its
    single writer) and need `Authorization: Bearer <token>`; without one it is opened
    read-only. `config.open_reads=False` makes reads need the token too. `capabilities` (or a
    factory given the opened memory and retriever) wires generation and chat."""
    config = config or ServerConfig()
    auth = BearerAuth(token)
    if not config.open_reads and not auth.configured:
        raise TokenError("closed reads need a token (set MMRAG_TOKEN or --token-file)")
    service = MemoryService.open(
        memory_path,
        writable=auth.configured,
        encoder=encoder,
        retriever_config=retriever_config,
        max_pixels=config.max_pixels,
        thumbnail_cache=config.thumbnail_cache,
        batching=config.batching(),
    )
    if callable(capabilities):
        capabilities = capabilities(service.memory, service.retriever)
    ctx = Context(
        service=service,
        capabilities=capabilities or Capabilities(),
        config=config,
        auth=auth,
        pool=ThreadPoolExecutor(
            config.threads_to_run(),
            thread_name_prefix="mmrag-worker",
            initializer=_limit_openmp,
            initargs=(config.openmp_threads,),
        ),
        generation_pool=ThreadPoolExecutor(1, thread_name_prefix="mmrag-generate"),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            ctx.pool.shutdown(wait=True)
            ctx.generation_pool.shutdown(wait=True)
            service.close()

    app = FastAPI(
        title="mmrag",
        version=__version__,
        summary="Search, generate and chat over a multimodal memory.",
        docs_url=None,  # the Swagger / ReDoc pages load assets from CDNs; the schema is enough
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.mmrag = ctx
    upload_limit = config.max_upload_bytes * 4 // 3 + FORM_OVERHEAD

    def limit_for(path: str) -> int:
        return config.max_request_bytes if path.startswith(BIG_BODY_PATHS) else upload_limit

    app.add_middleware(BodyLimit, limit_for=limit_for, read_timeout_s=config.body_read_timeout_s)
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    access = Access.of(auth, config.open_reads)
    _page_routes(app)
    app.include_router(memory_router(access))
    app.include_router(generation_router(access))
    install_openapi(app)
    return app


def _limit_openmp(threads: int) -> None:
    """Cap the OpenMP teams (FAISS, torch) that library calls start from this worker thread;
    the cap is per thread, so each worker sets its own."""
    threadpool_limits(threads, user_api="openmp")


def _page_routes(app: FastAPI) -> None:
    page = STATIC.joinpath("index.html").read_bytes()
    assets = {name: STATIC.joinpath(name).read_bytes() for name in STATIC_FILES}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    def asset_route(name: str) -> None:
        async def asset() -> Response:
            return Response(assets[name], media_type=STATIC_FILES[name])

        app.add_api_route(f"/static/{name}", asset, methods=["GET"], include_in_schema=False)

    for name in STATIC_FILES:
        asset_route(name)
