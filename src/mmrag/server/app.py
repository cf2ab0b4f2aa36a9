"""`create_app`: the FastAPI application. Handlers validate, call the library, serialise.

One process holds the memory: opened for writing (mode "a", the memory's single writer) only
when a token is configured, else read-only. Library calls run on a fixed pool of threads;
generation runs on one thread of its own, so a slow model never starves searches.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmrag import __version__
from mmrag.config import RetrieverConfig
from mmrag.documents import Document, DocumentError, Part
from mmrag.encoders.base import EncoderSpec
from mmrag.server import views
from mmrag.server.auth import BearerAuth, TokenError
from mmrag.server.bodies import (
    FORM_OVERHEAD,
    BodyLimit,
    decode_base64,
    decode_upload,
    parse_form,
    parse_json,
    request_kind,
    validation_error,
)
from mmrag.server.capabilities import (
    MISSING,
    Capabilities,
    CapabilitiesFactory,
    ChatTurn,
    GenerationOptions,
)
from mmrag.server.config import ServerConfig
from mmrag.server.schemas import (
    DOC_ID_PATTERN,
    SHA256_PATTERN,
    CaptionRequest,
    CaptionResponse,
    ChatMessageOut,
    ChatPartOut,
    ChatRequest,
    ChatResponse,
    DeleteResponse,
    DocumentIn,
    DocumentOut,
    DocumentsForm,
    DocumentsRequest,
    DocumentsResponse,
    DocumentStatus,
    ErrorResponse,
    HealthResponse,
    ImageGenerationRequest,
    ImageGenerationResponse,
    SearchRequest,
    SearchResponse,
    StatsResponse,
)
from mmrag.server.service import MemoryService

T = TypeVar("T")
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
IMMUTABLE = "public, max-age=31536000, immutable"  # images are addressed by their content
BIG_BODY_PATHS = ("/documents", "/chat")
MANUAL_BODIES: list[type[BaseModel]] = [SearchRequest, DocumentsRequest, CaptionRequest]
DocIdPath = Annotated[str, PathParam(pattern=DOC_ID_PATTERN, description="a document id")]


def _form_schema(
    properties: dict[str, Any],
    required: list[str] | None = None,
    one_of: list[str] | None = None,
) -> dict[str, Any]:
    """A form's schema; `one_of`: at least one of these fields must be sent."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    if one_of:
        schema["anyOf"] = [{"required": [name]} for name in one_of]
    return schema


_FILE = {"type": "string", "format": "binary"}
_JSON_TEXT = {"type": "string", "description": "JSON text"}
_GENERATION_FORM = {
    "k": {"type": "integer", "minimum": 0, "maximum": 100},
    "filters": {**_JSON_TEXT, "description": "JSON object of metadata filters"},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
}
_NON_BLANK = {"type": "string", "pattern": r"\S"}
SEARCH_FORM = _form_schema(
    {
        "text": _NON_BLANK,
        "image": _FILE,
        "k": {"type": "integer", "minimum": 1, "maximum": 100},
        "filters": {**_JSON_TEXT, "description": "JSON object of metadata filters"},
        "exclude_ids": {**_JSON_TEXT, "description": "JSON list of document ids"},
        "mmr_lambda": {"type": "number", "minimum": 0, "maximum": 1},
        "relevance_cap": {"type": "number", "minimum": -1, "maximum": 1},
        "redundancy_threshold": {"type": "number", "minimum": -1, "maximum": 1},
    },
    one_of=["text", "image"],
)
DOCUMENTS_FORM = _form_schema(
    {
        "image": {"type": "array", "items": _FILE, "description": "one document per image"},
        "text": {
            "type": "array",
            "items": _NON_BLANK,
            "description": "one caption per image (or one document per text, with no images)",
        },
        "metadata": {**_JSON_TEXT, "description": "JSON object given to every document"},
    },
    one_of=["image", "text"],
)
CAPTION_FORM = _form_schema(
    {"image": _FILE, **_GENERATION_FORM, "max_tokens": {"type": "integer", "minimum": 1}},
    required=["image"],
)


