"""Request bodies: the size limit, JSON-or-multipart parsing, base64 and safe image decoding."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable, Collection
from typing import Any, Literal, TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmrag.documents import DocumentError, decode_image, json_depth
from mmrag.server.config import ServerConfig

M = TypeVar("M", bound=BaseModel)
FORM_OVERHEAD = 1024 * 1024  # text fields and multipart framing beside one image
READ_CHUNK = 1024 * 1024
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_FORM_JSON_DEPTH = 64  # filters and metadata sent as form fields (deeper is a 422, not a 500)


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"request body over the {limit}-byte limit")


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit_for(path)` bytes, by Content-Length up front
    and by counting as they stream (chunked uploads), before any handler buffers them; and
    answer 408 when the next piece of a body takes more than `read_timeout_s` to arrive (a
    client that announces more than it sends would otherwise hold a worker forever)."""

    def __init__(
        self, app: ASGIApp, limit_for: Callable[[str], int], read_timeout_s: float = 30.0
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                status, message = (
                    (413, f"request body over the {limit}-byte limit")
                    if value.isdigit()
                    else (400, "invalid Content-Length header")
                )
                await _send_error(send, status, message)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                raise HTTPException(
                    408, f"the request body stalled for more than {self.read_timeout_s:g} s"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)  # answered by the app's HTTPException handler
            return message

        await self.app(scope, limited, send)


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"detail": message, "errors": []}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def validation_error(loc: tuple[str | int, ...], msg: str, kind: str = "value_error") -> Exception:
    return RequestValidationError([{"loc": loc, "msg": msg, "type": kind}])


def _reraise(e: ValidationError, prefix: tuple[str | int, ...]) -> RequestValidationError:
    return RequestValidationError(
        [{**err, "loc": (*prefix, *err["loc"])} for err in e.errors(include_input=False)]
    )


async def _read_upload(upload: UploadFile, field: str, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await upload.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"{field}: file over the {limit}-byte upload limit")
        chunks.append(chunk)
    return b"".join(chunks)


def request_kind(request: Request) -> Literal["json", "form"]:
    """Which body parser applies; anything but JSON or a form is a 415."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        return "json"
    if content_type in FORM_TYPES:
        return "form"
    raise HTTPException(
        415,
        "send application/json, multipart/form-data or application/x-www-form-urlencoded, "
        f"not {content_type or 'nothing'}",
    )


DISCONNECTED = "the client disconnected before the whole request body arrived"


async def parse_json(request: Request, model: type[M]) -> M:
    try:
        body = await request.body()
    except ClientDisconnect:  # nobody reads the answer; a 400 keeps it out of the error log
        raise HTTPException(400, DISCONNECTED) from None
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _reraise(e, ("body",)) from None


async def parse_form(
    request: Request,
    model: type[M],
    config: ServerConfig,
    files: Collection[str] = (),
    json_fields: Collection[str] = (),
    lists: Collection[str] = (),
    max_files: int = 1,
) -> tuple[M, dict[str, list[bytes]]]:
    """A multipart form as `model`, plus its uploaded files by field name. `files` name the
    file fields, `json_fields` those sent as JSON text (objects and lists: filters, metadata),
    `lists` those that may repeat."""
    try:
        async with request.form(max_files=max_files, max_fields=1000) as form:  # closes files
            data, uploads = await _read_form(form, config, files, json_fields, lists)
    except ClientDisconnect:
        raise HTTPException(400, DISCONNECTED) from None
    for key, got in uploads.items():
        if key not in lists and len(got) > 1:
            raise validation_error(("body", key), "only one file may be sent")
    try:
        return model.model_validate(data), uploads
    except ValidationError as e:
        raise _reraise(e, ("body",)) from None


async def _read_form(
    form: FormData,
    config: ServerConfig,
    files: Collection[str],
    json_fields: Collection[str],
    lists: Collection[str],
) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    data: dict[str, Any] = {}
    uploads: dict[str, list[bytes]] = {}
    for key, value in form.multi_items():
        if key in files:
            if not isinstance(value, UploadFile):
                raise validation_error(("body", key), "must be a file upload")
            uploads.setdefault(key, []).append(
                await _read_upload(value, key, config.max_upload_bytes)
            )
            continue
        if isinstance(value, UploadFile):
            raise validation_error(("body", key), "a file was sent for a text field")
        if value == "" and key not in lists:
            continue  # an empty form field is an absent one (as browsers send them)
        if key in lists:
            data.setdefault(key, []).append(value)
        elif key in data:
            raise validation_error(("body", key), "given more than once")
        else:
            data[key] = _json_field(key, value) if key in json_fields else value
    return data, uploads


def _json_field(key: str, value: str) -> Any:
    too_deep = validation_error(
        ("body", key), f"JSON nested deeper than {MAX_FORM_JSON_DEPTH} levels", "json_invalid"
    )
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise validation_error(("body", key), f"must be JSON: {e.msg}", "json_invalid") from None
    except RecursionError:  # past Python's own limit
        raise too_deep from None
    if json_depth(parsed) > MAX_FORM_JSON_DEPTH:
        raise too_deep
    return parsed


def decode_base64(text: str, loc: tuple[str | int, ...], limit: int) -> bytes:
    if len(text) > (limit + 2) // 3 * 4:
        raise HTTPException(413, f"{'.'.join(map(str, loc))}: image over the {limit}-byte limit")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise validation_error(loc, "is not valid base64", "base64_invalid") from None


def decode_upload(data: bytes, loc: tuple[str | int, ...], config: ServerConfig) -> Image.Image:
    """An uploaded image, fully decoded as RGB, within the byte and pixel limits. The pixel
    limit is checked from the header, before any decompression."""
    where = ".".join(map(str, loc))
    if len(data) > config.max_upload_bytes:
        raise HTTPException(413, f"{where}: image over the {config.max_upload_bytes}-byte limit")
    try:
        return decode_image(data, source=where, max_pixels=config.max_pixels)
    except DocumentError as e:
        raise validation_error(loc, e.reason, "image_invalid") from None


def decode_image_input(
    raw: bytes | str | None, loc: tuple[str | int, ...], config: ServerConfig
) -> Image.Image | None:
    """An image given as uploaded bytes or as a base64 string, decoded within the limits
    (call it on a worker thread: decoding costs CPU)."""
    if isinstance(raw, str):
        raw = decode_base64(raw, loc, config.max_upload_bytes)
    return None if raw is None else decode_upload(raw, loc, config)
