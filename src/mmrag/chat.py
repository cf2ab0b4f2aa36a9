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

import base64
import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from mmrag.frozen_lm import IMAGE_SLOT, FrozenLM, GenerateOptions, Generation, TokenRow
from mmrag.memory.memory import Memory
from mmrag.memory.store import Filters
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
    """Interleaved text and images, in order."""

    parts: list[str | ImagePart]

    @property
    def text(self) -> str:
        return " ".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.parts if isinstance(p, ImagePart)]

    def to_json(self, image_data: bool = True) -> dict[str, Any]:
        return {
            "parts": [
                {"type": "text", "text": p} if isinstance(p, str) else p.to_json(image_data)
                for p in self.parts
            ]
        }


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    """`images`: "auto" lets the model decide, "always" adds an image query after a reply
    that has none, "never" forbids image tokens. `ret_bias` / `img_bias` are added to the
    `[RET]` / `[IMG0]` logits (FROMAGe's and GILL's scale factors)."""

    max_new_tokens: int = 48
    k: int = 3  # evidence documents per image
    images: Literal["auto", "always", "never"] = "auto"
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
    generate (`mmrag.gill.Gill` is one)."""

    def image_part(
        self,
        states: torch.Tensor,
        retriever: Retriever,
        options: ChatOptions,
        exclude: set[str],
        request: str = "",
    ) -> ImagePart: ...


# --- the chat model --------------------------------------------------------------------------


class Chat:
    """FROMAGe (and GILL, when `maker` is given) over a memory built with the `fromage`
    encoder, so the `[RET]` vectors and the stored ones live in one space."""

    def __init__(
        self, model: FrozenLM, retriever: Retriever, maker: ImageMaker | None = None
    ) -> None:
        encoder = retriever.memory.manifest.encoder.name
        if encoder != "fromage":
            raise ValueError(
                "chat retrieves with FROMAGe's [RET] vectors: the memory must be built with the "
                f"fromage encoder (`mmrag ingest MEMORY DATA --encoder fromage`), not {encoder!r}"
            )
        self.model = model
        self.retriever = retriever
        self.maker = maker

    def chat(self, messages: Sequence[Any], options: ChatOptions | None = None) -> Reply:
        """The assistant's next turn after `messages` (see `as_messages` for their forms)."""
        opts = options or ChatOptions()
        return self.chat_batch([messages], opts)[0]

    @torch.no_grad()
    def chat_batch(self, conversations: Sequence[Sequence[Any]], opts: ChatOptions) -> list[Reply]:
        """Several conversations decoded together (one batched, KV-cached generation)."""
        rows: list[TokenRow] = []
        requests: list[str] = []
        images: list[Image.Image] = []
        for conversation in conversations:
            messages = as_messages(conversation)
            rows.append(chat_row(self.model, messages, first_image=len(images)))
            requests.append(last_request(messages))
            images += message_images(messages)
        features = image_features(self.model, images) if images else None
        generate = GenerateOptions(
            max_new_tokens=opts.max_new_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            repetition_penalty=opts.repetition_penalty,
            ret_bias=opts.ret_bias,
            img_bias=opts.img_bias,
            allow_ret=opts.images != "never",
            allow_img=opts.images != "never" and self.maker is not None,
            stop_ids=(self.model.tokenizer.eos_token_id,),
            seed=opts.seed,
        )
        generations = self.model.generate(rows, features, generate)
        return [
            self._reply(row, gen, features, opts, request)
            for row, gen, request in zip(rows, generations, requests, strict=True)
        ]

    def _reply(
        self,
        row: TokenRow,
        gen: Generation,
        features: torch.Tensor | None,
        opts: ChatOptions,
        request: str = "",
    ) -> Reply:
        model = self.model
        states = dict(gen.hidden)  # token index -> hidden state
        parts: list[str | ImagePart] = []
        text: list[int] = []
        exclude = set(opts.exclude_ids)
        i = 0
        while i < len(gen.tokens):
            token = gen.tokens[i]
            if token < model.vocab:
                if token != model.tokenizer.eos_token_id:
                    text.append(token)
                i += 1
                continue
            self._flush(text, parts)
            if token == model.ret_id:
                parts.append(self._retrieve(states[i], opts, exclude))
                i += 1
            else:  # [IMG0], then the forced [IMG1..r-1]
                r = len(model.img_ids)
                if i + r <= len(gen.tokens):
                    block = torch.stack([states[j] for j in range(i, i + r)])
                else:  # the reply's token cap cut the forced block: run it whole
                    context = TokenRow(row.ids + gen.tokens[:i], row.images)
                    block = model.special_states([context], list(model.img_ids), features)[0]
                assert self.maker is not None
                parts.append(self.maker.image_part(block, self.retriever, opts, exclude, request))
                i += r
        self._flush(text, parts)
        if opts.images == "always" and not any(isinstance(p, ImagePart) for p in parts):
            parts.append(self._forced(row, gen, features, opts, exclude, request))
        return Reply(parts)

    def _flush(self, text: list[int], parts: list[str | ImagePart]) -> None:
        decoded = self.model.decode_text(text).strip()
        if decoded:
            parts.append(decoded)
        text.clear()

    def _retrieve(self, state: torch.Tensor, opts: ChatOptions, exclude: set[str]) -> ImagePart:
        """FROMAGe: the `[RET]` state -> W_t -> the nearest stored document with an image."""
        query = self.model.adapters.project_text(state[None]).numpy()
        filters = dict(opts.filters or {}) | {"modality": ["image", "mixed"]}
        hits = self.retriever.search_vectors(query, opts.k, filters, [sorted(exclude)])[0]
        if hits:
            exclude.add(hits[0].id)
        return ImagePart("retrieved", "[RET]", hits, hits[0] if hits else None)

    def _forced(
        self,
        row: TokenRow,
        gen: Generation,
        features: torch.Tensor | None,
        opts: ChatOptions,
        exclude: set[str],
        request: str = "",
    ) -> ImagePart:
        """`images="always"`: the image token appended after the reply (GILL's [IMG] block
        when there is a maker, else FROMAGe's [RET])."""
        model = self.model
        eos = model.tokenizer.eos_token_id
        reply = [t for t in gen.tokens if t != eos]
        context = TokenRow(row.ids + reply, row.images)
        if self.maker is None:
            state = model.special_states([context], [model.ret_id], features)[0, 0]
            return self._retrieve(state, opts, exclude)
        states = model.special_states([context], list(model.img_ids), features)[0]
        return self.maker.image_part(states, self.retriever, opts, exclude, request)


def load_chat(memory: Memory, gill: str | Path | bool | None = None) -> Chat:
    """A chat over `memory` (built with the `fromage` encoder, whose FROMAGe model it reuses).
    `gill`: a GILL folder; None: the shipped `checkpoints/gill` when present; False: none."""
    from mmrag.checkpoints import CheckpointNotFoundError, checkpoint_dir
    from mmrag.encoders.fromage import FromageEncoder

    encoder = memory.encoder
    if not isinstance(encoder, FromageEncoder):
        raise ValueError(
            f"{memory.root} was built with the {encoder.name!r} encoder; chat needs one built "
            "with `--encoder fromage`"
        )
    retriever = Retriever(memory)
    if gill is False:
        return Chat(encoder.model, retriever)
    if gill is None or gill is True:
        try:
            gill = checkpoint_dir("gill")
        except CheckpointNotFoundError:
            return Chat(encoder.model, retriever)
    from mmrag.gill import Gill

    maker = Gill.from_pretrained(Path(gill), lm=encoder.model.language_model)
    maker.check_compatible(encoder.model)
    return Chat(maker.model, retriever, maker)
