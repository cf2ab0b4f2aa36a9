"""The memory endpoints: health, stats, search, documents (add, get, delete), images."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from PIL import Image

from mmrag import __version__
from mmrag.config import RetrieverConfig
from mmrag.documents import Document, DocumentError, Part
from mmrag.server import views
from mmrag.server.bodies import (
    decode_base64,
    decode_image_input,
    decode_upload,
    parse_form,
    parse_json,
    request_kind,
    validation_error,
)
from mmrag.server.context import Access, Context, ContextDep
from mmrag.server.openapi import DOCUMENTS_FORM, SEARCH_FORM, error_responses, request_body
from mmrag.server.schemas import (
    DOC_ID_PATTERN,
    SHA256_PATTERN,
    DeleteResponse,
    DocumentIn,
    DocumentOut,
    DocumentsForm,
    DocumentsRequest,
    DocumentsResponse,
    DocumentStatus,
    HealthResponse,
    SearchRequest,
    SearchResponse,
    StatsResponse,
)

IMMUTABLE = "public, max-age=31536000, immutable"  # images are addressed by their content
DocIdPath = Annotated[str, PathParam(pattern=DOC_ID_PATTERN, description="a document id")]


# --- building requests' library objects (run on the worker threads) -------------------------


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
        ctx.limits.check(doc)
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


async def health() -> HealthResponse:
    """Liveness: always open, reveals nothing about the memory."""
    return HealthResponse(version=__version__)


async def stats(ctx: ContextDep) -> StatsResponse:
    """Counts, encoder, index, limits, and which capabilities are wired."""
    raw = await ctx.run(ctx.service.stats)
    return views.stats(raw, ctx.config, ctx.service.writable, ctx.capabilities.available())


async def search(request: Request, ctx: ContextDep) -> SearchResponse:
    """Top-k documents for a text, an image, or both. JSON (`image_base64`) or a
    multipart form (`image` file); every result carries its id, score and images."""
    start = time.perf_counter()
    service, config = ctx.service, ctx.config
    if request_kind(request) == "json":
        body = await parse_json(request, SearchRequest)
        raw: bytes | str | None = body.image_base64  # decoded on a worker thread
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

    loc = ("body", "image" if isinstance(raw, bytes) else "image_base64")
    image = None if raw is None else await ctx.run(decode_image_input, raw, loc, config)
    vector = await service.encode_query(text, image)
    results, count = await ctx.run(
        service.search_vector, vector, k, body.filters, body.exclude_ids, retriever
    )
    took = round((time.perf_counter() - start) * 1000, 3)
    return SearchResponse(results=views.hits(results), count=count, took_ms=took)


async def get_document(doc_id: DocIdPath, ctx: ContextDep) -> DocumentOut:
    """One stored document: its parts in order (images by URL) and metadata."""
    doc = await ctx.run(ctx.service.get, doc_id)
    if doc is None:
        raise HTTPException(404, f"no document {doc_id}")
    return views.document(doc)


async def image(
    sha256: Annotated[str, PathParam(pattern=SHA256_PATTERN, description="the image's SHA-256")],
    ctx: ContextDep,
    size: Annotated[
        int | None, Query(ge=16, le=1024, description="a PNG thumbnail at most this wide")
    ] = None,
) -> Response:
    """A stored image by the SHA-256 of its bytes: as stored, or a PNG thumbnail."""
    if size is None:
        found = await ctx.run(ctx.service.image, sha256)
        content, media_type = found if found else (None, "")
    else:
        content, media_type = await ctx.run(ctx.service.thumbnail, sha256, size), "image/png"
    if content is None:
        raise HTTPException(404, f"no image {sha256}")
    headers = {"Cache-Control": IMMUTABLE, "ETag": f'"{sha256}-{size or 0}"'}
    return Response(content, media_type=media_type, headers=headers)


async def add_documents(request: Request, ctx: ContextDep) -> DocumentsResponse:
    """Add one or many documents (needs the token). JSON: `documents`, each with `parts`
    or `text`/`image_base64`, and `metadata`. Multipart: `image` files and/or `text`
    fields (paired by position) and one JSON `metadata`. All are checked before any is
    written; documents already stored (same content, same id) are reported `existing`."""
    service, config = ctx.service, ctx.config
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


async def delete_document(doc_id: DocIdPath, ctx: ContextDep) -> DeleteResponse:
    """Delete a document (needs the token); it is gone from results at once."""

    def run() -> tuple[bool, int]:
        return ctx.service.delete(doc_id), ctx.service.count()

    deleted, count = await ctx.run(run)
    if not deleted:
        raise HTTPException(404, f"no document {doc_id}")
    return DeleteResponse(id=doc_id, count=count)


# --- the router ---------------------------------------------------------------------------------


def memory_router(access: Access) -> APIRouter:
    """The memory's endpoints, reads and writes behind `access`'s dependencies."""
    read, write, denied = access.read, access.write, access.read_errors
    router = APIRouter()
    router.add_api_route("/health", health, response_model=HealthResponse, tags=["service"])
    router.add_api_route(
        "/stats",
        stats,
        response_model=StatsResponse,
        dependencies=read,
        tags=["service"],
        responses=error_responses(*denied),
    )
    router.add_api_route(
        "/search",
        search,
        methods=["POST"],
        response_model=SearchResponse,
        dependencies=read,
        tags=["memory"],
        responses=error_responses(400, *denied, 413, 415, 422),
        openapi_extra=request_body(SearchRequest, SEARCH_FORM),
    )
    router.add_api_route(
        "/documents/{doc_id}",
        get_document,
        response_model=DocumentOut,
        dependencies=read,
        tags=["memory"],
        responses=error_responses(*denied, 404, 422),
    )
    router.add_api_route(
        "/images/{sha256}",
        image,
        dependencies=read,
        tags=["memory"],
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}, "image/*": {}}, "description": "the image"},
            **error_responses(*denied, 404, 422),
        },
    )
    router.add_api_route(
        "/documents",
        add_documents,
        methods=["POST"],
        response_model=DocumentsResponse,
        dependencies=write,
        tags=["memory"],
        responses=error_responses(400, 401, 403, 413, 415, 422),
        openapi_extra=request_body(DocumentsRequest, DOCUMENTS_FORM),
    )
    router.add_api_route(
        "/documents/{doc_id}",
        delete_document,
        methods=["DELETE"],
        response_model=DeleteResponse,
        dependencies=write,
        tags=["memory"],
        responses=error_responses(401, 403, 404, 422),
    )
    return router
