"""The generation endpoints: caption → image, image → caption, chat. Each answers 501 until
its capability is wired (see capabilities.py), and every output carries its evidence."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from PIL import Image

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
from mmrag.server.capabilities import ChatImage, ChatTurn
from mmrag.server.context import Access, Context, ContextDep
from mmrag.server.openapi import CAPTION_FORM, error_responses, request_body
from mmrag.server.schemas import (
    CaptionRequest,
    CaptionResponse,
    ChatMessageOut,
    ChatPartOut,
    ChatRequest,
    ChatResponse,
    ImageGenerationRequest,
    ImageGenerationResponse,
)


async def generate_image(body: ImageGenerationRequest, ctx: ContextDep) -> ImageGenerationResponse:
    """Caption → image (RA-CM3): a PNG and the documents retrieved as its evidence."""
    generator = ctx.capability("image_generator")
    ctx.check_text(body.prompt, ("body", "prompt"))
    result = await ctx.generate(generator.generate_image, body.prompt, ctx.options(body))
    return ImageGenerationResponse(
        image=views.png(result.image), evidence=views.hits(result.evidence)
    )


async def generate_caption(request: Request, ctx: ContextDep) -> CaptionResponse:
    """Image → caption (RA-CM3): the caption and the documents retrieved as evidence.
    JSON (`image_base64`) or a multipart form (`image` file)."""
    captioner = ctx.capability("captioner")
    if request_kind(request) == "json":
        body = await parse_json(request, CaptionRequest)
        raw: bytes | str | None = body.image_base64  # decoded on a worker thread
    else:
        body, files = await parse_form(
            request, CaptionRequest, ctx.config, files={"image"}, json_fields={"filters"}
        )
        raw = files["image"][0] if "image" in files else None
    if raw is None:
        raise validation_error(("body", "image"), "an image is required")
    loc = ("body", "image" if isinstance(raw, bytes) else "image_base64")
    image = await ctx.run(decode_image_input, raw, loc, ctx.config)
    result = await ctx.generate(captioner.caption, image, ctx.options(body, body.max_tokens))
    return CaptionResponse(caption=result.text, evidence=views.hits(result.evidence))


async def chat(body: ChatRequest, ctx: ContextDep) -> ChatResponse:
    """A conversation with interleaved text and images (FROMAGe / GILL). The reply may
    show images retrieved from the memory or generated, and carries its evidence."""
    model = ctx.capability("chat")
    turns = await ctx.run(_chat_turns, ctx, body)
    reply = await ctx.generate(model.chat, turns, ctx.options(body, body.max_tokens))
    return ChatResponse(
        message=ChatMessageOut(parts=[_chat_part(p) for p in reply.parts]),
        evidence=views.hits(reply.evidence),
    )


def generation_router(access: Access) -> APIRouter:
    """The generation endpoints; each answers 501 until its capability is wired."""
    read, denied = access.read, access.read_errors
    router = APIRouter(tags=["generation"], dependencies=read)
    router.add_api_route(
        "/generate/image",
        generate_image,
        methods=["POST"],
        response_model=ImageGenerationResponse,
        responses=error_responses(400, *denied, 413, 422, 501),
    )
    router.add_api_route(
        "/generate/caption",
        generate_caption,
        methods=["POST"],
        response_model=CaptionResponse,
        responses=error_responses(400, *denied, 413, 415, 422, 501),
        openapi_extra=request_body(CaptionRequest, CAPTION_FORM),
    )
    router.add_api_route(
        "/chat",
        chat,
        methods=["POST"],
        response_model=ChatResponse,
        responses=error_responses(400, *denied, 413, 422, 501),
    )
    return router


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
        return ChatPartOut(type="image", generated=views.png(part), source="generated")
    if isinstance(part, ChatImage):
        inner = part.document if part.document is not None else part.image
        out = _chat_part(inner) if inner is not None else ChatPartOut(type="image")
        return out.model_copy(update={"source": part.source, "p_generate": part.p_generate})
    found = views.hit(part)
    return ChatPartOut(
        type="image",
        document_id=found.id,
        image=found.images[0] if found.images else None,
        source="retrieved",
    )
