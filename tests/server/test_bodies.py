"""Reading request bodies: a client that leaves mid-body is a 400, not a server error."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import HTTPException
from pydantic import BaseModel
from starlette.requests import Request
from starlette.types import Message

from mmrag.server.bodies import DISCONNECTED, parse_form, parse_json
from mmrag.server.config import ServerConfig


class Body(BaseModel):
    text: str


def _leaving_request(content_type: bytes, first: bytes) -> Request:
    """A request that sends half its body, then disconnects."""
    messages: list[Message] = [
        {"type": "http.request", "body": first, "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return messages.pop(0)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/search",
        "headers": [(b"content-type", content_type), (b"content-length", b"100")],
    }
    return Request(scope, receive)


def test_a_json_body_cut_short_is_a_400() -> None:
    with pytest.raises(HTTPException) as info:
        asyncio.run(parse_json(_leaving_request(b"application/json", b'{"te'), Body))
    assert (info.value.status_code, info.value.detail) == (400, DISCONNECTED)


def test_a_form_cut_short_is_a_400() -> None:
    part = b'--x\r\nContent-Disposition: form-data; name="text"\r\n\r\nhal'
    request = _leaving_request(b"multipart/form-data; boundary=x", part)
    with pytest.raises(HTTPException) as info:
        asyncio.run(parse_form(request, Body, ServerConfig()))
    assert info.value.status_code == 400
