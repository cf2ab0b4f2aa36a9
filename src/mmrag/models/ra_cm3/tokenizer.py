"""One token space for RA-CM3: byte-level BPE text, VQ image codes and special tokens; the CM3
serialisation of documents (with retrieved documents prepended) and the causal-mask transform.

Ids are laid out `[specials | sentinels | BPE text | image codes]`. Text is encoded by a
byte-level BPE (HF `tokenizers`, no normaliser) that knows nothing of the specials, so any
string round-trips exactly and no caption can ever produce (or split) a special token:
specials are placed structurally, by id.

A document is serialised the CM3 way (Aghajanyan et al. 2022, section 2.1; RA-CM3 section 3.3):
an image followed by its caption becomes `<img alt="caption" src="[codes]">`, a lone image
`<img src="[codes]">`, text stays text (two adjacent text parts are separated by `<br>`).
With retrieved documents: `<bos> m1 <sep> m2 <sep> x <eos>`.

The causal-mask transform (CM3 section 2.2) cuts spans out of a sequence, leaves a sentinel
`<mask:i>` in each place and appends `<mask:i> span_i` at the end, before `<eos>`: a left-to-right
model trained on that can infill.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mmrag.config import Config, ConfigError
from mmrag.documents import Document, Part

BPE_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

PAD, BOS, EOS, SEP, BR = "<pad>", "<bos>", "<eos>", "<sep>", "<br>"
IMG_ALT, SRC, IMG_SRC, CLOSE = '<img alt="', '" src="', '<img src="', '">'
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, SEP, BR, IMG_ALT, SRC, IMG_SRC, CLOSE)
CODE_PATTERN = "<code:{}>"  # how an image code is written in the string form


class TokenizerError(ValueError):
    """A token sequence is not a well-formed serialisation."""


@dataclasses.dataclass(frozen=True)
class TokenizerConfig(Config):
    """Sizes of the token space. The generator's vocab_size must be >= the tokenizer's."""

    preset_prefix: ClassVar[str] = "tokenizer"

    text_vocab_size: int = 1024  # BPE target, including the 256 byte symbols
    bpe_min_frequency: int = 2
    image_codes: int = 512  # the VQ codebook size
    image_tokens: int = 256  # codes per image: the VQ grid (16 x 16)
    sentinels: int = 4  # <mask:0> .. <mask:n-1> for the causal-mask transform

    def validate(self) -> None:
        if self.text_vocab_size < 256:
            raise ConfigError("TokenizerConfig: text_vocab_size must be >= 256 (the bytes)")
        if self.image_codes < 1 or self.image_tokens < 1 or self.sentinels < 0:
            raise ConfigError("TokenizerConfig: image_codes, image_tokens >= 1; sentinels >= 0")
        if self.bpe_min_frequency < 1:
            raise ConfigError("TokenizerConfig: bpe_min_frequency must be >= 1")


# --- documents as text and code grids -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageCodes:
    """An image as its VQ codes, row-major (a grid of h * w = image_tokens)."""

    codes: tuple[int, ...]

    @classmethod
    def of(cls, grid: torch.Tensor | np.ndarray | Sequence[int]) -> ImageCodes:
        return cls(tuple(int(c) for c in np.asarray(grid).reshape(-1)))


@dataclasses.dataclass(frozen=True)
class CodedDocument:
    """A document whose images are VQ codes: the unit the tokenizer serialises exactly.

    Standalone text parts are non-empty (an empty one would leave no token to restore).
    """

    parts: tuple[str | ImageCodes, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))
        for i, part in enumerate(self.parts):
            alt = i > 0 and isinstance(self.parts[i - 1], ImageCodes)
            if isinstance(part, str) and not part and not alt:
                raise TokenizerError(f"part {i}: an empty text part must follow an image")


class ImageCoder(Protocol):
    """What the tokenizer needs from a VQ model (`mmrag.models.vq.model.VQModel` is one)."""

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def decode_images(self, codes: torch.Tensor) -> list[Image.Image]: ...


def code_document(doc: Document, coder: ImageCoder) -> CodedDocument:
    """Encode a document's images to codes (one batch). Empty standalone texts are dropped."""
    images = [p.open_image() for p in doc.parts if p.kind == "image"]
    grids = iter(coder.encode_images(images)) if images else iter(())
    parts: list[str | ImageCodes] = []
    for part in doc.parts:
        if part.kind == "image":
            parts.append(ImageCodes.of(next(grids)))
        elif part.text or (parts and isinstance(parts[-1], ImageCodes)):
            parts.append(part.text or "")
    return CodedDocument(tuple(parts))


