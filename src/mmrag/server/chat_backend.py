"""FROMAGe / GILL behind the server's `ChatModel` Protocol.

The adapter only translates: the request's turns into `mmrag.chat` messages, `GenerationOptions`
(k, filters, seed, max_tokens) into `ChatOptions`, and the reply's image parts into
`ChatImage`s that keep whether each image was retrieved or generated, the decision's
probability and its evidence. The chat works over any memory; its models load on the first
/chat request (a server that is never asked to chat never loads the language model), and a
server without the shipped FROMAGe checkpoint answers 501 on /chat.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
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
    """`ChatModel` over one `mmrag.chat.Chat`, built by `load` on first use."""

    def __init__(self, load: Callable[[], Chat], defaults: ChatOptions | None = None) -> None:
        self._load = load
        self._chat: Chat | None = None
        self._lock = threading.Lock()
        self.defaults = defaults or ChatOptions()

    @property
    def model(self) -> Chat:
        with self._lock:
            if self._chat is None:
                log.info("loading the chat models")
                self._chat = self._load()
            return self._chat

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
        for hit in reply.evidence:
            evidence.setdefault(hit.id, hit)
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
    """`factory`'s capabilities plus chat over the served memory (GILL from `gill`; None: the
    shipped one when present; False: FROMAGe alone), when the shipped FROMAGe checkpoint is
    there; `defaults` are the chat options a request does not set."""
    from mmrag.checkpoints import CheckpointNotFoundError, checkpoint_dir

    def build(memory: Memory, retriever: Retriever) -> Capabilities:
        capabilities = factory(memory, retriever) if factory is not None else Capabilities()
        try:
            checkpoint_dir("fromage")
        except CheckpointNotFoundError:
            log.info("no FROMAGe checkpoint: /chat answers 501")
            return capabilities
        chat = ChatBackend(lambda: load_chat(memory, gill), defaults)
        return Capabilities(capabilities.image_generator, capabilities.captioner, chat)

    return build
