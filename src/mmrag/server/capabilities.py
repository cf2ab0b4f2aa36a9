"""What the generation endpoints call: small Protocols, and which ones a server has.

RA-CM3 (caption → image, image → caption: `server/ra_cm3_backend.py`) and FROMAGe / GILL
(chat with retrieved and generated images) plug in here; an endpoint whose capability is
missing answers 501, e.g. the RA-CM3 ones are wired with::

    create_app(path, capabilities=ra_cm3_capabilities(model_dir))

Each implementation does its own retrieval (it owns the strategy: RA-CM3 section 3.2,
FROMAGe's [RET]) and returns the documents it used, so every output carries its evidence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from PIL import Image

from mmrag.memory.memory import Memory
from mmrag.memory.store import Filters
from mmrag.retrieval import Retriever, SearchResult


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    k: int  # documents to retrieve as evidence (0: none)
    filters: Filters | None = None
    seed: int | None = None
    max_tokens: int = 64


@dataclasses.dataclass(frozen=True)
class ImageGeneration:
    image: Image.Image
    evidence: Sequence[SearchResult]


@dataclasses.dataclass(frozen=True)
class Caption:
    text: str
    evidence: Sequence[SearchResult]


@dataclasses.dataclass(frozen=True)
class ChatTurn:
    role: Literal["user", "assistant"]
    parts: Sequence[str | Image.Image]


@dataclasses.dataclass(frozen=True)
class ChatImage:
    """An image in a reply with its provenance: a `document` retrieved from the memory, or a
    generated `image`; `p_generate` is the retrieve-or-generate decision's probability (GILL)."""

    source: Literal["retrieved", "generated"]
    document: SearchResult | None = None
    image: Image.Image | None = None
    p_generate: float | None = None


# A reply part: text, a generated image, a document retrieved from the memory (shown by its
# image, FROMAGe's [RET]), or an image with its provenance.
ChatPart = str | Image.Image | SearchResult | ChatImage


@dataclasses.dataclass(frozen=True)
class ChatReply:
    parts: Sequence[ChatPart]
    evidence: Sequence[SearchResult]


class ImageGenerator(Protocol):
    def generate_image(self, prompt: str, options: GenerationOptions) -> ImageGeneration: ...


class Captioner(Protocol):
    def caption(self, image: Image.Image, options: GenerationOptions) -> Caption: ...


class ChatModel(Protocol):
    def chat(self, turns: Sequence[ChatTurn], options: GenerationOptions) -> ChatReply: ...


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """The generation backends a server has; None answers 501 with `MISSING[name]`."""

    image_generator: ImageGenerator | None = None
    captioner: Captioner | None = None
    chat: ChatModel | None = None

    def available(self) -> dict[str, bool]:
        return {
            "image_generation": self.image_generator is not None,
            "captioning": self.captioner is not None,
            "chat": self.chat is not None,
        }


# Built once the server has opened its memory, so implementations share its retriever.
CapabilitiesFactory = Callable[[Memory, Retriever], Capabilities]

MISSING = {
    "image_generation": "image generation is not available: this server was started "
    "without an RA-CM3 model (caption → image). Start it with `mmrag serve MEMORY "
    "--generator DIR`, or with the shipped checkpoints/ra-cm3 present.",
    "captioning": "captioning is not available: this server was started without an RA-CM3 "
    "model (image → caption). Start it with `mmrag serve MEMORY --generator DIR`, or with "
    "the shipped checkpoints/ra-cm3 present.",
    "chat": "chat is not available: FROMAGe / GILL chat (a frozen language model with "
    "retrieved and generated images) needs the FROMAGe checkpoint (checkpoints/fromage, or "
    "$MMRAG_CHECKPOINTS), and this server was started without it or with `--no-chat`. This "
    "endpoint answers 501 until one is configured.",
}