def _body(model: type[BaseModel], form: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI request body accepted as JSON (`model`) or as a form: multipart, or
    urlencoded when no file is required (the form's files left out)."""
    content: dict[str, Any] = {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
        "multipart/form-data": {"schema": form},
    }
    if not form.get("required"):
        fields = {k: v for k, v in form["properties"].items() if "binary" not in json.dumps(v)}
        urlencoded = {**form, "properties": fields}
        urlencoded["anyOf"] = [a for a in form.get("anyOf", []) if a["required"][0] in fields]
        if not urlencoded["anyOf"]:
            del urlencoded["anyOf"]
        content["application/x-www-form-urlencoded"] = {"schema": urlencoded}
    return {"requestBody": {"required": True, "content": content}}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "malformed request",
        401: "missing or wrong bearer token",
        403: "writes are disabled (no token configured)",
        404: "not found",
        413: "body, image or batch over a limit",
        415: "unsupported content type",
        422: "invalid input",
        501: "capability not built yet",
    }
    return {c: {"model": ErrorResponse, "description": descriptions[c]} for c in codes}


@dataclasses.dataclass
class Context:
    """What the handlers share: the memory, the capabilities, limits, access, the threads."""

    service: MemoryService
    capabilities: Capabilities
    config: ServerConfig
    auth: BearerAuth
    pool: ThreadPoolExecutor
    generation_pool: ThreadPoolExecutor

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    async def generate(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.generation_pool, functools.partial(fn, *args))

    def check_k(self, k: int, loc: str = "k") -> int:
        if k > self.config.max_k:
            raise validation_error(("body", loc), f"must be <= {self.config.max_k}")
        return k

    def check_text(self, text: str | None, loc: tuple[str | int, ...]) -> str | None:
        if text is not None and len(text) > self.config.max_text_chars:
            raise validation_error(loc, f"longer than {self.config.max_text_chars} characters")
        return text

    def options(self, body: Any, max_tokens: int = 64) -> GenerationOptions:
        return GenerationOptions(
            k=self.check_k(body.k),
            filters=body.filters or None,
            seed=body.seed,
            max_tokens=max_tokens,
        )

    def capability(self, name: str) -> Any:
        found = getattr(self.capabilities, name)
        if found is None:
            key = {"image_generator": "image_generation", "captioner": "captioning"}.get(name, name)
            raise HTTPException(501, MISSING[key])
        return found


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


# --- building requests' library objects (run on the worker threads) -------------------------


def _query_image(ctx: Context, raw: bytes | None, loc: tuple[str | int, ...]) -> Image.Image | None:
    return None if raw is None else decode_upload(raw, loc, ctx.config)


def _document(
    ctx: Context,
    parts: list[tuple[str, str | bytes]],
    metadata: dict[str, Any],
    loc: tuple[str | int, ...],
) -> tuple[Document, list[Image.Image]]:
    """A Document from ("text", str) / ("image", bytes) parts, its images decoded."""
    built: list[Part] = []
    images: list[Image.Image] = []
    for j, (kind, value) in enumerate(parts):
        if kind == "text":
            assert isinstance(value, str)
            built.append(Part.of_text(ctx.check_text(value, (*loc, j)) or ""))
        else:
            assert isinstance(value, bytes)
            images.append(decode_upload(value, (*loc, j), ctx.config))
            built.append(Part.of_image(data=value))
    try:
        doc = Document(parts=tuple(built), metadata=metadata)
    except DocumentError as e:
        raise validation_error(loc, str(e)) from None
    if not doc.text and not images:
        raise validation_error(loc, "a document needs non-blank text or an image")
    return doc, images


def _json_documents(
    ctx: Context, body: DocumentsRequest
) -> list[tuple[Document, list[Image.Image]]]:
    out = []
    for i, spec in enumerate(body.documents):
        loc: tuple[str | int, ...] = ("body", "documents", i)
        out.append(_document(ctx, _json_parts(ctx, spec, loc), spec.metadata, loc))
    return out


def _json_parts(
    ctx: Context, spec: DocumentIn, loc: tuple[str | int, ...]
) -> list[tuple[str, str | bytes]]:
    limit = ctx.config.max_upload_bytes
    if spec.parts is not None:
        if spec.text is not None or spec.image_base64 is not None:
            raise validation_error(loc, "give either 'parts' or 'text'/'image_base64'")
        parts: list[tuple[str, str | bytes]] = []
        for j, part in enumerate(spec.parts):
            if (part.text is None) == (part.image_base64 is None):
                raise validation_error((*loc, "parts", j), "give exactly one of text, image_base64")
            if part.text is not None:
                parts.append(("text", part.text))
            else:
                raw = decode_base64(part.image_base64 or "", (*loc, "parts", j), limit)
                parts.append(("image", raw))
        return parts
    parts = []
    if spec.image_base64 is not None:
        parts.append(("image", decode_base64(spec.image_base64, (*loc, "image_base64"), limit)))
    if spec.text is not None:
        parts.append(("text", spec.text))
    if not parts:
        raise validation_error(loc, "a document needs 'parts', 'text' or 'image_base64'")
    return parts


def _form_documents(
    ctx: Context, form: DocumentsForm, images: list[bytes]
) -> list[tuple[Document, list[Image.Image]]]:
    """Multipart: one document per image (captioned by the text of the same position when
    as many texts are given), or one per text when no image is sent."""
    texts = form.text
    if images and texts and len(texts) != len(images):
        raise validation_error(
            ("body", "text"), f"{len(texts)} texts for {len(images)} images: give one per image"
        )
    if not images and not texts:
        raise validation_error(("body",), "send 'image' files and/or 'text' fields")
    out = []
    for i in range(max(len(images), len(texts))):
        parts: list[tuple[str, str | bytes]] = []
        if images:
            parts.append(("image", images[i]))
        if texts:
            parts.append(("text", texts[i]))
        out.append(_document(ctx, parts, form.metadata, ("body", "documents", i)))
    return out


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
    )
    if callable(capabilities):
        capabilities = capabilities(service.memory, service.retriever)
    ctx = Context(
        service=service,
        capabilities=capabilities or Capabilities(),
        config=config,
        auth=auth,
        pool=ThreadPoolExecutor(config.worker_threads, thread_name_prefix="mmrag-worker"),
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

    app.add_middleware(BodyLimit, limit_for=limit_for)
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    read: list[DependsParam] = [] if config.open_reads else [Depends(auth.dependency("reading"))]
    write: list[DependsParam] = [Depends(auth.dependency("writing"))]
    read_errors = () if config.open_reads else (401, 403)
    _page_routes(app)
    _memory_routes(app, ctx, read, write, read_errors)
    _generation_routes(app, ctx, read, read_errors)
    _install_openapi(app)
    return app


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


def _memory_routes(
    app: FastAPI,
    ctx: Context,
    read: list[DependsParam],
    write: list[DependsParam],
    read_errors: tuple[int, ...],
) -> None:
    service, config = ctx.service, ctx.config

    @app.get("/health", response_model=HealthResponse, tags=["service"])
    async def health() -> HealthResponse:
        """Liveness: always open, reveals nothing about the memory."""
        return HealthResponse(version=__version__)

    @app.get(
        "/stats",
        response_model=StatsResponse,
        dependencies=read,
        tags=["service"],
        responses=_errors(*read_errors),
    )
    async def stats() -> StatsResponse:
        """Counts, encoder, index, limits, and which capabilities are wired."""
        raw = await ctx.run(service.stats)
        return views.stats(raw, config, service.writable, ctx.capabilities.available())

    @app.post(
        "/search",
        response_model=SearchResponse,
        dependencies=read,
        tags=["memory"],
        responses=_errors(400, *read_errors, 413, 415, 422),
        openapi_extra=_body(SearchRequest, SEARCH_FORM),
    )
    async def search(request: Request) -> SearchResponse:
        """Top-k documents for a text, an image, or both. JSON (`image_base64`) or a
        multipart form (`image` file); every result carries its id, score and images."""
        start = time.perf_counter()
        if request_kind(request) == "json":
            body = await parse_json(request, SearchRequest)
            raw = (
                decode_base64(body.image_base64, ("body", "image_base64"), config.max_upload_bytes)
                if body.image_base64 is not None
                else None
            )
        else:
            body, files = await parse_form(
                request,
                SearchRequest,
                config,
                files={"image"},
                json_fields={"filters", "exclude_ids"},
            )
            raw = files["image"][0] if "image" in files else None
            if raw is not None and body.image_base64 is not None:
                raise validation_error(("body", "image"), "send the image once")
        text = (ctx.check_text(body.text, ("body", "text")) or "").strip() or None
        if text is None and raw is None:
            raise validation_error(("body",), "give a text, an image, or both")
        k = ctx.check_k(body.k)
        options = (body.mmr_lambda, body.relevance_cap, body.redundancy_threshold)
        retriever = (
            None
            if options == (None, None, None)
            else RetrieverConfig(
                k=k,
                mmr_lambda=body.mmr_lambda,
                relevance_cap=body.relevance_cap,
                redundancy_threshold=body.redundancy_threshold,
            )
        )

        def run() -> tuple[list[Any], int]:
            image = _query_image(ctx, raw, ("body", "image"))
            results = service.search(text, image, k, body.filters, body.exclude_ids, retriever)
            return results, service.count()

        results, count = await ctx.run(run)
        took = round((time.perf_counter() - start) * 1000, 3)
        return SearchResponse(results=views.hits(results), count=count, took_ms=took)

    @app.get(
        "/documents/{doc_id}",
        response_model=DocumentOut,
        dependencies=read,
        tags=["memory"],
        responses=_errors(*read_errors, 404, 422),
    )
    async def get_document(doc_id: DocIdPath) -> DocumentOut:
        """One stored document: its parts in order (images by URL) and metadata."""
        doc = await ctx.run(service.get, doc_id)
        if doc is None:
            raise HTTPException(404, f"no document {doc_id}")
        return views.document(doc)

    @app.get(
        "/images/{sha256}",
        dependencies=read,
        tags=["memory"],
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}, "image/*": {}}, "description": "the image"},
            **_errors(*read_errors, 404, 422),
        },
    )
    async def image(
        sha256: Annotated[
            str, PathParam(pattern=SHA256_PATTERN, description="the image's SHA-256")
        ],
        size: Annotated[
            int | None, Query(ge=16, le=1024, description="a PNG thumbnail at most this wide")
        ] = None,
    ) -> Response:
        """A stored image by the SHA-256 of its bytes: as stored, or a PNG thumbnail."""
        if size is None:
            found = await ctx.run(service.image, sha256)
            content, media_type = found if found else (None, "")
        else:
            content, media_type = await ctx.run(service.thumbnail, sha256, size), "image/png"
        if content is None:
            raise HTTPException(404, f"no image {sha256}")
        headers = {"Cache-Control": IMMUTABLE, "ETag": f'"{sha256}-{size or 0}"'}
        return Response(content, media_type=media_type, headers=headers)

    @app.post(
        "/documents",
        response_model=DocumentsResponse,
        dependencies=write,
        tags=["memory"],
        responses=_errors(400, 401, 403, 413, 415, 422),
        openapi_extra=_body(DocumentsRequest, DOCUMENTS_FORM),
    )
    async def add_documents(request: Request) -> DocumentsResponse:
        """Add one or many documents (needs the token). JSON: `documents`, each with `parts`
        or `text`/`image_base64`, and `metadata`. Multipart: `image` files and/or `text`
        fields (paired by position) and one JSON `metadata`. All are checked before any is
        written; documents already stored (same content, same id) are reported `existing`."""
        prepare: Callable[[], list[tuple[Document, list[Image.Image]]]]
        if request_kind(request) == "json":
            body = await parse_json(request, DocumentsRequest)
            count = len(body.documents)
            prepare = functools.partial(_json_documents, ctx, body)
        else:
            form, files = await parse_form(
                request,
                DocumentsForm,
                config,
                files={"image"},
                json_fields={"metadata"},
                lists={"text", "image"},
                max_files=config.max_batch_documents,
            )
            count = max(len(files.get("image", [])), len(form.text))
            prepare = functools.partial(_form_documents, ctx, form, files.get("image", []))
        if count > config.max_batch_documents:
            raise HTTPException(
                413, f"{count} documents: at most {config.max_batch_documents} per request"
            )

        def run() -> tuple[list[str], list[bool], int]:
            prepared = prepare()
            docs = [d for d, _ in prepared]
            new = service.add(docs, [imgs for _, imgs in prepared])
            return [d.id for d in docs], new, service.count()

        ids, new, total = await ctx.run(run)
        statuses = [
            DocumentStatus(id=i, status="added" if n else "existing")
            for i, n in zip(ids, new, strict=True)
        ]
        return DocumentsResponse(
            documents=statuses, added=sum(new), existing=len(new) - sum(new), count=total
        )

    @app.delete(
        "/documents/{doc_id}",
        response_model=DeleteResponse,
        dependencies=write,
        tags=["memory"],
        responses=_errors(401, 403, 404, 422),
    )
    async def delete_document(doc_id: DocIdPath) -> DeleteResponse:
        """Delete a document (needs the token); it is gone from results at once."""

        def run() -> tuple[bool, int]:
            return service.delete(doc_id), service.count()

        deleted, count = await ctx.run(run)
        if not deleted:
            raise HTTPException(404, f"no document {doc_id}")
        return DeleteResponse(id=doc_id, count=count)


