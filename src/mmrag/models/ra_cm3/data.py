"""RA-CM3 training data: the coded corpus, the held-out variants, precomputed retrievals and
the serialised training sequences (RA-CM3 section 3.3, CM3 section 2.2).

- **Corpus.** Every document with one image and a caption, its image as VQ codes (encoded
  once and cached), its caption, id and holdout group (metadata `base`: an emoji and all its
  skin-tone / gender variants).
- **Held-out variants.** For the proof that retrieval helps (issue 3, section 8) a seeded
  fraction of the groups with several members gives up *one* member; its siblings stay in
  training and in the memory, so at test time the retriever can find them and the model
  can only get the held-out variant right by using them.
- **Retrieval.** For every training document and several query variants (its caption with
  20% of the words dropped, or its image with 20% of a 4 x 4 patch grid blanked: RA-CM3's
  query dropout; text and image queries alternate), the retriever searches the memory of
  training documents with the training strategy (relevance cap 0.9, the document itself
  excluded, redundancy skipping) and the top-K are stored. A training step then samples a
  variant and K in {0, 1, 2}: retrieval costs nothing per step.
- **Sequences.** `<bos> m1 <sep> m2 <sep> x <eos>` (tokenizer.py) with four modes for the
  main document x: plain; unconditional (caption and retrieved documents dropped: the
  branch classifier-free guidance subtracts); caption infilling (the alt text cut out with
  the causal-mask transform, so image -> caption is a left-to-right continuation); and
  spans (random spans, or a run of image rows, cut out: infilling of images).
- **Copy hints** (`--copy-hints on`, copy_hints.py): with `hint_slots`, each example also
  carries, at every token that predicts a cell of the main image, the codes the retrieved
  images hold at that cell (causal-masked spans keep their cells through the transform);
  with `text_hints`, also at every token that predicts a token of the main caption, the
  token each retrieved caption suggests next (copy_hints.suggest). With the same-document
  slot (`same_slot`), the document itself, when the batcher retrieves it, gives its hints
  through the last slot (copy_hints.in_slots).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mmrag.config import ConfigError, RetrieverConfig
from mmrag.data.writer import documents_files
from mmrag.documents import Document, DocumentError, iter_jsonl, load_image
from mmrag.encoders.base import l2_normalize
from mmrag.memory.memory import Memory
from mmrag.models.ra_cm3.copy_hints import (
    NO_HINT,
    Cells,
    caption_cells,
    image_cells,
    in_slots,
    moved_cells,
    pad_hints,
    sequence_hints,
)
from mmrag.models.ra_cm3.tokenizer import CodedDocument, ImageCodes, MultimodalTokenizer
from mmrag.models.vq.model import VQModel
from mmrag.retrieval import Retriever, drop_query_tokens

logger = logging.getLogger(__name__)

CORPUS_FILE = "corpus.safetensors"
RETRIEVAL_FILE = "retrieval.safetensors"
MODES = ("plain", "uncond", "caption", "spans")


# --- the coded corpus ---------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
    """Image-caption documents with their images as VQ codes."""

    ids: list[str]
    captions: list[str]
    groups: list[str | None]
    names: list[str]
    image_paths: list[str]
    codes: torch.Tensor  # (N, image_tokens) int64

    def __len__(self) -> int:
        return len(self.ids)

    def coded(self, i: int, caption: bool = True) -> CodedDocument:
        image = ImageCodes(tuple(int(c) for c in self.codes[i]))
        return CodedDocument((image, self.captions[i]) if caption else (image,))

    def save(self, path: Path) -> None:
        meta = {
            k: json.dumps(getattr(self, k))
            for k in ("ids", "captions", "groups", "names", "image_paths")
        }
        save_file({"codes": self.codes.to(torch.int32).contiguous()}, str(path), meta)

    @classmethod
    def load(cls, path: Path) -> Corpus:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            codes = f.get_tensor("codes").long()
        fields = {k: json.loads(meta[k]) for k in ("ids", "captions", "groups", "names")}
        return cls(**fields, image_paths=json.loads(meta["image_paths"]), codes=codes)


def read_pairs(paths: Sequence[Path], group_key: str = "base") -> list[Document]:
    """Documents with exactly one image and a non-empty caption, in file order."""
    docs: list[Document] = []
    skipped = 0
    for file in documents_files(paths):
        for doc in iter_jsonl(file):
            if isinstance(doc, DocumentError) or len(doc.images) != 1 or not doc.text.strip():
                skipped += 1
                continue
            docs.append(doc)
    if skipped:
        logger.info("skipped %d documents that are not one image + a caption", skipped)
    if not docs:
        raise ValueError(f"no image + caption documents in {[str(p) for p in paths]}")
    return docs


def build_corpus(
    docs: Sequence[Document], vq: VQModel, group_key: str = "base", progress: bool = True
) -> Corpus:
    """Encode every document's image with `vq` (batches of 64)."""
    grids: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(docs), 64), desc="vq codes", disable=not progress):
            images = [d.images[0].open_image() for d in docs[start : start + 64]]
            grids.append(vq.encode_images(images).reshape(len(images), -1).cpu())
    groups = [d.metadata.get(group_key) for d in docs]
    return Corpus(
        ids=[d.id for d in docs],
        captions=[d.text for d in docs],
        groups=[None if g is None else str(g) for g in groups],
        names=[str(d.metadata.get("name", d.text)) for d in docs],
        image_paths=[str(d.images[0].path) for d in docs],
        codes=torch.cat(grids),
    )


