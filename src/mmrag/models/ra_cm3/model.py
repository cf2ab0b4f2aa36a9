"""The RA-CM3 model: a memory's retriever + the VQ image tokenizer + the generator.

caption -> image, image -> caption, infilling of images and captions, and pinned in-context
demonstrations in place of retrieval; every output carries its evidence (the ids and scores
of the documents it was conditioned on).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from mmrag.checkpoints import checkpoint_dir
from mmrag.config import Config, ConfigError, RetrieverConfig
from mmrag.documents import load_image
from mmrag.encoders.base import Encoder, l2_normalize
from mmrag.fileio import files_sha256
from mmrag.memory.memory import Memory
from mmrag.memory.store import Filters
from mmrag.models.ra_cm3.compose import (
    analogous_pairs,
    caption_edits,
    recombinations,
    spans_between,
    translate_codes,
)
from mmrag.models.ra_cm3.copy_hints import (
    NO_HINT,
    Cells,
    TextCopy,
    caption_cells,
    image_cells,
    in_slots,
    sequence_hints,
)
from mmrag.models.ra_cm3.decoding import decode
from mmrag.models.ra_cm3.generator import Generator
from mmrag.models.ra_cm3.recolour import ColourMap
from mmrag.models.ra_cm3.tokenizer import (
    CodedDocument,
    ImageCodes,
    MultimodalTokenizer,
    code_document,
)
from mmrag.models.vq.model import VQModel, square_resize
from mmrag.models.vq.reference import (
    paste_reference,
    pixel_difference,
    pixel_distance,
    upscale,
)
from mmrag.retrieval import Retriever, SearchResult
from mmrag.sampling import Sampling, allowed_mask

CONFIG_FILE = "config.json"  # beside generator/, tokenizer/, vq/
# Instead of vq/: {"checkpoint": NAME, "sha256": ...}, the shipped VQ checkpoint the model uses
# (checkpoints/ra-cm3 names checkpoints/vq rather than holding a second copy of it).
VQ_REFERENCE_FILE = "vq.json"
EXACT_K = 8  # documents searched for one holding the caption asked to draw, word for word
MAX_COLOUR_PAIRS = 16  # pairs of images a colour analogy learns from, in rank order
MASK = "<mask>"  # the placeholder a user writes in a caption to infill


def _inference_retriever() -> RetrieverConfig:
    # At inference the query is a caption or an image the user gives: no relevance cap (a
    # near copy in memory is exactly what should be used), redundancy skipping kept.
    return RetrieverConfig(k=2, redundancy_threshold=0.95, candidate_factor=8)


@dataclasses.dataclass(frozen=True)
class RACM3Config(Config):
    """How a trained model generates: retrieval strategy and decoding defaults."""

    preset_prefix: ClassVar[str] = "ra-cm3"

    trained_with_retrieval: bool = True
    # The generator keeps its last hint slot for a retrieved document that is the one asked
    # about (train ra-cm3 --same-document): its image is the query image, or its caption
    # the query caption.
    same_document_slot: bool = False
    retriever: RetrieverConfig = dataclasses.field(default_factory=_inference_retriever)
    samples: int = 4  # caption -> image: N samples reranked by the dual encoder
    guidance: float = 3.0  # classifier-free guidance scale on image tokens (1 = off)
    temperature: float = 1.0
    top_p: float = 0.9
    caption_samples: int = 4  # image -> caption: samples reranked by perplexity
    caption_temperature: float = 0.7
    max_caption_tokens: int = 48
    # Copy interpolation (decoding.py, kNN-LM style), gated by how close the match is. Each
    # image code is drawn from (1 - w) * the model's distribution + w * the code the copied
    # image holds at that cell, and each caption token likewise with the token the copied
    # caption suggests next (copy_hints.TextCopy). The copied document is the same document
    # when retrieval found it (a stored caption to draw, a stored image to caption): then
    # w = exact_copy_weight; else the top retrieved one, with w = copy_weight (images) or
    # text_copy_weight (captions). 0 = the generator alone; nothing retrieved, nothing mixed.
    copy_weight: float = 0.5
    text_copy_weight: float = 0.0
    exact_copy_weight: float = 1.0
    # A retrieved image is the query image when at least this share of its VQ codes are the
    # query's (1 = identical codes; a re-saved or slightly edited copy of a stored image
    # still counts).
    same_image_agreement: float = 0.9
    # ... and, when > 0, no region of its pixels differs from the query's by more than this
    # (the 99th percentile of per-pixel differences, of 255, both at 32 px;
    # reference.pixel_difference): siblings that differ in a small region (a skin tone) can
    # share 90% of their codes and are not the same image (0 = the codes alone decide)
    same_image_difference: float = 0.0
    # caption -> image without the same document: sample r copies the (r mod copy_sources)-th
    # retrieved image, so that samples differ where the retrieved documents do and the dual
    # encoder's reranking chooses among them
    copy_sources: int = 1
    # image -> caption without the same document: the captions of this many retrieved
    # documents, recombined (compose.py), join the generator's samples, and the memory's dual
    # encoder keeps the one that matches the image best (0 = the generator's samples alone,
    # reranked by perplexity)
    compose_k: int = 0
    # caption -> image without the same document: the first copied image is changed by
    # analogy (compose.py) with pairs of documents among the analogy_k retrieved for the
    # caption that differ as the caption differs from the copied document's (0 = off)
    analogy_k: int = 0
    # ... and when the pixels of those pairs show a recolouring (recolour.py: a colour map that
    # explains at least this share of the pairs' difference), the copied image is recoloured
    # and its codes are what is copied (> 1: never; the codes are translated instead)
    colour_analogy_gain: float = 2.0
    # the copy weight for an image so recoloured: the edit the memory's pairs explain is what
    # the caption asks for, so it can be trusted like the same document
    recoloured_copy_weight: float = 1.0
    # image -> caption with composition: the synthesis_k candidates the dual encoder ranks
    # highest are drawn without sampling where a drawing would copy a whole image (a stored
    # document with that caption, or a colour analogy), and the one whose drawing looks most
    # like the image (mean absolute pixel difference at 32 px, at most synthesis_distance of
    # 255) is the caption: analysis by synthesis (0 = off)
    synthesis_k: int = 0
    synthesis_distance: float = 4.0
    # Drawings are `output_size` pixels square (0: the VQ's image size). With
    # `paste_reference`, a drawing keeps the pixels of the image it copied wherever its codes
    # are that image's (models/vq/reference.py), the VQ decoding elsewhere, the seams
    # feathered by `paste_feather` pixels.
    output_size: int = 0
    paste_reference: bool = False
    paste_feather: float = 0.0

    def validate(self) -> None:
        if self.samples < 1 or self.caption_samples < 1 or self.max_caption_tokens < 1:
            raise ConfigError("RACM3Config: samples, caption_samples, max_caption_tokens >= 1")
        if self.guidance < 0 or self.temperature <= 0 or self.caption_temperature <= 0:
            raise ConfigError("RACM3Config: guidance >= 0, temperatures > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("RACM3Config: top_p in (0, 1]")
        weights = ("copy_weight", "text_copy_weight", "exact_copy_weight", "recoloured_copy_weight")
        for name in weights:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"RACM3Config: {name} in [0, 1]")
        if not 0.0 < self.same_image_agreement <= 1.0:
            raise ConfigError("RACM3Config: same_image_agreement in (0, 1]")
        if min(self.output_size, self.paste_feather, self.colour_analogy_gain) < 0:
            raise ConfigError("RACM3Config: output_size, paste_feather, colour_analogy_gain >= 0")
        if min(self.synthesis_k, self.synthesis_distance, self.same_image_difference) < 0:
            raise ConfigError(
                "RACM3Config: synthesis_k, synthesis_distance, same_image_difference >= 0"
            )


# --- outputs --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Evidence:
    """A document the output was conditioned on: retrieved (with its retrieval score) or
    pinned by the user (scored against the query for transparency)."""

    id: str
    score: float
    source: Literal["retrieved", "pinned"]
    text: str = ""
    image: str | None = None

    @classmethod
    def retrieved(cls, hit: SearchResult) -> Evidence:
        return cls(hit.id, hit.score, "retrieved", hit.text, hit.image)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "score": round(self.score, 6), "source": self.source}


@dataclasses.dataclass(frozen=True)
class Reference:
    """An image a drawing copies (at the model's output size) with its VQ codes: where the
    drawing's codes are these, it keeps these pixels."""

    image: Image.Image
    codes: tuple[int, ...]


@dataclasses.dataclass
class ImageOutput:
    """A generated image, its evidence, and every sample's dual-encoder score (the kept one
    is the best)."""

    image: Image.Image
    evidence: list[Evidence]
    scores: list[float]
    codes: list[int]

    def to_json(self, output: str) -> dict[str, Any]:
        return {
            "output": output,
            "evidence": [e.to_json() for e in self.evidence],
            "scores": [round(s, 6) for s in self.scores],
        }


@dataclasses.dataclass
class CaptionOutput:
    """A generated caption, its evidence, and every sampled caption with its perplexity
    (best first; none when composition found a candidate whose drawing looks like the image,
    which the generator then does not sample). `copied`: the id of the stored document whose
    caption was copied (the memory holds the image); `ranked`: with composition, every
    candidate with its dual-encoder score against the image, best (the output) first."""

    text: str
    evidence: list[Evidence]
    candidates: list[tuple[str, float]]
    copied: str | None = None
    ranked: list[tuple[str, float]] = dataclasses.field(default_factory=list)

    @property
    def perplexity(self) -> float:
        """The best sample's perplexity; nan when no sample was drawn (a composed candidate
        verified first)."""
        return min((p for _, p in self.candidates), default=math.nan)

    def to_json(self) -> dict[str, Any]:
        out = {
            "output": self.text,
            "evidence": [e.to_json() for e in self.evidence],
            "candidates": [{"text": t, "perplexity": round(p, 4)} for t, p in self.candidates],
        }
        if self.copied is not None:
            out["copied"] = self.copied
        if self.ranked:
            out["ranked"] = [{"text": t, "match": round(m, 6)} for t, m in self.ranked]
        return out


@dataclasses.dataclass(frozen=True)
class CaptionPlan:
    """A caption's decoding, prepared: the prompt (retrieved documents, then the request), the
    documents it holds, the copy hints, the text copy interpolation, and the id of the stored
    document whose caption is copied whole (the memory holds the image), if any."""

    prompt: list[int]
    evidence: list[Evidence]
    hints: torch.Tensor | None
    copy: TextCopy | None
    copied: str | None


class _Ranking:
    """Caption candidates ranked by the memory's dual encoder against one image; each text is
    encoded once, however many times candidates are added."""

    def __init__(self, encoder: Encoder, image: Image.Image) -> None:
        self.encoder = encoder
        self.image = l2_normalize(encoder.encode_image([image]))[0]
        self.rows: dict[str, NDArray[np.float32]] = {}

    def add(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """Every candidate so far with its score, best first (ties: the first added first)."""
        new = [t for t in dict.fromkeys(texts) if t not in self.rows]
        if new:
            self.rows.update(zip(new, l2_normalize(self.encoder.encode_text(new)), strict=True))
        scored = [(t, float(row @ self.image)) for t, row in self.rows.items()]
        return sorted(scored, key=lambda c: -c[1])

    def vectors(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """The candidates' text rows (the retriever's query vectors for those texts)."""
        return np.stack([self.rows[t] for t in texts])


@dataclasses.dataclass(frozen=True)
class CopySources:
    """What the copy hints copy from, one entry per retrieved document in rank order: its
    first image's codes and its caption's tokens (the text after that image, else its first
    text); empty where it has none."""

    images: tuple[tuple[int, ...], ...]
    captions: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, coded: Sequence[CodedDocument], tok: MultimodalTokenizer) -> CopySources:
        images: list[tuple[int, ...]] = []
        captions: list[tuple[int, ...]] = []
        for doc in coded:
            parts = doc.parts
            at = [i for i, p in enumerate(parts) if isinstance(p, ImageCodes)]
            texts = [p for p in parts if isinstance(p, str) and p]
            image: tuple[int, ...] = ()
            if at:
                first, alt = parts[at[0]], parts[at[0] + 1 : at[0] + 2]
                assert isinstance(first, ImageCodes)
                image = tuple(first.codes)
                texts = [*(t for t in alt if isinstance(t, str) and t), *texts]
            images.append(image)
            captions.append(tuple(tok.encode_text(texts[0])) if texts else ())
        return cls(tuple(images), tuple(captions))

    def same_image(
        self,
        codes: Sequence[int],
        agreement: float = 1.0,
        accept: Callable[[int], bool] | None = None,
    ) -> int | None:
        """The first document whose image holds these codes at `agreement` or more of its
        cells (1 = exactly these codes), and that `accept(i)` also takes, else None."""
        query = np.asarray(codes)
        for i, image in enumerate(self.images):
            if len(image) != len(query) or np.mean(np.asarray(image) == query) < agreement:
                continue
            if accept is None or accept(i):
                return i
        return None

    def copy_image(self, same: int | None = None, skip: int | None = None) -> tuple[int, ...]:
        """The image codes a copy interpolation follows (`RACM3Config.copy_weight`): the same
        document's (`same`) if given, else the top-ranked document's that has an image, other
        than the `skip`-th; () when none has one. One document for the whole image, so a
        copied cell always agrees with its copied neighbours."""
        if same is not None and self.images[same]:
            return self.images[same]
        return next((im for i, im in enumerate(self.images) if im and i != skip), ())

    def same_caption(self, tokens: Sequence[int]) -> int | None:
        """The first document whose caption is exactly these tokens, else None."""
        return next((i for i, text in enumerate(self.captions) if text == tuple(tokens)), None)

    def in_slots(self, slots: int, same_slot: bool, same: int | None = None) -> CopySources:
        """The sources placed in the model's hint slots (copy_hints.in_slots)."""
        return CopySources(
            tuple(tuple(x) for x in in_slots(self.images, slots, same_slot, same)),
            tuple(tuple(x) for x in in_slots(self.captions, slots, same_slot, same)),
        )


# --- the model folder's VQ -----------------------------------------------------------------


def folder_sha256(folder: Path) -> str:
    """SHA-256 over a folder's files (names and bytes, in name order)."""
    return files_sha256(sorted(p for p in folder.iterdir() if p.is_file()), separator=b"\0")


def vq_folder(model: Path) -> Path:
    """The VQ of an RA-CM3 model folder: its vq/, or the shipped checkpoint its vq.json names,
    which must be byte for byte the one the model was saved with."""
    if (model / "vq").is_dir():
        return model / "vq"
    ref = model / VQ_REFERENCE_FILE
    if not ref.is_file():
        raise FileNotFoundError(f"{model} is not an RA-CM3 model folder (no vq/ or vq.json)")
    named = json.loads(ref.read_text(encoding="utf-8"))
    target = checkpoint_dir(named["checkpoint"])
    if folder_sha256(target) != named["sha256"]:
        raise ValueError(
            f"{ref} names the VQ checkpoint {named['checkpoint']!r} with SHA-256 "
            f"{named['sha256'][:12]}..., but {target} differs: it is not the VQ this model uses"
        )
    return target


def reference_vq(model: str | Path, checkpoint: str = "vq") -> None:
    """Replace the model folder's vq/ by vq.json naming the shipped VQ checkpoint
    `checkpoint`, which must be identical to it (to ship one copy of the VQ)."""
    folder = Path(model)
    target = checkpoint_dir(checkpoint)
    digest = folder_sha256(folder / "vq")
    if folder_sha256(target) != digest:
        raise ValueError(f"{folder / 'vq'} is not the checkpoint {checkpoint!r} ({target})")
    (folder / VQ_REFERENCE_FILE).write_text(
        json.dumps({"checkpoint": checkpoint, "sha256": digest}, indent=2) + "\n",
        encoding="utf-8",
    )
    shutil.rmtree(folder / "vq")


# --- the model ------------------------------------------------------------------------------


class RACM3:
    """Generator + tokenizer + VQ, retrieving from `memory` (None: no retrieval possible)."""

    def __init__(
        self,
        generator: Generator,
        tokenizer: MultimodalTokenizer,
        vq: VQModel,
        config: RACM3Config | None = None,
        memory: Memory | None = None,
    ) -> None:
        if generator.config.vocab_size < tokenizer.vocab_size:
            raise ValueError("the generator's vocabulary is smaller than the tokenizer's")
        if tokenizer.config.image_tokens != vq.config.tokens_per_image:
            raise ValueError("the tokenizer and the VQ disagree on tokens per image")
        self.generator, self.tokenizer, self.vq = generator.eval(), tokenizer, vq.eval()
        self.config = config or RACM3Config()
        self.memory = memory
        self.retriever = Retriever(memory, self.config.retriever) if memory is not None else None
        self.grid = vq.config.grid_size
        tok = tokenizer
        self.image_allowed = allowed_mask(
            generator.config.vocab_size, [(tok.image_offset, tok.vocab_size)]
        )
        self.text_allowed = allowed_mask(
            generator.config.vocab_size, [(tok.text_offset, tok.image_offset)], [tok.eos_id]
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path | None = None,
        memory: Memory | None = None,
        device: torch.device | str = "cpu",
    ) -> RACM3:
        """Load a model folder (`mmrag train ra-cm3 --out`); default: the shipped checkpoint."""
        src = Path(directory) if directory is not None else checkpoint_dir("ra-cm3")
        for sub in ("generator", "tokenizer"):
            if not (src / sub).is_dir():
                raise FileNotFoundError(f"{src} is not an RA-CM3 model folder (no {sub}/)")
        config = RACM3Config.load(src / CONFIG_FILE) if (src / CONFIG_FILE).is_file() else None
        return cls(
            Generator.from_pretrained(src / "generator", device),
            MultimodalTokenizer.from_pretrained(src / "tokenizer"),
            VQModel.from_pretrained(vq_folder(src), device),
            config,
            memory,
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the model folder `from_pretrained` reads: generator/, tokenizer/, vq/ and
        config.json."""
        out = Path(directory)
        self.generator.save_pretrained(out / "generator")
        self.tokenizer.save_pretrained(out / "tokenizer")
        self.vq.save_pretrained(out / "vq")
        self.config.save(out / CONFIG_FILE)

    def with_memory(self, memory: Memory | None) -> RACM3:
        """The same weights retrieving from another memory (e.g. one updated after training)."""
        return RACM3(self.generator, self.tokenizer, self.vq, self.config, memory)

    def with_config(self, config: RACM3Config | None = None, **changes: Any) -> RACM3:
        """The same weights and memory decoding with `config` (default: this model's), with
        `changes` to its fields (e.g. `copy_weight=1.0`)."""
        base = config or self.config
        changed = base.replace(**changes) if changes else base
        return RACM3(self.generator, self.tokenizer, self.vq, changed, self.memory)

    def with_vq(self, vq: VQModel) -> RACM3:
        """The same model drawing with another VQ that codes images as this one's does (same
        encoder and codebook, e.g. a decoder refined with `mmrag train vq --decoder-only`)."""
        if not self.vq.same_codes(vq):
            raise ValueError("that VQ codes images differently (encoder or codebook differ)")
        return RACM3(self.generator, self.tokenizer, vq.eval(), self.config, self.memory)

    # -- evidence ---------------------------------------------------------------------------

    def evidence(
        self,
        text: str | None = None,
        image: Image.Image | None = None,
        retrieval: bool = True,
        demos: Sequence[str] = (),
        k: int | None = None,
        filters: Filters | None = None,
    ) -> list[Evidence]:
        """The documents to condition on: pinned `demos` (memory ids) in place of retrieval,
        else the top-k retrieved for the text and/or image, else none."""
        if not demos and (not retrieval or self.retriever is None):
            return []
        if self.memory is None or self.retriever is None:
            raise ValueError("pinned demonstrations need a memory to read them from")
        query = self.retriever.encode(text, image)
        if demos:
            found = self.memory.get(list(demos))
            missing = [d for d, f in zip(demos, found, strict=True) if f is None]
            if missing:
                raise KeyError(f"pinned documents not in the memory: {', '.join(missing)}")
            docs = [f for f in found if f is not None]
            scores = self.memory.vectors([d.seq for d in docs]) @ query
            return [
                Evidence(d.id, float(s), "pinned", d.text, d.image)
                for d, s in zip(docs, scores, strict=True)
            ]
        return self._retrieved(query, k or self.config.retriever.k, filters)

    def _retrieved(
        self,
        query: np.ndarray,
        k: int,
        filters: Filters | None,
        config: RetrieverConfig | None = None,
    ) -> list[Evidence]:
        """The top-k documents for an encoded query."""
        assert self.retriever is not None
        hits = self.retriever.search_vectors(query[None], k, filters, config=config)[0]
        return [Evidence.retrieved(h) for h in hits]

    def _coded(self, evidence: Sequence[Evidence]) -> list[CodedDocument]:
        if not evidence:
            return []
        assert self.memory is not None
        docs = self.memory.get([e.id for e in evidence])
        return [code_document(d.to_document(), self.vq) for d in docs if d is not None]

    def _prefix(
        self, evidence: list[Evidence], room: int
    ) -> tuple[list[int], list[Evidence], CopySources]:
        """`fit_documents` of the evidence's documents; also the kept evidence."""
        prefix, sources = self.fit_documents(self._coded(evidence), room)
        return prefix, evidence[: len(sources.images)], sources

    def fit_documents(
        self, coded: Sequence[CodedDocument], room: int
    ) -> tuple[list[int], CopySources]:
        """`<bos> m1 <sep> m2 <sep>` fitting in `room` tokens: the lowest-ranked documents are
        dropped first when the prompt would not fit. Also the kept documents' copy-hint
        sources in rank order."""
        tok = self.tokenizer
        docs = [[*tok.encode_document(c), tok.sep_id] for c in coded]
        while 1 + sum(map(len, docs)) > room and docs:
            docs.pop()
        sources = CopySources.of(coded[: len(docs)], tok)
        return [tok.bos_id, *(t for d in docs for t in d)], sources

    def _hints(
        self,
        cells: Cells,
        sources: CopySources,
        ids: Sequence[int] = (),
        words: Cells | None = None,
        complete: bool = True,
    ) -> torch.Tensor | None:
        """The copy hints (len(cells), S) of a sequence whose tokens are `cells` (None without
        a hint table or without sources), from `sources` in slot order (`slotted`); with
        text hints, also those of the caption tokens of its first tokens `ids`, whose caption
        cells are `words` (as in training: the prompt's caption gets them too), with
        `complete` as in `text_hints_for`."""
        cfg = self.generator.config
        words = words if cfg.text_hints and any(sources.captions) else None
        if not cfg.hint_slots or not (any(sources.images) or words is not None):
            return None
        return sequence_hints(
            cells,
            sources.images,
            cfg.hint_slots,
            cfg.hint_codes,
            ids,
            words,
            sources.captions,
            complete,
        )

    def slotted(self, sources: CopySources, same: int | None = None) -> CopySources:
        """`sources` placed in the generator's hint slots; `same` is the retrieved document
        that is the one asked about, which a model with the same-document slot copies
        through it."""
        slots = self.generator.config.hint_slots
        return sources.in_slots(slots, self.config.same_document_slot, same)

    def _copy(self, image: Sequence[int], cells: range) -> list[int] | None:
        """The copy interpolation's suggested tokens for `cells` of the image being drawn:
        `image`'s codes there as token ids (None without an image to copy)."""
        if len(image) != self.tokenizer.config.image_tokens:
            return None
        return [self.tokenizer.image_offset + image[c] for c in cells]

    def _room(self, main_tokens: int) -> int:
        room = self.generator.config.max_seq_len - main_tokens
        if room < 1:
            raise ValueError(
                f"the request needs {main_tokens} tokens; the model holds "
                f"{self.generator.config.max_seq_len}"
            )
        return room

    # -- caption -> image ---------------------------------------------------------------------

    def generate_image(
        self,
        caption: str,
        samples: int | None = None,
        guidance: float | None = None,
        retrieval: bool = True,
        demos: Sequence[str] = (),
        seed: int = 0,
        k: int | None = None,
        filters: Filters | None = None,
        copy_weight: float | None = None,
    ) -> ImageOutput:
        """Draw `samples` images for `caption` with classifier-free guidance and keep the one
        the memory's dual encoder scores highest against the caption. `k` and `filters`
        change what is retrieved (default: the model config's k, no filters); `copy_weight`
        the copy interpolation's weight, whatever the match (default: the model config's gate,
        `exact_copy_weight` when the memory holds this caption, `recoloured_copy_weight` when a
        colour analogy recoloured the copied image, else `copy_weight`)."""
        cfg, tok = self.config, self.tokenizer
        samples = samples or cfg.samples
        guidance = cfg.guidance if guidance is None else guidance
        k = k or cfg.retriever.k
        analogies = cfg.analogy_k if not demos else 0
        wide = max(k, cfg.copy_sources, analogies)
        if demos or not retrieval or self.retriever is None:
            found = self.evidence(caption, None, retrieval, demos, wide, filters)
        else:  # a document with this very caption, if any, is what to copy
            query = self.retriever.encode(caption)
            found = self._retrieved(query, wide, filters)
            holder = self._stored_caption(caption, query, filters)
            if holder is not None:
                found = [holder, *(e for e in found if e.id != holder.id)]
        pool = found[: max(k, cfg.copy_sources)] if not demos else found
        words_ids = tok.encode_text(caption)
        main = [tok.img_alt_id, *words_ids, tok.src_id]
        n = tok.config.image_tokens
        coded = self._coded(pool)
        shown = len(pool) if demos else k
        prefix, retrieved = self.fit_documents(coded[:shown], self._room(len(main) + n))
        evidence = pool[: len(retrieved.images)]
        same = retrieved.same_caption(words_ids)
        gated = cfg.exact_copy_weight if same is not None else cfg.copy_weight
        if same is not None:
            drawn = [retrieved.copy_image(same)]
            references = [self._reference(pool[same], drawn[0])]
        else:  # sample r copies the (r mod copy_sources)-th retrieved image
            stored = CopySources.of(coded, tok).images
            with_image = [i for i, im in enumerate(stored) if im][: max(1, cfg.copy_sources)]
            drawn = [stored[i] for i in with_image] or [()]
            references = [self._reference(pool[i], stored[i]) for i in with_image] or [None]
            evidence = pool[: max(len(evidence), with_image[-1] + 1 if with_image else 0)]
            if analogies and with_image:
                top = pool[with_image[0]]
                drawn[0], references[0], used, recoloured = self._analogy(
                    caption, top, drawn[0], found[:analogies]
                )
                evidence += [e for e in used if e not in evidence]
                gated = cfg.recoloured_copy_weight if recoloured else gated
        copies = [self._copy(drawn[r % len(drawn)], range(n)) for r in range(samples)]
        copy_weight = gated if copy_weight is None else copy_weight
        references = [references[r % len(references)] for r in range(samples)]
        if copy_weight >= 1.0 and all(c is not None for c in copies):
            # each cell is drawn from the copied code alone: nothing to sample, and samples
            # differ only where they copy different images
            distinct = min(samples, len(drawn))
            grids = [[t - tok.image_offset for t in c] for c in copies[:distinct] if c]
            references = references[:distinct]
        else:
            grids = self._sample_codes(
                prefix, main, retrieved, same, copies, copy_weight, samples, guidance, seed
            )
        images = self._pixels(grids, references)
        scores = self.image_text_scores(images, caption)
        best = int(np.argmax(scores)) if scores else 0
        return ImageOutput(images[best], evidence, scores, grids[best])

    def _sample_codes(
        self,
        prefix: list[int],
        main: list[int],
        retrieved: CopySources,
        same: int | None,
        copies: Sequence[list[int] | None],
        copy_weight: float,
        samples: int,
        guidance: float,
        seed: int,
    ) -> list[list[int]]:
        """`samples` code grids for the caption prompt `prefix + main`, with guidance, the copy
        hints of the `retrieved` documents and the copy interpolation towards `copies`."""
        cfg, tok = self.config, self.tokenizer
        n = tok.config.image_tokens
        copy = [[NO_HINT] * n if c is None else c for c in copies]
        sources = self.slotted(retrieved, same)
        prompt = prefix + main
        uncond = [tok.bos_id, tok.img_src_id]
        words = caption_cells(len(prompt), len(prefix) + 1, len(prompt) - 1)
        hints = self._hints([None] * len(prompt) + list(range(n)), sources, prompt, words)
        decoded = decode(
            self.generator,
            [prompt] * samples,
            n,
            self.image_allowed,
            Sampling(cfg.temperature, cfg.top_p),
            [uncond] * samples,
            guidance,
            pad_id=tok.pad_id,
            generator=torch.Generator().manual_seed(seed),
            hints=None if hints is None else [hints] * samples,
            copy=copy,
            copy_weight=copy_weight,
        )
        return [[t - tok.image_offset for t in row] for row in decoded.tokens]

    def _stored_caption(
        self, caption: str, query: np.ndarray, filters: Filters | None
    ) -> Evidence | None:
        """A document with an image and exactly this caption among the EXACT_K its encoded
        `query` retrieves without redundancy skipping (which would drop a near twin of the top
        one: `woman and man holding hands: light skin tone, dark skin tone` is nearly its
        swapped sibling to the dual encoder), else None."""
        hits = self._retrieved(query, EXACT_K, filters, RetrieverConfig(k=EXACT_K))
        return next((e for e in hits if e.text == caption and e.image), None)

    @property
    def output_size(self) -> int:
        """The side in pixels of the images this model returns."""
        return self.config.output_size or self.vq.config.image_size

    def _reference(self, evidence: Evidence, codes: Sequence[int]) -> Reference | None:
        """The retrieved document's image (at the output size) with its codes, to keep its
        pixels where a drawing copies its codes; None without pasting or an image file."""
        if not self.config.paste_reference or not evidence.image or not codes:
            return None
        return Reference(self._evidence_pixels(evidence), tuple(codes))

    def _evidence_pixels(self, evidence: Evidence) -> Image.Image:
        assert evidence.image is not None
        return _stored_pixels(evidence.image, self.output_size)

    def _pixels(
        self, grids: Sequence[Sequence[int]], references: Sequence[Reference | None]
    ) -> list[Image.Image]:
        """The images of these code grids at the output size: the VQ's decoding, with each
        grid's reference pixels kept where its codes agree (`paste_reference`)."""
        decoded = self.vq.decode_images(torch.tensor(grids).view(len(grids), self.grid, self.grid))
        size, feather = self.output_size, self.config.paste_feather
        return [
            upscale(image, size)
            if ref is None
            else paste_reference(image, grid, ref.image, ref.codes, size, feather)
            for image, grid, ref in zip(decoded, grids, references, strict=True)
        ]

    def _analogy(
        self, caption: str, copied: Evidence, codes: Sequence[int], found: Sequence[Evidence]
    ) -> tuple[tuple[int, ...], Reference | None, list[Evidence], bool]:
        """The copied document's codes changed as the memory's documents change where their
        captions differ as `caption` differs from the copied document's caption (compose.py:
        `man cook: medium -> dark skin tone` shows the codes of a darker skin), the reference
        whose pixels the drawing keeps, and those documents; unchanged, and none, without such
        pairs among `found`; also whether it was recoloured: when the pairs' pixels show a
        recolouring (recolour.py), the copied image itself is recoloured and coded, and is
        both the codes and the reference."""
        reference = self._reference(copied, codes)
        pairs = analogous_pairs([e.text for e in found], caption_edits(copied.text, caption))
        if not pairs:
            return tuple(codes), reference, [], False
        used = sorted({i for pair in pairs for i in pair})
        recoloured = self._recolour(copied, [(found[i], found[j]) for i, j in pairs])
        if recoloured is not None:
            new = tuple(int(c) for c in self.vq.encode_images([recoloured])[0].flatten())
            keep = Reference(recoloured, new) if self.config.paste_reference else None
            return new, keep, [found[i] for i in used], True
        images = CopySources.of(self._coded([found[i] for i in used]), self.tokenizer).images
        grid = dict(zip(used, images, strict=True))
        aligned = [
            (grid[i], grid[j]) for i, j in pairs if len(grid[i]) == len(grid[j]) == len(codes)
        ]
        translated = tuple(translate_codes(codes, aligned))
        return translated, reference, [found[i] for i in used], False

    def _recolour(
        self, copied: Evidence, pairs: Sequence[tuple[Evidence, Evidence]]
    ) -> Image.Image | None:
        """The copied document's image recoloured as the pairs' images are (at the output
        size), when their colour map explains at least `colour_analogy_gain` of their
        difference; else None."""
        cfg = self.config
        with_images = [(a, b) for a, b in pairs if a.image and b.image][:MAX_COLOUR_PAIRS]
        if cfg.colour_analogy_gain > 1.0 or not copied.image or not with_images:
            return None
        pixels = [
            (np.asarray(self._evidence_pixels(a)), np.asarray(self._evidence_pixels(b)))
            for a, b in with_images
        ]
        colours = ColourMap.learn(pixels)
        if not colours.moves_anything or colours.gain(pixels) < cfg.colour_analogy_gain:
            return None
        return Image.fromarray(colours.apply(np.asarray(self._evidence_pixels(copied))))

    def image_text_scores(self, images: Sequence[Image.Image], caption: str) -> list[float]:
        """The memory's dual-encoder score of each image against the caption (empty without a
        memory: then samples are not reranked)."""
        if self.memory is None:
            return [0.0] * len(images)
        encoder = self.memory.encoder
        text = l2_normalize(encoder.encode_text([caption]))[0]
        return [float(s) for s in l2_normalize(encoder.encode_image(list(images))) @ text]

    # -- image -> caption ---------------------------------------------------------------------

    def generate_caption(
        self,
        image: Image.Image,
        samples: int | None = None,
        retrieval: bool = True,
        demos: Sequence[str] = (),
        seed: int = 0,
        k: int | None = None,
        filters: Filters | None = None,
        copy_weight: float | None = None,
        compose: bool | None = None,
    ) -> CaptionOutput:
        """Sample captions as the infilling of the alt text (`_caption`): the stored caption
        when the memory holds the image; else, with `compose` (default: the config's
        `compose_k` > 0), the samples and the recombined captions of the `compose_k` top
        retrieved documents ranked by the dual encoder (`_compose`); else the sample of
        lowest perplexity. `copy_weight`: the text copy interpolation's weight, whatever the
        match (default: the model config's gate)."""
        cfg, tok = self.config, self.tokenizer
        grid, codes = self._image_tokens(image)
        sentinel = tok.sentinel_ids[0]
        main = [tok.img_alt_id, sentinel, tok.src_id, *codes, tok.close_id, sentinel]
        compose = cfg.compose_k > 0 if compose is None else compose
        pool, shown = self._caption_evidence(None, image, retrieval, demos, k, filters, compose)
        plan = self._caption_plan(main, grid.codes, shown, copy_weight=copy_weight, pixels=image)
        if plan.copied is not None or not compose or not pool:
            return self._caption(plan, samples, seed)
        return self._compose(
            image,
            plan,
            recombinations([e.text for e in pool]),
            lambda text: text,
            pool,
            lambda: self._caption(plan, samples, seed),
            verify=not demos,
        )

    def infill_caption(
        self,
        image: Image.Image,
        caption: str,
        retrieval: bool = True,
        demos: Sequence[str] = (),
        samples: int | None = None,
        seed: int = 0,
        copy_weight: float | None = None,
        compose: bool | None = None,
    ) -> CaptionOutput:
        """Fill the one `<mask>` in `caption` (e.g. "woman dancing: <mask> skin tone"): the
        span between the given left and right text, which the copied caption (`_caption`)
        suggests up to where it goes on as the right text does; with composition (as in
        `generate_caption`), the spans that retrieved captions hold between the same words
        join the samples, ranked by the dual encoder."""
        if caption.count(MASK) != 1:
            raise ValueError(f"the caption must contain {MASK} exactly once")
        tok = self.tokenizer
        left, right = caption.split(MASK)
        # a space before the mask belongs to the span's first word (the BPE writes " dark")
        left = left.rstrip()
        left_ids, right_ids = tok.encode_text(left), tok.encode_text(right)
        grid, codes = self._image_tokens(image)
        sentinel = tok.sentinel_ids[0]
        main = [
            tok.img_alt_id,
            *left_ids,
            sentinel,
            *right_ids,
            tok.src_id,
            *codes,
            tok.close_id,
            sentinel,
        ]
        cfg = self.config
        compose = cfg.compose_k > 0 if compose is None else compose
        query = left.strip() or None
        pool, shown = self._caption_evidence(query, image, retrieval, demos, None, None, compose)
        plan = self._caption_plan(main, grid.codes, shown, left_ids, right_ids, copy_weight, image)

        def whole(span: str) -> str:
            return _glue([left, span, right])

        if plan.copied is None and compose and pool:
            spans = spans_between([e.text for e in pool], left, right)
            return self._compose(
                image,
                plan,
                spans,
                whole,
                pool,
                lambda: self._caption(plan, samples, seed),
                verify=not demos,
            )
        out = self._caption(plan, samples, seed)
        out.text = whole(out.text)
        out.candidates = [(whole(t), p) for t, p in out.candidates]
        return out

    def _caption_evidence(
        self,
        text: str | None,
        image: Image.Image,
        retrieval: bool,
        demos: Sequence[str],
        k: int | None,
        filters: Filters | None,
        compose: bool,
    ) -> tuple[list[Evidence], list[Evidence]]:
        """What a caption is conditioned on: the documents retrieved (or pinned), enough of
        them for composition (`compose_k`) when `compose`, and the ones the generator's prompt
        holds (the first k, or every pinned one)."""
        k = k or self.config.retriever.k
        wanted = max(k, self.config.compose_k) if compose else k
        pool = self.evidence(text, image, retrieval, demos, wanted, filters)
        return pool, pool if demos else pool[:k]

    def _compose(
        self,
        image: Image.Image,
        plan: CaptionPlan,
        texts: Sequence[str],
        whole: Callable[[str], str],
        pool: Sequence[Evidence],
        sample: Callable[[], CaptionOutput],
        verify: bool = True,
    ) -> CaptionOutput:
        """The candidate the memory's dual encoder scores highest against `image`, among
        `whole(text)` of each of `texts` and the generator's samples (`sample()`); its
        evidence: the prompt's (`plan`) and the other documents of `pool` whose captions were
        recombined. With `verify` (not with pinned demonstrations, which replace retrieval),
        the candidate whose drawing looks like the image goes first (`_verified`): tried on
        the composed candidates first, so that the generator samples only when none of them
        verifies."""
        full = list(dict.fromkeys(whole(t) for t in texts if t.strip()))
        if not full or self.memory is None:
            sampled = sample()
            candidates = [(whole(t), p) for t, p in sampled.candidates]
            return dataclasses.replace(sampled, text=candidates[0][0], candidates=candidates)
        ranking = _Ranking(self.memory.encoder, image)
        tried: dict[str, tuple[float, list[Evidence]] | None] = {}
        samples: list[tuple[str, float]] = []
        ranked = ranking.add(full)
        found = self._verified(image, ranked, ranking, tried) if verify else None
        if found is None:
            samples = [(whole(t), p) for t, p in sample().candidates]
            ranked = ranking.add([t for t, _ in samples])
            found = self._verified(image, ranked, ranking, tried) if verify else None
        drew: list[Evidence] = []
        if found is not None:
            best, drew = found
            ranked = sorted(ranked, key=lambda c: c[0] != best)  # stable: the rest keep order
        evidence = list(plan.evidence)
        for e in [*pool, *drew]:
            if e.id not in {x.id for x in evidence}:
                evidence.append(e)
        return CaptionOutput(ranked[0][0], evidence, samples, None, ranked)

    def _verified(
        self,
        image: Image.Image,
        ranked: list[tuple[str, float]],
        ranking: _Ranking,
        tried: dict[str, tuple[float, list[Evidence]] | None],
    ) -> tuple[str, list[Evidence]] | None:
        """The candidate whose drawing looks most like `image` within `synthesis_distance`,
        among the `synthesis_k` best of `ranked` that can be drawn without sampling
        (`_imagined`), and the documents its drawing used; None without one. `tried` keeps
        each candidate's distance (None: not drawable) across calls, so that a candidate is
        drawn once."""
        cfg = self.config
        texts = [t for t, _ in ranked[: cfg.synthesis_k]]
        new = [t for t in texts if t not in tried]
        if new and self.retriever is not None:
            k = max(cfg.retriever.k, cfg.analogy_k)
            found = self.retriever.search_vectors(ranking.vectors(new), k)
            for text, hits in zip(new, found, strict=True):
                drawn, used = self._imagined(text, [Evidence.retrieved(h) for h in hits])
                tried[text] = None if drawn is None else (pixel_distance(image, drawn), used)
        near = [(hit[0], t, hit[1]) for t in texts if (hit := tried.get(t)) is not None]
        if not near:
            return None
        distance, best, used = min(near, key=lambda n: n[0])
        return (best, used) if distance <= cfg.synthesis_distance else None

    def _imagined(
        self, caption: str, found: Sequence[Evidence] | None = None
    ) -> tuple[Image.Image | None, list[Evidence]]:
        """What a drawing of `caption` copies whole, at the output size, and the documents it
        comes from: the image of a retrieved document with that very caption, or the top
        retrieved image recoloured by a colour analogy (`_recolour`); None where a drawing
        would have to be sampled. `found`: what retrieval finds for the caption, if known."""
        cfg = self.config
        if found is None:
            found = self.evidence(caption, None, k=max(cfg.retriever.k, cfg.analogy_k))
        with_image = [e for e in found if e.image]
        stored = next((e for e in with_image if e.text == caption), None)
        if stored is not None:
            return self._evidence_pixels(stored), [stored]
        if not with_image or not cfg.analogy_k:
            return None, []
        top = with_image[0]
        pairs = analogous_pairs([e.text for e in found], caption_edits(top.text, caption))
        recoloured = self._recolour(top, [(found[i], found[j]) for i, j in pairs])
        if recoloured is None:
            return None, []
        return recoloured, [top, *(found[i] for i in sorted({i for p in pairs for i in p}))]

    def _image_tokens(self, image: Image.Image) -> tuple[ImageCodes, list[int]]:
        """The image's VQ code grid and its tokens."""
        grid = ImageCodes.of(self.vq.encode_images([image])[0])
        return grid, self.tokenizer.encode_image(grid)

    def _caption_plan(
        self,
        main: list[int],
        image: Sequence[int],
        evidence: list[Evidence],
        left: Sequence[int] = (),
        right: Sequence[int] = (),
        copy_weight: float | None = None,
        pixels: Image.Image | None = None,
    ) -> CaptionPlan:
        """How to decode the caption that `main` (ending with its sentinel) asks for of the
        image whose VQ codes are `image` (its `pixels`, if given, for the same-image check),
        `left` and `right` the tokens of a kept left and right context (caption infilling).
        The text copy interpolation follows the same document's caption (`exact_copy_weight`)
        when retrieval found the image itself, else the top retrieved caption
        (`text_copy_weight`); `copy_weight` overrides either."""
        cfg, tok = self.config, self.tokenizer
        start = len(left)
        prefix, evidence, retrieved = self._prefix(
            evidence, self._room(len(main) + cfg.max_caption_tokens)
        )
        accept = None
        if pixels is not None and cfg.same_image_difference > 0:

            def accept(i: int) -> bool:
                found = evidence[i]
                return found.image is not None and (
                    pixel_difference(pixels, self._evidence_pixels(found))
                    <= cfg.same_image_difference
                )

        same = retrieved.same_image(image, cfg.same_image_agreement, accept)
        sources = self.slotted(retrieved, same)
        followed = (
            retrieved.captions[same]
            if same is not None
            else next((c for c in retrieved.captions if c), ())
        )
        if copy_weight is None:
            copy_weight = cfg.exact_copy_weight if same is not None else cfg.text_copy_weight
        copied = evidence[same].id if same is not None and copy_weight == 1.0 else None
        prompt = prefix + main
        cells = image_cells(prompt, len(prefix), tok.image_offset, tok.config.image_codes)
        words = None
        if start:  # the kept left context: main = <alt> left <sentinel> ...
            words = caption_cells(len(prompt), len(prefix) + 1, len(prefix) + 1 + start)
        hints = self._hints(
            cells + [None] * cfg.max_caption_tokens, sources, prompt, words, complete=False
        )
        copy = None
        # the hints (a model with text_hints) follow the slots; without slots, the
        # interpolation alone follows the retrieved captions
        captions = sources.captions if self.generator.config.hint_slots else retrieved.captions
        if any(captions):
            offset = self.generator.config.hint_codes
            copy_from = captions.index(followed) if followed and followed in captions else None
            copy = TextCopy(
                captions,
                tok.eos_id,
                offset,
                start,
                copy_from,
                copy_weight,
                tuple(left),
                tuple(right),
            )
        return CaptionPlan(prompt, evidence, hints, copy, copied)

    def _caption(self, plan: CaptionPlan, samples: int | None, seed: int) -> CaptionOutput:
        """Sample `samples` (default: the config's) captions as `plan` says, best first by
        perplexity."""
        cfg, tok = self.config, self.tokenizer
        samples = samples or cfg.caption_samples
        decoded = decode(
            self.generator,
            [plan.prompt] * samples,
            cfg.max_caption_tokens,
            self.text_allowed,
            Sampling(cfg.caption_temperature, cfg.top_p),
            stop_id=tok.eos_id,
            pad_id=tok.pad_id,
            generator=torch.Generator().manual_seed(seed),
            hints=None if plan.hints is None else [plan.hints] * samples,
            text_copy=None if plan.copy is None else [plan.copy] * samples,
        )
        texts = [tok.decode_text([t for t in row if t != tok.eos_id]) for row in decoded.tokens]
        candidates = sorted(
            {t: math.exp(n) for t, n in zip(texts, decoded.mean_nll, strict=True)}.items(),
            key=lambda c: c[1],
        )
        return CaptionOutput(candidates[0][0], plan.evidence, candidates, plan.copied)

    # -- image infilling ------------------------------------------------------------------------

    def infill_image(
        self,
        image: Image.Image,
        rows: tuple[int, int],
        caption: str | None = None,
        retrieval: bool = True,
        demos: Sequence[str] = (),
        seed: int = 0,
        copy_weight: float | None = None,
    ) -> ImageOutput:
        """Regenerate the band of VQ grid rows [rows[0], rows[1]) of `image` (each row is
        image_size / grid pixels high) given the rest of the image and optionally a caption;
        the rest of the image keeps its codes. `copy_weight`: the copy interpolation with the
        top retrieved image's codes in the band (default: the model config's)."""
        top, bottom = rows
        if not 0 <= top < bottom <= self.grid:
            raise ValueError(f"rows must satisfy 0 <= top < bottom <= {self.grid}")
        cfg, tok = self.config, self.tokenizer
        given, codes = self._image_tokens(image)
        a, b = top * self.grid, bottom * self.grid
        sentinel = tok.sentinel_ids[0]
        head = (
            [tok.img_alt_id, *tok.encode_text(caption), tok.src_id] if caption else [tok.img_src_id]
        )
        main = [*head, *codes[:a], sentinel, *codes[b:], tok.close_id, sentinel]
        evidence = self.evidence(caption, image, retrieval, demos)
        prefix, evidence, retrieved = self._prefix(evidence, self._room(len(main) + b - a))
        # not the image being infilled, where the memory holds it: that would copy its band back
        itself = retrieved.same_image(given.codes, cfg.same_image_agreement)
        copy = self._copy(retrieved.copy_image(skip=itself), range(a, b))
        sources = self.slotted(retrieved)  # the image is partly unknown: no same document
        n = tok.config.image_tokens
        cells: Cells = [None] * (len(prefix) + len(head))
        cells += [*range(a), None, *range(b, n), None, None, *range(a, b)]
        prompt = prefix + main
        words = caption_cells(len(prompt), len(prefix) + 1, len(prefix) + len(head) - 1)
        hints = self._hints(cells, sources, prompt, words if caption else None)
        decoded = decode(
            self.generator,
            [prompt],
            b - a,
            self.image_allowed,
            Sampling(cfg.temperature, cfg.top_p),
            pad_id=tok.pad_id,
            generator=torch.Generator().manual_seed(seed),
            hints=None if hints is None else [hints],
            copy=None if copy is None else [copy],
            copy_weight=cfg.copy_weight if copy_weight is None else copy_weight,
        )
        filled = [*codes[:a], *decoded.tokens[0], *codes[b:]]
        grid = [t - tok.image_offset for t in filled]
        # outside the band (and inside it where the codes come back unchanged) the image keeps
        # its own pixels
        kept = Reference(square_resize(image, self.output_size), tuple(given.codes))
        out = self._pixels([grid], [kept if cfg.paste_reference else None])[0]
        scores = self.image_text_scores([out], caption) if caption else [0.0]
        return ImageOutput(out, evidence, scores, grid)


@functools.lru_cache(maxsize=256)
def _stored_pixels(path: str, size: int) -> Image.Image:
    """A stored image file square-resized to `size` (never modified by callers). The memory's
    blobs are named by their content's SHA-256, so a path always holds the same image."""
    return square_resize(load_image(path), size)


def _glue(parts: Sequence[str]) -> str:
    """Text parts joined by one space, none before a part that starts with punctuation."""
    out = ""
    for part in (" ".join(p.split()) for p in parts):
        if part:
            out += part if not out or part[0] in ",.;:!?" else " " + part
    return out
