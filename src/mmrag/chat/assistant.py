"""A chat that answers in words grounded in the memory, and shows images when asked.

Each user turn is a multimodal RAG step over the memory's own retriever (any encoder):
1. **Evidence.** The turn's images (else its text) retrieve the top documents, as RA-CM3
   queries the memory; they come back with the reply (ids, scores).
2. **Decision.** The image decision (`request.py`) reads the frozen LM's state at the start
   of its turn: does the user ask to see something, and how many? Never for a question.
3. **Images.** For each image asked for, the request retrieves from the memory; with GILL,
   its decision shows the stored document the request names or draws a new one (RA-CM3).
4. **Words.** The LM answers with one plain line of context in the user's turn (the top
   document's caption, or what is being shown): a 135M LM follows a short direct statement,
   not a document list (FINDINGS). Decoding is greedy, capped in tokens and sentences, ends at
   the template's end of turn or at a run of one repeated token; a reply always has text.
`mode="tokens"` instead decodes FROMAGe / GILL's `[RET]` / `[IMG0]` tokens (`tokens.py`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmrag.chat.query_head import EncoderMismatchError, QueryHead
from mmrag.chat.request import RequestDecision, requested_count
from mmrag.chat.tokens import TokenDecoder
from mmrag.memory.memory import Memory
from mmrag.models.fromage.conversation import (
    ChatOptions,
    ImagePart,
    Message,
    Reply,
    as_messages,
    chat_row,
    image_features,
    last_request,
    message_images,
)
from mmrag.models.fromage.model import FrozenLM, GenerateOptions
from mmrag.retrieval import Retriever, SearchResult

log = logging.getLogger(__name__)

IMAGE_MODALITIES = {"modality": ["image", "mixed"]}
ATTACHED = "[The attached image shows: "
MAX_REPEATS = 4  # a reply ends at a run of one token this long (kept once)
REQUEST_CHECKPOINT = "chat"


def _with_note(messages: Sequence[Message], note: str) -> list[Message]:
    """The conversation with `note` on its own line after the last user turn's text."""
    out = list(messages)
    for i in range(len(out) - 1, -1, -1):
        if out[i].role == "user":
            out[i] = Message("user", [*out[i].parts, note])
            break
    return out


def _text_only(message: Message) -> str:
    return "\n".join(p for p in message.parts if isinstance(p, str))


def _image_note(part: ImagePart) -> str:
    # "Say so." makes the LM say that it shows a picture (docs/chat.md: 5 of 12 validation
    # requests, 0 without; both name the thing in 11 of 12).
    if part.document is not None:
        return f"[You are showing the user a picture of {part.document.text}. Say so.]"
    return "[You are showing the user a new drawing made for this request. Say so.]"


@dataclasses.dataclass
class Turn:
    """What one user turn retrieved and decided, before the words are written."""

    messages: list[Message]
    request: str
    evidence: list[SearchResult]
    p_image: float | None
    images: list[ImagePart]
    shown: list[Image.Image]  # the conversation's images, in reading order
    features: torch.Tensor | None  # their frozen image features, computed once per turn


