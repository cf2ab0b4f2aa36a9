"""The OpenAPI schema: hand-written form bodies, error answers, and the models of bodies
parsed by hand (accepted as JSON or as a form)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from mmrag.server.schemas import CaptionRequest, DocumentsRequest, ErrorResponse, SearchRequest

MANUAL_BODIES: list[type[BaseModel]] = [SearchRequest, DocumentsRequest, CaptionRequest]


def _form_schema(
    properties: dict[str, Any],
    required: list[str] | None = None,
    any_of: list[str] | None = None,
) -> dict[str, Any]:
    """A form's schema; `any_of`: at least one of these fields must be sent."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    if any_of:
        schema["anyOf"] = [{"required": [name]} for name in any_of]
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
    any_of=["text", "image"],
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
    any_of=["image", "text"],
)
CAPTION_FORM = _form_schema(
    {"image": _FILE, **_GENERATION_FORM, "max_tokens": {"type": "integer", "minimum": 1}},
    required=["image"],
)


def request_body(model: type[BaseModel], form: dict[str, Any]) -> dict[str, Any]:
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


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
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


def install_openapi(app: FastAPI) -> None:
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