def _generation_routes(
    app: FastAPI, ctx: Context, read: list[DependsParam], read_errors: tuple[int, ...]
) -> None:
    config = ctx.config

    @app.post(
        "/generate/image",
        response_model=ImageGenerationResponse,
        dependencies=read,
        tags=["generation"],
        responses=_errors(*read_errors, 413, 422, 501),
    )
    async def generate_image(body: ImageGenerationRequest) -> ImageGenerationResponse:
        """Caption → image (RA-CM3): a PNG and the documents retrieved as its evidence."""
        generator = ctx.capability("image_generator")
        ctx.check_text(body.prompt, ("body", "prompt"))
        result = await ctx.generate(generator.generate_image, body.prompt, ctx.options(body))
        return ImageGenerationResponse(
            image=views.png(result.image), evidence=views.hits(result.evidence)
        )

    @app.post(
        "/generate/caption",
        response_model=CaptionResponse,
        dependencies=read,
        tags=["generation"],
        responses=_errors(400, *read_errors, 413, 415, 422, 501),
        openapi_extra=_body(CaptionRequest, CAPTION_FORM),
    )
    async def generate_caption(request: Request) -> CaptionResponse:
        """Image → caption (RA-CM3): the caption and the documents retrieved as evidence.
        JSON (`image_base64`) or a multipart form (`image` file)."""
        captioner = ctx.capability("captioner")
        if request_kind(request) == "json":
            body = await parse_json(request, CaptionRequest)
            raw = (
                decode_base64(body.image_base64, ("body", "image_base64"), config.max_upload_bytes)
                if body.image_base64 is not None
                else None
            )
        else:
            body, files = await parse_form(
                request, CaptionRequest, config, files={"image"}, json_fields={"filters"}
            )
            raw = files["image"][0] if "image" in files else None
        if raw is None:
            raise validation_error(("body", "image"), "an image is required")
        image = await ctx.run(decode_upload, raw, ("body", "image"), config)
        result = await ctx.generate(captioner.caption, image, ctx.options(body, body.max_tokens))
        return CaptionResponse(caption=result.text, evidence=views.hits(result.evidence))

    @app.post(
        "/chat",
        response_model=ChatResponse,
        dependencies=read,
        tags=["generation"],
        responses=_errors(*read_errors, 413, 422, 501),
    )
    async def chat(body: ChatRequest) -> ChatResponse:
        """A conversation with interleaved text and images (FROMAGe / GILL). The reply may
        show images retrieved from the memory or generated, and carries its evidence."""
        model = ctx.capability("chat")
        turns = await ctx.run(_chat_turns, ctx, body)
        reply = await ctx.generate(model.chat, turns, ctx.options(body, body.max_tokens))
        return ChatResponse(
            message=ChatMessageOut(parts=[_chat_part(p) for p in reply.parts]),
            evidence=views.hits(reply.evidence),
        )