def heldout_variants(
    groups: Sequence[str | None], fraction: float, seed: int, exclude: Sequence[int] = ()
) -> np.ndarray:
    """Indices of held-out documents: one member from a seeded `fraction` of the groups with
    at least two members (the rest of each such group stays in training). Groups holding an
    index of `exclude` (another split's) are not chosen; `fraction` still counts all of them."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if g is not None:
            members.setdefault(g, []).append(i)
    families = sorted(g for g, m in members.items() if len(m) >= 2)
    count = round(fraction * len(families))
    taken = {groups[i] for i in exclude}
    families = [g for g in families if g not in taken]
    if count > len(families):
        raise ConfigError(
            f"{count} held-out groups asked for, {len(families)} left apart from another split"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(families))[:count]
    out = [int(rng.choice(members[families[j]])) for j in sorted(chosen)]
    return np.asarray(sorted(out), dtype=np.int64)


# --- precomputed retrieval ----------------------------------------------------------------


def blank_patches(image: Image.Image, rate: float, rng: np.random.Generator) -> Image.Image:
    """Query dropout for an image query: blank (white) `rate` of a 4 x 4 grid of patches."""
    out = image.convert("RGB").copy()
    w, h = out.size
    cells = [(r, c) for r in range(4) for c in range(4)]
    n = round(rate * len(cells))
    for j in rng.choice(len(cells), size=n, replace=False):
        r, c = cells[int(j)]
        box = (c * w // 4, r * h // 4, (c + 1) * w // 4, (r + 1) * h // 4)
        out.paste((255, 255, 255), box)
    return out


def query_vectors(
    memory: Memory, corpus: Corpus, rows: Sequence[int], variant: int, dropout: float, seed: int
) -> np.ndarray:
    """(len(rows), D) query vectors: text queries for even variants, image ones for odd."""
    rng = np.random.default_rng([seed, variant])
    encoder = memory.encoder
    if variant % 2 == 0:
        texts = [drop_query_tokens(corpus.captions[i], dropout, rng) for i in rows]
        return l2_normalize(encoder.encode_text(texts))
    out = []
    for start in range(0, len(rows), 64):
        chunk = rows[start : start + 64]
        images = [load_image(corpus.image_paths[i]) for i in chunk]
        out.append(encoder.encode_image([blank_patches(im, dropout, rng) for im in images]))
    return l2_normalize(np.concatenate(out))


def precompute_retrieval(
    memory: Memory,
    corpus: Corpus,
    rows: Sequence[int],
    config: RetrieverConfig,
    variants: int,
    seed: int,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(rows), variants, k) corpus indices (-1: nothing) and their scores."""
    index_of = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
    retriever = Retriever(memory, config)
    found = torch.full((len(rows), variants, config.k), -1, dtype=torch.long)
    scores = torch.zeros((len(rows), variants, config.k), dtype=torch.float32)
    for v in tqdm(range(variants), desc="retrieval", disable=not progress):
        vectors = query_vectors(memory, corpus, rows, v, config.query_dropout, seed)
        excludes = [[corpus.ids[i]] for i in rows]
        results = retriever.search_vectors(vectors, config.k, exclude_ids=excludes)
        for r, hits in enumerate(results):
            for j, hit in enumerate(hits):
                found[r, v, j] = index_of.get(hit.id, -1)
                scores[r, v, j] = hit.score
    return found, scores


def save_retrieval(
    path: Path, rows: Sequence[int], found: torch.Tensor, scores: torch.Tensor
) -> None:
    save_file(
        {"rows": torch.as_tensor(list(rows), dtype=torch.long), "found": found, "scores": scores},
        str(path),
    )