def decode_document(coded: CodedDocument, coder: ImageCoder, grid: tuple[int, int]) -> Document:
    """Codes back to pixels (PNG image parts); `grid` is the VQ's (h, w)."""
    images = [p for p in coded.parts if isinstance(p, ImageCodes)]
    pixels: Iterable[Image.Image] = ()
    if images:
        codes = torch.tensor([p.codes for p in images], dtype=torch.long).view(-1, *grid)
        pixels = coder.decode_images(codes)
    it = iter(pixels)
    parts: list[Part] = []
    for p in coded.parts:
        if isinstance(p, str):
            parts.append(Part.of_text(p))
        else:
            buf = io.BytesIO()
            next(it).save(buf, format="PNG")
            parts.append(Part.of_image(data=buf.getvalue()))
    return Document(parts=tuple(parts))


# --- the tokenizer ------------------------------------------------------------------------


@dataclasses.dataclass
class Encoded:
    """A serialised training sequence and which tokens belong to which document.

    `main` marks the main document's tokens (and the final `<eos>`): the targets of L_main;
    `retrieved` marks the retrieved documents' tokens and their `<sep>`: the targets of
    L_retr (RA-CM3 section 3.3: L = L_main + alpha * L_retr). `<bos>` is in neither.
    """

    ids: list[int]
    main: list[bool]
    retrieved: list[bool]

    @property
    def main_range(self) -> tuple[int, int]:
        """[start, end) of the main document's own tokens (without `<eos>`): where the
        causal-mask transform may cut spans (`sample_spans(rng, *enc.main_range)`)."""
        start = self.main.index(True)
        return start, len(self.ids) - 1