class Chat:
    """The assistant over a memory: FROMAGe's frozen LM, the image decision, and GILL (when
    `maker` is given) to draw what the memory does not hold."""

    def __init__(
        self,
        model: FrozenLM,
        retriever: Retriever,
        decision: RequestDecision | None = None,
        maker: Any = None,
        query_head: QueryHead | None = None,
    ) -> None:
        if query_head is not None:
            manifest = retriever.memory.manifest
            query_head.check(manifest.encoder.name, manifest.fingerprint)
        self.model = model
        self.retriever = retriever
        self.decision = decision
        self.maker = maker
        self.query_head = query_head
        self._tokens: TokenDecoder | None = None

    def chat(self, messages: Sequence[Any], options: ChatOptions | None = None) -> Reply:
        """The assistant's next turn after `messages` (see `as_messages` for their forms)."""
        return self.chat_batch([messages], options or ChatOptions())[0]

    @torch.no_grad()
    def chat_batch(self, conversations: Sequence[Sequence[Any]], opts: ChatOptions) -> list[Reply]:
        if opts.mode == "tokens":
            if self._tokens is None:
                self._tokens = TokenDecoder(self.model, self.retriever, self.maker)
            return self._tokens.replies(conversations, opts)
        return [self._reply(self._turn(as_messages(c), opts), opts) for c in conversations]

    # -- retrieval and decisions ---------------------------------------------------------------

    def _turn(self, messages: list[Message], opts: ChatOptions) -> Turn:
        request = last_request(messages)
        shown = [p for p in messages[-1].parts if isinstance(p, Image.Image)]
        evidence: list[SearchResult] = []
        if opts.retrieval and (shown or request.strip()):
            evidence = self.retriever.search(
                text=None if shown else request,
                image=shown[0] if shown else None,
                k=opts.k,
                filters=opts.filters,
                exclude_ids=opts.exclude_ids,
            )
        every = message_images(messages)
        features = image_features(self.model, every) if every else None
        p_image = self._p_image(messages, features, opts)
        wanted = 0
        if opts.images == "always":
            wanted = requested_count(request)
        elif opts.images == "auto" and p_image is not None:
            wanted = requested_count(request) if p_image >= self.decision_threshold else 0
        turn = Turn(messages, request, evidence, p_image, [], every, features)
        if wanted:
            vector = self._image_query(turn)
            states = self._img_states(turn) if self.maker is not None else None
            exclude = set(opts.exclude_ids)
            for _ in range(wanted):
                part = self._image(turn, vector, states, opts, exclude)
                if part is None:
                    break
                turn.images.append(part)
        return turn

    @property
    def decision_threshold(self) -> float:
        return self.decision.config.threshold if self.decision is not None else 0.5

    def _p_image(
        self, messages: list[Message], features: torch.Tensor | None, opts: ChatOptions
    ) -> float | None:
        """The image decision's probability, or None without a decision (no images then,
        unless asked for with images="always")."""
        if self.decision is None or opts.images == "never":
            return None
        last, _ = self.model.prefill([chat_row(self.model, messages)], features)
        return float(self.decision.probability(last, opts.img_bias)[0])

    def _image(
        self,
        turn: Turn,
        query: np.ndarray,
        states: torch.Tensor | None,
        opts: ChatOptions,
        exclude: set[str],
    ) -> ImagePart | None:
        """One image for the request (none already shown): GILL's choice between the stored
        document the request names and a new drawing from the `[IMG]` `states`, or (without
        GILL) the best stored document."""
        filters = dict(opts.filters or {}) | IMAGE_MODALITIES
        k = max(opts.k, self.maker.evidence_k if self.maker is not None else 0)
        hits = self.retriever.search_vectors(query[None], k, filters, [sorted(exclude)])[0]
        if self.maker is None or states is None:
            if not hits:
                return None
            exclude.add(hits[0].id)
            return ImagePart("retrieved", "[RET]", hits[: opts.k], hits[0])
        part: ImagePart = self.maker.image_for(states, hits, turn.request, opts, exclude)
        return part

    def _special_states(self, turn: Turn, tokens: Sequence[int]) -> torch.Tensor:
        """(n, H) states of `tokens` fed after the conversation."""
        row = chat_row(self.model, turn.messages)
        return self.model.special_states([row], list(tokens), turn.features)[0]

    def _img_states(self, turn: Turn) -> torch.Tensor:
        """GILL's `[IMG0..r-1]` states after the conversation (its decision and mapper read
        them)."""
        return self._special_states(turn, self.model.img_ids)

    def _image_query(self, turn: Turn) -> np.ndarray:
        """The request in the memory's space: its text encoding, blended with W_t of the
        `[RET]` state after the conversation when the chat has a head for this memory."""
        text = self.retriever.encode(turn.request, None)
        head = self.query_head
        if head is None or head.config.blend == 0.0:
            return text
        state = self._special_states(turn, [self.model.ret_id])  # (1, H)
        with torch.no_grad():
            ret = head(state)[0].numpy()
        mixed = head.config.blend * ret + (1 - head.config.blend) * text
        return (mixed / max(1e-12, float(np.linalg.norm(mixed)))).astype(np.float32)

    # -- the words -------------------------------------------------------------------------------

    def _note(self, turn: Turn, opts: ChatOptions) -> str | None:
        """One line of context for the LM: what is shown, else what the attached image is, else
        the closest document when it is close enough."""
        if turn.images:
            return " ".join(_image_note(p) for p in turn.images)
        if not turn.evidence:
            return None
        top = turn.evidence[0]
        if any(isinstance(p, Image.Image) for p in turn.messages[-1].parts):
            return f"{ATTACHED}{top.text}.]"
        if top.score >= opts.ground_threshold:
            return f"[From memory: {top.text}.]"
        return None

    def _reply(self, turn: Turn, opts: ChatOptions) -> Reply:
        note = self._note(turn, opts)
        messages = turn.messages
        if note:
            # A grounded reply answers this turn from its evidence: earlier replies in the
            # prompt make the 135M LM repeat them (seen in the demo's conversation), and the
            # decision and the queries have read the whole conversation already.
            messages = [m for m in messages if m.role == "system"] + messages[-1:]
        if note and note.startswith(ATTACHED):
            # The note says what the attached image is; its visual prefix only distracts the
            # LM then (docs/chat.md says how this was chosen).
            messages = [*messages[:-1], Message("user", [_text_only(messages[-1])])]
        messages = _with_note(messages, note) if note else messages
        if note and opts.system and messages[0].role != "system":  # a plain turn: the LM's own
            messages = [Message("system", [opts.system]), *messages]
        images = message_images(messages)
        features = turn.features
        if [id(i) for i in images] != [id(i) for i in turn.shown]:
            features = image_features(self.model, images) if images else None
        generate = GenerateOptions(
            max_new_tokens=opts.max_new_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            repetition_penalty=opts.repetition_penalty,
            allow_ret=False,
            allow_img=False,
            seed=opts.seed,
            max_sentences=opts.max_sentences,
            max_repeats=MAX_REPEATS,
        )
        gen = self.model.generate([chat_row(self.model, messages)], features, generate)[0]
        eos = self.model.tokenizer.eos_token_id
        text = self.model.decode_text([t for t in gen.tokens if t != eos]).strip()
        if not text:  # the guard: a reply always has words
            text = "Here is what I found." if turn.images else "I don't know."
        parts: list[str | ImagePart] = [text, *turn.images]
        return Reply(parts, turn.evidence, turn.p_image)