def _chat_turns(ctx: Context, body: ChatRequest) -> list[ChatTurn]:
    turns = []
    for i, message in enumerate(body.messages):
        parts: list[str | Image.Image] = []
        for j, part in enumerate(message.parts):
            loc = ("body", "messages", i, "parts", j)
            if (part.text is None) == (part.image_base64 is None):
                raise validation_error(loc, "give exactly one of text, image_base64")
            if part.text is not None:
                parts.append(ctx.check_text(part.text, loc) or "")
            else:
                raw = decode_base64(part.image_base64 or "", loc, ctx.config.max_upload_bytes)
                parts.append(decode_upload(raw, loc, ctx.config))
        turns.append(ChatTurn(role=message.role, parts=parts))
    if turns[-1].role != "user":
        raise validation_error(("body", "messages"), "the last message must be the user's")
    return turns


def _chat_part(part: Any) -> ChatPartOut:
    if isinstance(part, str):
        return ChatPartOut(type="text", text=part)
    if isinstance(part, Image.Image):
        return ChatPartOut(type="image", generated=views.png(part))
    found = views.hit(part)
    return ChatPartOut(
        type="image", document_id=found.id, image=found.images[0] if found.images else None
    )


def _install_openapi(app: FastAPI) -> None:
    """The generated schema, plus the models of the bodies parsed by hand (JSON or form)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            _, defs = models_json_schema(
                [(m, "validation") for m in MANUAL_BODIES],
                ref_template="#/components/schemas/{model}",
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                defs.get("$defs", {})
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
