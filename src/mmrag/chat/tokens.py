"""FROMAGe / GILL decoding: the LM's own `[RET]` and `[IMG0]` tokens place the images.

The conversation is rendered with the LM's chat template (images as FROMAGe visual prefixes)
and decoded with the KV cache; every `[RET]` becomes the nearest image of the memory
(FROMAGe; images already in the conversation or the reply are excluded) and every
`[IMG0..r-1]` block a GILL decision: retrieve with GILL's retrieval head, or generate with
the mapper and RA-CM3. `[RET]` vectors live in FROMAGe's space, so this needs a memory built
with the `fromage` encoder. The chat's default is grounded replies (`assistant.py`); this is
the ablation and the paper's behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from mmrag.models.fromage.conversation import (
    ChatOptions,
    ImageMaker,
    ImagePart,
    Reply,
    as_messages,
    chat_row,
    image_features,
    last_request,
    message_images,
)
from mmrag.models.fromage.model import FrozenLM, GenerateOptions, Generation, TokenRow
from mmrag.retrieval import Retriever


class TokenDecoder:
    """Replies whose images are where the LM emitted `[RET]` / `[IMG0]`."""

    def __init__(
        self, model: FrozenLM, retriever: Retriever, maker: ImageMaker | None = None
    ) -> None:
        encoder = retriever.memory.manifest.encoder.name
        if encoder != "fromage":
            raise ValueError(
                "mode='tokens' retrieves with FROMAGe's [RET] vectors: it needs a memory built "
                f"with the fromage encoder (`mmrag ingest MEMORY DATA --encoder fromage`), not "
                f"{encoder!r}; the default mode='grounded' works over any memory"
            )
        self.model = model
        self.retriever = retriever
        self.maker = maker

    @torch.no_grad()
    def replies(self, conversations: Sequence[Sequence[Any]], opts: ChatOptions) -> list[Reply]:
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