def load_retrieval(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("rows"), f.get_tensor("found"), f.get_tensor("scores")


# --- training sequences -------------------------------------------------------------------


@dataclasses.dataclass
class Example:
    """Token ids with per-token loss roles (main-document targets and retrieved ones) and,
    with `hint_slots`, the copy hints (T, slots) of the retrieved images (copy_hints.py)."""

    ids: list[int]
    main: list[bool]
    retrieved: list[bool]
    hints: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class ModeRates:
    """How often each serialisation mode is drawn (the rest are plain)."""

    uncond: float = 0.1
    caption: float = 0.2
    spans: float = 0.2

    def draw(self, rng: np.random.Generator) -> str:
        u = rng.random()
        if u < self.uncond:
            return "uncond"
        if u < self.uncond + self.caption:
            return "caption"
        if u < self.uncond + self.caption + self.spans:
            return "spans"
        return "plain"


def caption_span(tok: MultimodalTokenizer, ids: Sequence[int]) -> tuple[int, int]:
    """[start, end) of the main document's alt text (the last `<img alt="` ... `" src="`)."""
    start = len(ids) - 1 - list(reversed(ids)).index(tok.img_alt_id) + 1
    end = start + list(ids[start:]).index(tok.src_id)
    return start, end


def image_span(
    tok: MultimodalTokenizer, ids: Sequence[int], grid: int, rng: np.random.Generator
) -> tuple[int, int]:
    """A run of whole image rows of the main document's image (for image infilling); `ids`
    end with the main document's image: `... src="[codes]"> <eos>`."""
    first = len(ids) - 2 - tok.config.image_tokens  # main = ... [codes] "> <eos>
    rows = tok.config.image_tokens // grid
    a = int(rng.integers(0, rows))
    b = int(rng.integers(a + 1, rows + 1))
    return first + a * grid, first + b * grid


def build_sequence(
    tok: MultimodalTokenizer,
    corpus: Corpus,
    main: int,
    retrieved: Sequence[int],
    mode: str,
    rng: np.random.Generator,
    grid: int,
    hint_slots: int = 0,
    text_hints: bool = False,
    same_slot: bool = False,
) -> Example:
    """One serialised training example (see the module docstring for the modes); with
    `hint_slots`, the retrieved images' copy hints at the main image's cells, and with
    `text_hints` the retrieved captions' ones at the main caption's tokens. With
    `same_slot`, a retrieved `main` (the document itself) gives its hints through the last
    slot (copy_hints.in_slots)."""
    if mode == "uncond":
        retrieved = []
        enc = tok.encode(corpus.coded(main, caption=False))
    else:
        enc = tok.encode(corpus.coded(main), [corpus.coded(j) for j in retrieved])
    cells = image_cells(enc.ids, enc.main_range[0], tok.image_offset, tok.config.image_codes)
    same = retrieved.index(main) if main in retrieved else None
    images = in_slots([corpus.codes[j].tolist() for j in retrieved], hint_slots, same_slot, same)
    words: Cells | None = None  # the main caption's cells, for text hints
    sources: list[Sequence[int]] = []
    if text_hints and hint_slots and retrieved:
        words = caption_cells(len(enc.ids), *caption_span(tok, enc.ids))
        captions = [tok.encode_text(corpus.captions[j]) for j in retrieved]
        sources = in_slots(captions, hint_slots, same_slot, same)

    def all_hints(ids: Sequence[int], source: Sequence[int] | None) -> torch.Tensor | None:
        if not hint_slots:
            return None
        moved = (lambda c: c) if source is None else (lambda c: moved_cells(c, source))
        return sequence_hints(
            moved(cells),
            images,
            hint_slots,
            tok.config.image_codes,
            ids,
            None if words is None else moved(words),
            sources,
        )

    spans: list[tuple[int, int]] = []
    if mode == "caption":
        a, b = caption_span(tok, enc.ids)
        spans = [(a, b)] if b > a else []
    elif mode == "spans":
        if rng.random() < 0.5:
            spans = tok.sample_spans(rng, *enc.main_range)
        spans = spans or [image_span(tok, enc.ids, grid, rng)]
    if not spans:
        return Example(enc.ids, enc.main, enc.retrieved, all_hints(enc.ids, None))
    ids, source = tok.causal_mask(enc.ids, spans)
    main_mask = [True if j < 0 else enc.main[j] for j in source]
    retr_mask = [False if j < 0 else enc.retrieved[j] for j in source]
    return Example(ids, main_mask, retr_mask, all_hints(ids, source))


def collate(sequences: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids (B, T), the target roles of each next-token prediction (B, T - 1)
    and, when the examples have them, their copy hints (B, T, S)."""
    width = max(len(s.ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    main = torch.zeros((len(sequences), width), dtype=torch.bool)
    retr = torch.zeros((len(sequences), width), dtype=torch.bool)
    for r, s in enumerate(sequences):
        n = len(s.ids)
        ids[r, :n] = torch.as_tensor(s.ids)
        main[r, :n] = torch.as_tensor(s.main)
        retr[r, :n] = torch.as_tensor(s.retrieved)
    out = {"ids": ids, "main": main[:, 1:], "retrieved": retr[:, 1:]}
    if any(s.hints is not None for s in sequences):
        slots = max(s.hints.shape[1] for s in sequences if s.hints is not None)
        rows = [
            s.hints if s.hints is not None else torch.full((len(s.ids), slots), NO_HINT)
            for s in sequences
        ]
        out["hints"] = pad_hints(rows, width, left=False)
    return out
