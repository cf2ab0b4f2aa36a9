"""Chat over interleaved text and images with a frozen LM that retrieves or generates images.

`Chat.chat(messages)` formats the conversation with the LM's own chat template (images become
FROMAGe visual prefixes inside the user's turn), decodes the assistant's reply with the KV
cache, and turns every `[RET]` into the nearest image of the memory (FROMAGe; images already
in the conversation or the reply are excluded) and every `[IMG0..r-1]` into a GILL decision:
retrieve with GILL's retrieval head, or generate with the mapper and the RA-CM3 generator.
Every image part carries its evidence: the documents and scores retrieved, whether it was
retrieved or generated, and the decision's probability.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from mmrag.frozen_lm import IMAGE_SLOT, FrozenLM, TokenRow

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
