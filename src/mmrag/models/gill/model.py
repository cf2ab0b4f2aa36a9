"""GILL (Koh, Fried, Salakhutdinov 2023) on top of FROMAGe: `[IMG0..r-1]`, a retrieval head, a
mapper into our RA-CM3 generator's conditioning, and a calibrated retrieve-or-generate decision.

**What the mapper maps into, and why.** GILL maps the `[IMG]` hidden states into the space an
image generator is conditioned in: Stable Diffusion's 77 x 768 text-encoder outputs. Our
generator (RA-CM3's `generator.py`) is a decoder conditioned by the tokens before the image:
`<bos> [retrieved docs] <img alt="CAPTION" src="` then 256 image codes. Its own encoding of
a caption is therefore the sequence of its *input embeddings of the caption's tokens*, and the
mapper is trained (L2, as in GILL) to produce exactly that: `queries` vectors of the
generator's width, slot j approximating the embedding of caption token j. A length head
predicts how many slots the caption fills (GILL's fixed 77 slots correspond to CLIP's padded
encoding; our generator never saw padding inside an alt text, so slots past the predicted
length are dropped rather than filled with pads). At generation the vectors go through
`Generator.forward(embeds=...)` in place of the caption: `<bos> m1 <sep> m2 <sep> <img alt="`
[mapped vectors] `" src="`, then the codes are sampled with classifier-free guidance, exactly
as RA-CM3 draws from a caption, with the documents the `[IMG0]` query retrieved prepended.

**Retrieval head.** `img_proj`: the hidden state at `[IMG0]` -> FROMAGe's 256-d space, trained
with InfoNCE against FROMAGe's frozen `W_i v`, so GILL retrieves from the same memory.

**Decision.** A logistic model of p(generate), temperature-scaled, on three groups of
features: GILL's linear read-out of the `[IMG0]` state (the paper's classifier, which sees only
the prompt); the retrieval scores of the `[IMG0]` query against the memory (top-1, top-1 minus
top-2, mean of the top k); and an evidence check, the largest fraction of an evidence caption's
words that the user's request contains, over the `evidence_k` nearest documents (with
indicators of an exact and of no match: `evidence_features`). Whether the
memory holds the asked-for thing depends on the memory, which changes without retraining, so
the prompt alone cannot decide; and our 256-d retrieval space barely separates sibling emoji
("keycap: 1" / "keycap: 2"): when the family is present, the `[IMG0]` query ranks it first only
~20% of the time and within the top 20 ~65%, so the scores are mostly those of wrong documents,
while the evidence check reads the names the retrieval brought back. When the decision
retrieves, the image shown is the evidence document the request names best (ties: the
best-scored), the one the check found. Labels and the F1 / calibration measurement:
`mmrag.models.gill.decision` and `mmrag.models.gill.evaluate`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional

from mmrag.config import Config, ConfigError
from mmrag.fileio import save_weights
from mmrag.models.fromage.conversation import ChatOptions, ImagePart
from mmrag.models.fromage.language_model import LanguageModel
from mmrag.models.fromage.model import FrozenLM
from mmrag.models.ra_cm3.copy_hints import hints_for
from mmrag.retrieval import Retriever, SearchResult
from mmrag.sampling import Sampling, guide, sample_next

logger = logging.getLogger(__name__)

CONFIG_FILE = "gill.json"
WEIGHTS_FILE = "gill.safetensors"
FROZEN_LM_DIR = "frozen_lm"
SCORE_FEATURES = 3  # top-1, top-1 minus top-2, mean of the top k
EVIDENCE_FEATURES = 3  # the best overlap, whether it is exact, whether it is none
WORD = re.compile(r"[0-9a-z]+")


@dataclasses.dataclass(frozen=True)
class GillConfig(Config):
    preset_prefix: ClassVar[str] = "gill"

    queries: int = 24  # caption slots the mapper fills (emoji captions: ~7 BPE tokens)
    mapper_dim: int = 256
    mapper_layers: int = 2
    mapper_heads: int = 4
    generator_dim: int = 192  # the RA-CM3 generator's width
    generator: str = ""  # the RA-CM3 model folder ("" = the shipped checkpoints/ra-cm3)
    generator_fingerprint: str = ""  # of its embedding table and tokenizer
    top_k: int = 5  # retrieval scores the decision reads
    evidence_k: int = 50  # documents whose captions the decision checks against the request
    threshold: float = 0.5  # generate when p_generate >= threshold
    # Documents prepended when generating (RA-CM3's K). 0: GILL generates when the memory
    # lacks what was asked, and the shipped generator scores held-out images worse given
    # another family's documents and their copy hints than given nothing (docs/chat.md).
    retrieval_k: int = 0
    samples: int = 2  # images drawn; the one closest to the [IMG0] query is kept
    guidance: float = 3.0
    temperature: float = 1.0
    top_p: float = 0.9

    def validate(self) -> None:
        if min(self.queries, self.mapper_dim, self.mapper_layers, self.generator_dim) < 1:
            raise ConfigError("GillConfig: sizes must be positive")
        if self.mapper_dim % self.mapper_heads or self.samples < 1 or self.top_k < 2:
            raise ConfigError("GillConfig: mapper_dim % heads == 0, samples >= 1, top_k >= 2")
        if self.evidence_k < 1:
            raise ConfigError("GillConfig: evidence_k >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("GillConfig: temperature >= 0 (0: greedy), top_p in (0, 1]")


# --- building blocks --------------------------------------------------------------------------


class Mapper(nn.Module):
    """GILLMapper: [IMG] hidden states + [IMG] embeddings -> `queries` learned queries through
    a small Transformer decoder -> vectors of the generator's width, and a caption length."""

    def __init__(self, config: GillConfig, hidden: int) -> None:
        super().__init__()
        d = config.mapper_dim
        self.inputs = nn.Linear(2 * hidden, d)
        self.queries = nn.Parameter(torch.randn(config.queries, d) * 0.02)
        layer = nn.TransformerDecoderLayer(
            d, config.mapper_heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, config.mapper_layers)
        self.out = nn.Linear(d, config.generator_dim)
        # Zero: the first outputs sit at the origin of the generator's small embeddings (std
        # ~0.02), not ~20x their scale, so the L2 starts near 1 relative to their mean square.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.length = nn.Linear(d, config.queries)  # logits of lengths 1..queries

    def forward(
        self, states: torch.Tensor, embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """states, embeds (B, r, H) -> vectors (B, Q, D_gen), length logits (B, Q)."""
        memory = self.inputs(torch.cat([states, embeds], dim=-1))  # (B, r, d)
        queries = self.queries.expand(len(states), -1, -1)  # (B, Q, d)
        h = self.decoder(queries, memory)  # (B, Q, d)
        return self.out(h), self.length(h.mean(1))


def score_features(top: torch.Tensor) -> torch.Tensor:
    """(B, k) retrieval scores, best first -> (B, 3): top-1, margin over top-2, mean."""
    return torch.stack([top[:, 0], top[:, 0] - top[:, 1], top.mean(1)], dim=1)


def evidence_features(overlap: torch.Tensor) -> torch.Tensor:
    """(B,) best request overlaps -> (B, 3): the overlap, exact (1.0), none (0.0). Not linear
    in the overlap: a partial match (siblings found, the asked-for one not) says "absent" more
    surely than no match at all (the retrieval may have missed the neighbourhood)."""
    return torch.stack([overlap, (overlap >= 1.0).float(), (overlap <= 0.0).float()], dim=1)


def caption_overlaps(request: str, captions: Sequence[str]) -> list[float]:
    """Per caption, the fraction of its words (lower-cased letters and digits) that the
    request contains: 1.0 for a document named exactly as asked."""
    asked = set(WORD.findall(request.lower()))
    out = []
    for caption in captions:
        words = set(WORD.findall(caption.lower()))
        out.append(len(words & asked) / len(words) if words else 0.0)
    return out


def request_overlap(request: str, captions: Sequence[str]) -> float:
    """The decision's evidence feature: the best of `caption_overlaps` (0.0 without any)."""
    return max(caption_overlaps(request, captions), default=0.0)


class Decision(nn.Module):
    """Logistic p(generate | [IMG0] state, retrieval scores, evidence overlap); `temperature`
    is fitted last (temperature scaling) so the probability is calibrated."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(hidden, 1, bias=False)  # GILL's linear classifier
        self.scores = nn.Linear(SCORE_FEATURES, 1)
        self.evidence = nn.Linear(EVIDENCE_FEATURES, 1, bias=False)  # on `evidence_features`
        self.temperature: torch.Tensor
        self.register_buffer("temperature", torch.ones(()))

    def logit(self, state: torch.Tensor, top: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
        """state (B, H), top (B, k), overlap (B,) -> (B,) uncalibrated logits."""
        out = self.hidden(state) + self.scores(score_features(top))  # (B, 1)
        return (out + self.evidence(evidence_features(overlap)))[:, 0]

    def probability(
        self, state: torch.Tensor, top: torch.Tensor, overlap: torch.Tensor
    ) -> torch.Tensor:
        return torch.sigmoid(self.logit(state, top, overlap) / self.temperature)


class GillHeads(nn.Module):
    """Everything GILL trains besides the `[IMG]` rows (which live in the FrozenLM)."""

    def __init__(self, config: GillConfig, hidden: int, retrieval_dim: int) -> None:
        super().__init__()
        self.img_proj = nn.Linear(hidden, retrieval_dim)
        self.mapper = Mapper(config, hidden)
        self.decision = Decision(hidden)

    def query(self, img0: torch.Tensor) -> torch.Tensor:
        return functional.normalize(self.img_proj(img0), dim=-1)  # (B, R)


# --- the generator link ---------------------------------------------------------------------


def generator_fingerprint(racm3: Any) -> str:
    """What the mapper's targets depend on: the generator's embedding table and tokenizer."""
    h = hashlib.sha256(racm3.tokenizer.bpe.to_str().encode())
    h.update(racm3.generator.embed.weight.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def caption_targets(
    racm3: Any, captions: Sequence[str], queries: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's own encoding of each caption: (N, Q, D) input embeddings of its first Q
    BPE tokens (zeros past the end) and (N,) lengths."""
    embed = racm3.generator.embed.weight.detach()
    out = torch.zeros(len(captions), queries, embed.shape[1])
    lengths = torch.zeros(len(captions), dtype=torch.long)
    for i, caption in enumerate(captions):
        ids = racm3.tokenizer.encode_text(caption)[:queries] or [
            racm3.tokenizer.encode_text(" ")[0]
        ]
        out[i, : len(ids)] = embed[torch.tensor(ids)]
        lengths[i] = len(ids)
    return out, lengths


@torch.no_grad()
def draw_images(
    racm3: Any,
    vectors: torch.Tensor,
    documents: Sequence[Any],
    config: GillConfig,
    seed: int = 0,
) -> list[Image.Image]:
    """`config.samples` images from RA-CM3 conditioned on `documents` then the mapped
    caption vectors (L, D): `<bos> m1 <sep> ... <img alt="` vectors `" src="` + codes, with
    the retrieved images' copy hints when the generator has them (the vectors are not
    tokens, so they get no text hints)."""
    from mmrag.models.ra_cm3.tokenizer import code_document

    gen, tok = racm3.generator, racm3.tokenizer
    n, codes = config.samples, tok.config.image_tokens
    coded = [code_document(d.to_document(), racm3.vq) for d in documents]
    room = gen.config.max_seq_len - len(vectors) - 2 - codes  # <alt> vectors <src> codes
    prefix, sources = racm3.fit_documents(coded, room)
    ids = torch.tensor([*prefix, tok.img_alt_id])
    cond = torch.cat(
        [gen.embed(ids), vectors.to(gen.embed.weight), gen.embed(torch.tensor([tok.src_id]))]
    )
    uncond = gen.embed(torch.tensor([tok.bos_id, tok.img_src_id]))
    images = racm3.slotted(sources).images
    hints = None
    if gen.config.hint_slots and any(images):
        cells = [None] * len(cond) + list(range(codes))
        hints = hints_for(cells, images, gen.config.hint_slots)[None].expand(n, -1, -1)
    allowed = torch.zeros(gen.config.vocab_size, dtype=torch.bool)
    allowed[tok.image_offset : tok.vocab_size] = True
    rng = torch.Generator().manual_seed(seed)
    sampling = Sampling(config.temperature, config.top_p)
    streams = [cond, uncond] if config.guidance != 1.0 else [cond]  # CFG needs the second
    caches = [gen.new_cache(n, len(x) + codes) for x in streams]
    first = [None if hints is None else hints[:, : len(cond)], None]
    logits = [
        gen(embeds=x[None].expand(n, -1, -1), cache=c, hints=h)[:, -1]
        for x, c, h in zip(streams, caches, first, strict=False)
    ]
    out = []
    for step in range(codes):
        guided = logits[0]  # (n, V)
        if len(logits) == 2:
            guided = guide(logits[0], logits[1], config.guidance)
        guided = guided.masked_fill(~allowed, -math.inf)
        pick = sample_next(guided, sampling, rng)[:, None]  # (n, 1)
        out.append(pick)
        at = len(cond) + step  # the slot `pick` goes to
        step_hints = [None if hints is None else hints[:, at : at + 1], None]
        logits = [
            gen(pick, cache=c, hints=h)[:, -1] for c, h in zip(caches, step_hints, strict=False)
        ]
    grid = torch.cat(out, 1) - tok.image_offset  # (n, codes)
    side = racm3.vq.config.grid_size
    return list(racm3.vq.decode_images(grid.view(n, side, side)))


# --- GILL -----------------------------------------------------------------------------------


class Gill:
    """FROMAGe's FrozenLM with trained `[IMG]` rows, GILL's heads and the RA-CM3 link: the
    `ImageMaker` a `Chat` calls for every `[IMG0..r-1]` block."""

    def __init__(
        self, model: FrozenLM, heads: GillHeads, config: GillConfig, racm3: Any = None
    ) -> None:
        self.model, self.heads, self.config = model, heads.eval(), config
        self._racm3 = racm3

    @property
    def racm3(self) -> Any:
        """The RA-CM3 model whose conditioning the mapper targets (loaded on first use)."""
        if self._racm3 is None:
            from mmrag.models.ra_cm3.model import RACM3

            self._racm3 = RACM3.from_pretrained(self.config.generator or None)
            found = generator_fingerprint(self._racm3)
            if self.config.generator_fingerprint and found != self.config.generator_fingerprint:
                raise ValueError(
                    "the RA-CM3 generator changed since GILL's mapper was trained "
                    f"({found} != {self.config.generator_fingerprint}): retrain with "
                    "`mmrag train gill`"
                )
        return self._racm3

    def check_compatible(self, fromage: FrozenLM) -> None:
        """GILL must sit on the FROMAGe adapters that built the memory's vectors."""
        names = ("ret_token", "text_proj", "image_proj", "visual_prefix")
        if self.model.fingerprint(names) != fromage.fingerprint(names):
            raise ValueError("this GILL checkpoint was trained on other FROMAGe adapters")

    # -- one [IMG] block ---------------------------------------------------------------------

    @torch.no_grad()
    def mapped(self, states: torch.Tensor) -> torch.Tensor:
        """(r, H) [IMG] states -> (L, D) caption vectors, L from the length head."""
        embeds = self.model.adapters.img_tokens[None]  # (1, r, H)
        vectors, length = self.heads.mapper(states[None], embeds)
        return vectors[0, : int(length.argmax()) + 1]

    @torch.no_grad()
    def image_part(
        self,
        states: torch.Tensor,
        retriever: Retriever,
        options: ChatOptions,
        exclude: set[str],
        request: str = "",
    ) -> ImagePart:
        """Retrieve with the `[IMG0]` query, decide (with `request`, the user's words), and
        generate when the decision says so."""
        query = self.heads.query(states[:1])  # (1, R)
        filters = dict(options.filters or {}) | {"modality": ["image", "mixed"]}
        k = max(options.k, self.config.top_k, self.config.evidence_k)
        hits = retriever.search_vectors(query.numpy(), k, filters, [sorted(exclude)])[0]
        return self.image_for(states, hits, request, options, exclude)

    @property
    def evidence_k(self) -> int:
        """How many documents the decision reads (scores of the top ones, captions of all)."""
        return max(self.config.top_k, self.config.evidence_k)

    @torch.no_grad()
    def image_for(
        self,
        states: torch.Tensor,
        hits: Sequence[SearchResult],
        request: str,
        options: ChatOptions,
        exclude: set[str],
    ) -> ImagePart:
        """Decide on `hits` (best first, from any retriever) whether to show the stored
        document the request names best or to draw a new image from the `[IMG]` `states`."""
        captions = [h.text for h in hits]
        p = self.p_generate(states[0], [h.score for h in hits], request, captions)
        if p < self.config.threshold and hits:
            # The evidence document the request names best (ties: the best-scored), which is
            # what the decision's evidence feature found.
            overlaps = caption_overlaps(request, captions[: self.config.evidence_k])
            best = hits[int(np.argmax(overlaps))]
            exclude.add(best.id)
            return ImagePart("retrieved", "[IMG0]", list(hits[: options.k]), best, p_generate=p)
        query = self.heads.query(states[:1])[0]
        image, info = self.generate(states, query, hits[: self.config.retrieval_k], options.seed)
        return ImagePart("generated", "[IMG0]", list(hits[: options.k]), None, image, p, info)

    @torch.no_grad()
    def p_generate(
        self, img0: torch.Tensor, scores: Sequence[float], request: str, captions: Sequence[str]
    ) -> float:
        """The decision on the `[IMG0]` state, the hits' scores (best first) and captions."""
        top = torch.full((1, self.config.top_k), -1.0)
        values = torch.tensor(list(scores)[: self.config.top_k], dtype=torch.float32)
        top[0, : len(values)] = values
        overlap = torch.tensor([request_overlap(request, captions[: self.config.evidence_k])])
        return float(self.heads.decision.probability(img0[None], top, overlap)[0])

    def generate(
        self,
        states: torch.Tensor,
        query: torch.Tensor,
        documents: Sequence[SearchResult],
        seed: int,
    ) -> tuple[Image.Image, dict[str, Any]]:
        """Draw `samples` images from the mapped vectors and keep the one whose FROMAGe image
        embedding (`W_i v`) is closest to the `[IMG0]` query."""
        from mmrag.models.fromage.conversation import image_features

        vectors = self.mapped(states)
        images = draw_images(self.racm3, vectors, documents, self.config, seed)
        emb = self.model.adapters.project_image(image_features(self.model, images))
        scores = (emb @ query).tolist()
        best = int(np.argmax(scores))
        info = {
            "slots": len(vectors),
            "conditioned_on": [d.id for d in documents],
            "sample_scores": [round(s, 4) for s in scores],
        }
        return images[best], info

    # -- persistence -------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out / FROZEN_LM_DIR)
        self.config.save(out / CONFIG_FILE)
        (out / "config.json").write_text('{"kind": "gill"}\n', encoding="utf-8")
        save_weights(self.heads, out / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        lm: LanguageModel | None = None,
        racm3: Any = None,
        decision: bool = True,
    ) -> Gill:
        """Load strictly; `decision=False` leaves the decision unloaded (fresh), for refitting
        it on a checkpoint whose decision had other inputs (`mmrag train gill
        --decision-only`)."""
        src = Path(directory)
        model = FrozenLM.from_pretrained(src / FROZEN_LM_DIR, lm=lm)
        config = GillConfig.load(src / CONFIG_FILE)
        heads = GillHeads(config, model.language_model.hidden_size, model.config.retrieval_dim)
        state = load_file(str(src / WEIGHTS_FILE))
        if not decision:
            state = {k: v for k, v in state.items() if not k.startswith("decision.")}
            state |= {f"decision.{k}": v for k, v in heads.decision.state_dict().items()}
        heads.load_state_dict(state, strict=True)
        return cls(model, heads, config, racm3)