def new_bpe() -> Tokenizer:
    """An untrained byte-level BPE: no normaliser (exact round trip), no prefix space."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


class MultimodalTokenizer:
    """Byte-level BPE + image codes + specials in one id space (see the module docstring)."""

    def __init__(self, config: TokenizerConfig, bpe: Tokenizer) -> None:
        self.config = config
        self.bpe = bpe
        self.specials = SPECIALS + tuple(f"<mask:{i}>" for i in range(config.sentinels))
        self.special_ids = {s: i for i, s in enumerate(self.specials)}
        self.text_offset = len(self.specials)
        self.text_size = bpe.get_vocab_size()
        self.image_offset = self.text_offset + self.text_size
        self.vocab_size = self.image_offset + config.image_codes
        ids = self.special_ids
        self.pad_id, self.bos_id, self.eos_id, self.sep_id = ids[PAD], ids[BOS], ids[EOS], ids[SEP]
        self.br_id, self.img_alt_id, self.src_id = ids[BR], ids[IMG_ALT], ids[SRC]
        self.img_src_id, self.close_id = ids[IMG_SRC], ids[CLOSE]
        self.sentinel_ids = tuple(ids[f"<mask:{i}>"] for i in range(config.sentinels))
        alternatives = sorted(self.specials, key=len, reverse=True)
        self._string_pattern = re.compile(
            "(" + "|".join(map(re.escape, alternatives)) + r"|<code:\d+>)"
        )

    # -- building and saving ------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], config: TokenizerConfig) -> MultimodalTokenizer:
        """Learn the BPE merges on `texts` (deterministic for the same texts in the same order)."""
        bpe = new_bpe()
        trainer = trainers.BpeTrainer(
            vocab_size=config.text_vocab_size,
            min_frequency=config.bpe_min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        bpe.train_from_iterator(texts, trainer=trainer)
        return cls(config, bpe)

    @classmethod
    def train_on_documents(
        cls, documents: Iterable[Document], config: TokenizerConfig
    ) -> MultimodalTokenizer:
        return cls.train(
            (p.text or "" for d in documents for p in d.parts if p.kind == "text"), config
        )

    def save_pretrained(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.bpe.save(str(out / BPE_FILE))
        self.config.save(out / CONFIG_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MultimodalTokenizer:
        src = Path(directory)
        return cls(
            TokenizerConfig.load(src / CONFIG_FILE), Tokenizer.from_file(str(src / BPE_FILE))
        )

    # -- ids -------------------------------------------------------------------------------

    def is_text(self, token: int) -> bool:
        return self.text_offset <= token < self.image_offset

    def is_image(self, token: int) -> bool:
        return self.image_offset <= token < self.vocab_size

    def image_token(self, code: int) -> int:
        if not 0 <= code < self.config.image_codes:
            raise TokenizerError(f"image code {code} outside [0, {self.config.image_codes})")
        return self.image_offset + code

    def encode_text(self, text: str) -> list[int]:
        """Text -> BPE ids in the joint space. Never yields a special id, whatever the text."""
        return [self.text_offset + i for i in self.bpe.encode(text).ids]

    def decode_text(self, ids: Sequence[int]) -> str:
        if any(not self.is_text(t) for t in ids):
            raise TokenizerError("decode_text got a non-text id")
        return self.bpe.decode([t - self.text_offset for t in ids], skip_special_tokens=False)

    def encode_image(self, image: ImageCodes) -> list[int]:
        if len(image.codes) != self.config.image_tokens:
            raise TokenizerError(
                f"an image has {len(image.codes)} codes; this tokenizer expects "
                f"{self.config.image_tokens}"
            )
        return [self.image_token(c) for c in image.codes]

    # -- documents ---------------------------------------------------------------------------

    def encode_document(self, doc: CodedDocument) -> list[int]:
        """A document's tokens, without `<bos>` / `<eos>`."""
        out: list[int] = []
        parts, i, prev_text = doc.parts, 0, False
        while i < len(parts):
            part = parts[i]
            if isinstance(part, ImageCodes):
                caption = parts[i + 1] if i + 1 < len(parts) else None
                if isinstance(caption, str):
                    out += [self.img_alt_id, *self.encode_text(caption), self.src_id]
                    i += 1
                else:
                    out.append(self.img_src_id)
                out += [*self.encode_image(part), self.close_id]
                prev_text = False
            else:
                if prev_text:
                    out.append(self.br_id)
                out += self.encode_text(part)
                prev_text = True
            i += 1
        return out

    def decode_document(self, ids: Sequence[int]) -> CodedDocument:
        """The inverse of `encode_document`; raises TokenizerError on malformed input."""
        parts: list[str | ImageCodes] = []
        text: list[int] = []
        i, n = 0, len(ids)

        def flush() -> None:
            if text:
                parts.append(self.decode_text(text))
                text.clear()

        while i < n:
            token = ids[i]
            if self.is_text(token):
                text.append(token)
                i += 1
            elif token == self.br_id:
                if not text:
                    raise TokenizerError(f"position {i}: <br> must follow text")
                flush()
                i += 1
            elif token in (self.img_alt_id, self.img_src_id):
                flush()
                caption: str | None = None
                i += 1
                if token == self.img_alt_id:
                    start = i
                    while i < n and self.is_text(ids[i]):
                        i += 1
                    if i >= n or ids[i] != self.src_id:
                        raise TokenizerError(f'position {i}: expected " src=" after the alt text')
                    caption = self.decode_text(ids[start:i])
                    i += 1
                k = self.config.image_tokens
                codes = ids[i : i + k]
                if len(codes) != k or not all(self.is_image(t) for t in codes):
                    raise TokenizerError(f"position {i}: expected {k} image codes")
                if i + k >= n or ids[i + k] != self.close_id:
                    raise TokenizerError(f'position {i + k}: expected "> after the image codes')
                parts.append(ImageCodes(tuple(t - self.image_offset for t in codes)))
                if caption is not None:
                    parts.append(caption)
                i += k + 1
            else:
                raise TokenizerError(f"position {i}: unexpected token {self.token_string(token)}")
        flush()
        return CodedDocument(tuple(parts))

    def encode(self, main: CodedDocument, retrieved: Sequence[CodedDocument] = ()) -> Encoded:
        """`<bos> m1 <sep> m2 <sep> x <eos>` with the main / retrieved token masks."""
        ids, main_mask, retr_mask = [self.bos_id], [False], [False]
        for doc in retrieved:
            tokens = [*self.encode_document(doc), self.sep_id]
            ids += tokens
            main_mask += [False] * len(tokens)
            retr_mask += [True] * len(tokens)
        tokens = [*self.encode_document(main), self.eos_id]
        ids += tokens
        main_mask += [True] * len(tokens)
        retr_mask += [False] * len(tokens)
        return Encoded(ids, main_mask, retr_mask)

    def decode(self, ids: Sequence[int]) -> tuple[CodedDocument, list[CodedDocument]]:
        """The inverse of `encode`: (main, retrieved). `<bos>` / `<eos>` framing is required."""
        if len(ids) < 2 or ids[0] != self.bos_id or ids[-1] != self.eos_id:
            raise TokenizerError("a sequence starts with <bos> and ends with <eos>")
        chunks: list[list[int]] = [[]]
        for token in ids[1:-1]:
            if token == self.sep_id:
                chunks.append([])
            else:
                chunks[-1].append(token)
        docs = [self.decode_document(c) for c in chunks]
        return docs[-1], docs[:-1]

    # -- string form (prompts, debugging) ----------------------------------------------------

    def token_string(self, token: int) -> str:
        if 0 <= token < self.text_offset:
            return self.specials[token]
        if self.is_image(token):
            return CODE_PATTERN.format(token - self.image_offset)
        if self.is_text(token):
            return repr(self.bpe.id_to_token(token - self.text_offset))
        raise TokenizerError(f"id {token} outside the vocabulary of {self.vocab_size}")

    def render(self, ids: Sequence[int]) -> str:
        """Ids as a string with specials and `<code:k>` spelled out; `parse` inverts it as
        long as the texts do not themselves contain special strings."""
        out: list[str] = []
        text: list[int] = []
        for token in ids:
            if self.is_text(token):
                text.append(token)
                continue
            if text:
                out.append(self.decode_text(text))
                text = []
            out.append(self.token_string(token))
        if text:
            out.append(self.decode_text(text))
        return "".join(out)

    def parse(self, string: str) -> list[int]:
        """A prompt written in the string form -> ids. Every special string (and `<code:k>`)
        becomes exactly its one id, never split into text."""
        ids: list[int] = []
        for piece in self._string_pattern.split(string):
            if not piece:
                continue
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif (m := re.fullmatch(r"<code:(\d+)>", piece)) is not None:
                ids.append(self.image_token(int(m.group(1))))
            else:
                ids += self.encode_text(piece)
        return ids

    # -- the causal-mask transform (CM3 section 2.2) -------------------------------------------

    def sample_spans(
        self, rng: np.random.Generator, start: int, end: int, mean_spans: float = 1.0
    ) -> list[tuple[int, int]]:
        """Spans to mask inside [start, end): their number is Poisson(mean_spans) capped by the
        sentinels available (CM3 uses mean 1), their boundaries uniform and distinct."""
        room = end - start
        n = min(int(rng.poisson(mean_spans)), len(self.sentinel_ids), room // 2)
        if n <= 0:
            return []
        cuts = np.sort(rng.choice(np.arange(start, end + 1), size=2 * n, replace=False))
        return [(int(cuts[2 * k]), int(cuts[2 * k + 1])) for k in range(n)]

    def causal_mask(
        self, ids: Sequence[int], spans: Sequence[tuple[int, int]]
    ) -> tuple[list[int], list[int]]:
        """Cut `spans` ([start, end) into `ids`, sorted, disjoint, non-empty) out of `ids`.

        `ids` may be framed by `<bos>` ... `<eos>`: the moved spans then go before `<eos>`.
        Returns the new ids and, per new token, the index it came from in `ids` (-1 for a
        sentinel), so per-token masks can follow the tokens.
        """
        if len(spans) > len(self.sentinel_ids):
            raise TokenizerError(f"{len(spans)} spans but {len(self.sentinel_ids)} sentinels")
        if any(t in self.sentinel_ids for t in ids):
            raise TokenizerError("the input already holds sentinel tokens")
        tail_end = len(ids) - 1 if ids and ids[-1] == self.eos_id else len(ids)
        previous = 1 if ids and ids[0] == self.bos_id else 0
        for a, b in spans:
            if not previous <= a < b <= tail_end:
                raise TokenizerError(f"span {(a, b)} is empty, overlapping or outside the body")
            previous = b
        body: list[int] = []
        moved: list[int] = []
        cursor = 0
        for k, (a, b) in enumerate(spans):
            body += [*range(cursor, a), -1 - k]
            moved += [-1 - k, *range(a, b)]
            cursor = b
        order = [*body, *range(cursor, tail_end), *moved, *range(tail_end, len(ids))]
        new_ids = [ids[j] if j >= 0 else self.sentinel_ids[-1 - j] for j in order]
        return new_ids, [max(j, -1) for j in order]

    def causal_unmask(self, ids: Sequence[int]) -> list[int]:
        """Put the spans at the end back in place of their sentinels (inverse of causal_mask)."""
        ids = list(ids)
        eos = [self.eos_id] if ids and ids[-1] == self.eos_id else []
        if eos:
            ids = ids[:-1]
        seen: set[int] = set()
        tail = len(ids)
        for i, token in enumerate(ids):
            if token in self.sentinel_ids:
                if token in seen:
                    tail = i
                    break
                seen.add(token)
        spans: dict[int, list[int]] = {}
        current: int | None = None
        for token in ids[tail:]:
            if token in self.sentinel_ids:
                current = token
                spans[current] = []
            elif current is not None:
                spans[current].append(token)
        if set(spans) != seen:
            missing = sorted(self.token_string(t) for t in seen - set(spans))
            extra = sorted(self.token_string(t) for t in set(spans) - seen)
            raise TokenizerError(
                f"sentinels without a span {missing}, spans without a place {extra}"
            )
        out: list[int] = []
        for token in ids[:tail]:
            out += spans[token] if token in self.sentinel_ids else [token]
        return out + eos