def load_chat(
    memory: Memory,
    gill: str | Path | bool | None = None,
    decision: str | Path | bool | None = None,
) -> Chat:
    """The chat over `memory` (any encoder). `gill`: a GILL folder; None: the shipped one
    when present; False: none (stored images only). `decision`: the image decision's folder;
    None: the shipped `checkpoints/chat`; False: none (images only with images="always")."""
    from mmrag.checkpoints import CheckpointNotFoundError, checkpoint_dir
    from mmrag.models.fromage.model import FrozenLM

    encoder = memory.encoder
    model: FrozenLM
    if encoder.name == "fromage":  # its FROMAGe model is loaded already: share it
        model = encoder.model  # type: ignore[attr-defined]
    else:
        model = FrozenLM.from_pretrained(checkpoint_dir("fromage"))
    head = None
    if decision is not False:
        try:
            folder = (
                checkpoint_dir(REQUEST_CHECKPOINT)
                if decision is None or decision is True
                else Path(decision)
            )
            head = RequestDecision.from_pretrained(folder, model.language_model.identity)
        except CheckpointNotFoundError:
            head = None
    retriever = Retriever(memory)
    query = _query_head(memory, decision)
    if gill is False:
        return Chat(model, retriever, head, query_head=query)
    if gill is None or gill is True:
        try:
            gill = checkpoint_dir("gill")
        except CheckpointNotFoundError:
            return Chat(model, retriever, head, query_head=query)
    from mmrag.models.gill.model import Gill

    maker = Gill.from_pretrained(Path(gill), lm=model.language_model)
    maker.check_compatible(model)
    return Chat(maker.model, retriever, head, maker, query)


def _query_head(memory: Memory, decision: str | Path | bool | None) -> QueryHead | None:
    """The shipped (or `decision` folder's) `[RET]` head when it was trained for this memory's
    encoder; otherwise none, with a warning (image requests then query by their text)."""
    from mmrag.chat.query_head import CONFIG_FILE
    from mmrag.checkpoints import CheckpointNotFoundError, checkpoint_dir

    if decision is False:
        return None
    try:
        folder = (
            checkpoint_dir(REQUEST_CHECKPOINT)
            if decision is None or decision is True
            else Path(decision)
        )
    except CheckpointNotFoundError:
        return None
    if not (folder / CONFIG_FILE).is_file():
        return None
    head: QueryHead = QueryHead.from_pretrained(folder)
    try:
        head.check(memory.manifest.encoder.name, memory.manifest.fingerprint)
    except EncoderMismatchError as e:
        log.warning("%s", e)
        return None
    return head
