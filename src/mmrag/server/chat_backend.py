"""FROMAGe / GILL behind the server's `ChatModel` Protocol.

The adapter only translates: the request's turns into `mmrag.chat` messages, `GenerationOptions`
(k, filters, seed, max_tokens) into `ChatOptions`, and the reply's image parts into
`ChatImage`s that keep whether each image was retrieved or generated, the decision's
probability and its evidence. Chat needs a memory built with the `fromage` encoder; a server
over any other memory keeps answering 501 on /chat.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from mmrag.chat import Chat, ChatOptions, ImagePart, Message, load_chat
from mmrag.memory.memory import Memory
from mmrag.retrieval import Retriever, SearchResult
from mmrag.server.capabilities import (
    Capabilities,
    CapabilitiesFactory,
    ChatImage,
    ChatPart,
    ChatReply,
    ChatTurn,
    GenerationOptions,
)

log = logging.getLogger(__name__)


class ChatBackend:
    """`ChatModel` over one `mmrag.chat.Chat`."""

    def __init__(self, chat: Chat, defaults: ChatOptions | None = None) -> None:
        self.model = chat
        self.defaults = defaults or ChatOptions()

    def chat(self, turns: Sequence[ChatTurn], options: GenerationOptions) -> ChatReply:
        opts = dataclasses.replace(
            self.defaults,
            max_new_tokens=options.max_tokens,
            k=max(1, options.k),
            filters=options.filters,
            seed=options.seed or 0,
        )
        reply = self.model.chat([Message(t.role, list(t.parts)) for t in turns], opts)
        parts: list[ChatPart] = []
        evidence: dict[str, SearchResult] = {}
        for part in reply.parts:
            if isinstance(part, str):
                parts.append(part)
                continue
            parts.append(_image(part))
            for hit in part.evidence:
                evidence.setdefault(hit.id, hit)
        return ChatReply(parts, list(evidence.values()))


def _image(part: ImagePart) -> ChatImage:
    return ChatImage(
        source=part.source,
        document=part.document,
        image=part.image,
        p_generate=part.p_generate,
    )


def with_chat(
    factory: CapabilitiesFactory | None = None,
    gill: str | Path | bool | None = None,
    defaults: ChatOptions | None = None,
) -> CapabilitiesFactory:
    """`factory`'s capabilities plus chat when the served memory uses the `fromage` encoder
    (GILL from `gill`; None: the shipped one when present; False: FROMAGe alone); `defaults`
    are the chat options a request does not set."""

    def build(memory: Memory, retriever: Retriever) -> Capabilities:
        capabilities = factory(memory, retriever) if factory is not None else Capabilities()
        if memory.manifest.encoder.name != "fromage":
            log.info("the memory's encoder is not fromage: /chat answers 501")
            return capabilities
        chat = ChatBackend(load_chat(memory, gill), defaults)
        return Capabilities(capabilities.image_generator, capabilities.captioner, chat)

    return build
