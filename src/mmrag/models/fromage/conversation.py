"""The conversation format the frozen LM is trained and prompted with (FROMAGe / GILL).

Messages of interleaved text and images, rendered in the LM's own chat template with images
as FROMAGe visual-prefix slots; the phrasings of an image request; and the parts of a reply
(text, retrieved or generated images with their evidence). Training, GILL and the chat all
speak this format, so it lives below all three.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from mmrag.memory.store import Filters
from mmrag.models.fromage.model import IMAGE_SLOT, FrozenLM, TokenRow
from mmrag.retrieval import Retriever, SearchResult

# A character no caption or tokenizer template contains: where an image goes in a turn.
IMAGE_MARKER = "\ue000"
# What a user says to ask for an image: chat-format [RET] / [IMG0] training queries and the
# decision module's prompts ({} is a caption).
REQUEST_TEMPLATES = (
    "Show me {}.",
    "Can you show me a picture of {}?",
    "I would like to see {}.",
    "Find an image of {}.",
    "What does {} look like?",
    "Draw {}.",
)


@dataclasses.dataclass(frozen=True)
class Message:
    """One turn: text and images (PIL) in order."""

    role: Literal["system", "user", "assistant"]
    parts: Sequence[str | Image.Image]


def as_messages(messages: Sequence[Any]) -> list[Message]:
    """Accept `Message`s, objects with `role` and `parts` (the server's `ChatTurn`), or dicts
    `{"role", "content"}` whose content is a string or a list of `{"type": "text", "text"}` /
    `{"type": "image", "image": PIL image}` items."""
    out = []
    for m in messages:
        if isinstance(m, dict):
            content = m.get("content", "")
            if isinstance(content, str):
                parts: list[str | Image.Image] = [content]
            else:
                parts = [c["text"] if c.get("type") == "text" else c["image"] for c in content]
            out.append(Message(m["role"], parts))
        else:
            out.append(Message(m.role, list(m.parts)))
    return out


def chat_row(
    model: FrozenLM,
    messages: Sequence[Message],
    first_image: int = 0,
    generation_prompt: bool = True,
) -> TokenRow:
    """The conversation in the LM's chat template, images as IMAGE_SLOT markers whose feature
    rows are numbered from `first_image` in reading order."""
    rendered = []
    count = 0
    for m in messages:
        texts = []
        for part in m.parts:
            if isinstance(part, str):
                texts.append(part)
            else:
                texts.append(IMAGE_MARKER)
                count += 1
        rendered.append({"role": m.role, "content": "\n".join(texts)})
    text = model.tokenizer.apply_chat_template(
        rendered, tokenize=False, add_generation_prompt=generation_prompt
    )
    ids: list[int] = []
    for i, piece in enumerate(str(text).split(IMAGE_MARKER)):
        if i:
            ids.append(IMAGE_SLOT)
        ids += model.encode_text(piece)
    return TokenRow(ids, list(range(first_image, first_image + count)))


def last_request(messages: Sequence[Message]) -> str:
    """The text of the last user turn: what GILL's decision checks the evidence against."""
    for m in reversed(messages):
        if m.role == "user":
            return "\n".join(p for p in m.parts if isinstance(p, str))
    return ""


def message_images(messages: Sequence[Message]) -> list[Image.Image]:
    return [p for m in messages for p in m.parts if isinstance(p, Image.Image)]


def image_features(model: FrozenLM, images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, F) frozen EfficientNet-Lite0 pooled features, at the adapters' input size."""
    from mmrag.encoders.lite import image_tower

    device = str(model.table.device)
    if not images:
        return torch.zeros(0, model.config.image_feature_dim)
    feats = image_tower(device).features(list(images), model.config.image_size, batch_size=32)
    return torch.from_numpy(np.asarray(feats, dtype=np.float32))


# --- replies ---------------------------------------------------------------------------------


@dataclasses.dataclass
class ImagePart:
    """An image in a reply: a document retrieved from the memory, or a generated image.

    `evidence` are the memory's nearest documents to the image query (with their scores);
    `p_generate` is the GILL decision's calibrated probability of generating (None for
    FROMAGe's `[RET]`, which always retrieves)."""

    source: Literal["retrieved", "generated"]
    token: str  # "[RET]" or "[IMG0]"
    evidence: list[SearchResult]
    document: SearchResult | None = None
    image: Image.Image | None = None
    p_generate: float | None = None
    generation: dict[str, Any] | None = None  # how a generated image was made

    def to_json(self, image_data: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "image", "source": self.source, "token": self.token}
        if self.document is not None:
            out |= {
                "document_id": self.document.id,
                "score": round(self.document.score, 6),
                "text": self.document.text,
                "image": self.document.image,
            }
        if self.image is not None and image_data:
            buf = io.BytesIO()
            self.image.save(buf, format="PNG")
            out["png_base64"] = base64.b64encode(buf.getvalue()).decode("ascii")
        if self.p_generate is not None:
            out["p_generate"] = round(self.p_generate, 4)
        if self.generation is not None:
            out["generation"] = self.generation
        out["evidence"] = [e.to_json() for e in self.evidence]
        return out


@dataclasses.dataclass
class Reply:
    """Interleaved text and images, in order; `evidence` are the documents retrieved for the
    turn (what the words were grounded on), `p_image` the image decision's probability."""

    parts: list[str | ImagePart]
    evidence: list[SearchResult] = dataclasses.field(default_factory=list)
    p_image: float | None = None

    @property
    def text(self) -> str:
        return " ".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.parts if isinstance(p, ImagePart)]

    def to_json(self, image_data: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "parts": [
                {"type": "text", "text": p} if isinstance(p, str) else p.to_json(image_data)
                for p in self.parts
            ],
            "evidence": [e.to_json() for e in self.evidence],
        }
        if self.p_image is not None:
            out["p_image"] = round(self.p_image, 4)
        return out


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    """How a turn is answered.

    `mode`: "grounded" (default) retrieves the turn's evidence from the memory, answers in
    words that use it, and shows images only when the image decision says the user asked for
    them; "tokens" is FROMAGe / GILL decoding, where the LM's own `[RET]` / `[IMG0]` tokens
    place images (needs a memory built with the fromage encoder). `images`: "auto" lets the
    decision (or the LM, in "tokens" mode) choose, "always" shows one, "never" none.
    `retrieval=False` answers from the conversation alone. `ret_bias` / `img_bias` are added
    to the `[RET]` / `[IMG0]` logits in "tokens" mode; `img_bias` shifts the image decision's
    logit in "grounded" mode. `max_sentences` ends a reply after that many sentences."""

    max_new_tokens: int = 48
    k: int = 3  # evidence documents per turn and per image
    images: Literal["auto", "always", "never"] = "auto"
    mode: Literal["grounded", "tokens"] = "grounded"
    retrieval: bool = True
    ground_threshold: float = 0.6  # text turns: use the top document only when this close
    max_sentences: int = 1
    # The system turn of a grounded reply when the conversation has none (a 135M LM rambles
    # past the evidence without it); plain turns keep the LM's own.
    system: str = "You are a helpful assistant. Answer in one short sentence."
    ret_bias: float = 0.0
    img_bias: float = 0.0
    temperature: float = 0.0
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    seed: int = 0
    filters: Filters | None = None
    exclude_ids: tuple[str, ...] = ()


class ImageMaker(Protocol):
    """What GILL adds to a chat: from the hidden states at `[IMG0..r-1]`, retrieve or
    generate (`mmrag.models.gill.model.Gill` is one)."""

    def image_part(
        self,
        states: torch.Tensor,
        retriever: Retriever,
        options: ChatOptions,
        exclude: set[str],
        request: str = "",
    ) -> ImagePart: ...
