"""The joint token space: exact round trips, specials never split, the causal-mask transform."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmrag.documents import Document
from mmrag.models.ra_cm3.tokenizer import (
    SPECIALS,
    CodedDocument,
    ImageCodes,
    MultimodalTokenizer,
    TokenizerConfig,
    TokenizerError,
    code_document,
    decode_document,
)
from mmrag.models.vq.model import VQConfig, VQModel

CONFIG = TokenizerConfig(text_vocab_size=300, image_codes=16, image_tokens=4, sentinels=3)
CAPTIONS = [
    "grinning face",
    "grinning face with big eyes",
    "smiling face with heart-eyes",
    "woman dancing: dark skin tone",
    "man dancing: medium skin tone",
    "flag: Côte d’Ivoire",
    "red heart",
    "keycap: #",
]
TRICKY = [
    "",
    " ",
    "  two  spaces  ",
    "tab\there\nnew line\r\n",
    "flag: São Tomé & Príncipe",
    "日本語のテキスト",
    "مرحبا بالعالم",
    "e\u0301 (combining acute) and \u00e9 (precomposed) stay distinct",
    "👩🏽‍💻 woman technologist: medium skin tone",
    "🏳️‍🌈 ZWJ + variation selector",
    "\x00 nul and \x7f del",
    '<img alt="not a tag" src="x"> <sep> <eos> <mask:0> <code:3>',
    "\ud7ff\ue000 edges of the BMP, and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def tok() -> MultimodalTokenizer:
    return MultimodalTokenizer.train(CAPTIONS * 3, CONFIG)


def image(*codes: int) -> ImageCodes:
    return ImageCodes(tuple(codes))


def test_layout_and_sizes(tok: MultimodalTokenizer) -> None:
    assert tok.specials[: len(SPECIALS)] == SPECIALS
    assert tok.text_offset == len(SPECIALS) + 3
    assert 256 <= tok.text_size <= 300  # the byte alphabet plus learned merges
    assert tok.image_offset == tok.text_offset + tok.text_size
    assert tok.vocab_size == tok.image_offset + 16
    assert tok.is_image(tok.image_token(15)) and not tok.is_image(tok.image_token(0) - 1)
    with pytest.raises(TokenizerError):
        tok.image_token(16)
    # BPE learned something: a frequent caption is shorter than its bytes.
    assert len(tok.encode_text("grinning face")) < len(b"grinning face")


@pytest.mark.parametrize("text", CAPTIONS + TRICKY)
def test_text_round_trip_is_byte_exact(tok: MultimodalTokenizer, text: str) -> None:
    ids = tok.encode_text(text)
    assert all(tok.is_text(t) for t in ids)  # never a special, whatever the text says
    assert tok.decode_text(ids) == text
    assert tok.decode_text(ids).encode("utf-8") == text.encode("utf-8")


def test_every_emoji_name_and_glyph_round_trips(tok: MultimodalTokenizer) -> None:
    emoji = pytest.importorskip("emoji")
    names = [
        name.strip(":").replace("_", " ")
        for name in (data["en"] for data in emoji.EMOJI_DATA.values())
    ]
    glyphs = list(emoji.EMOJI_DATA)
    assert any(not n.isascii() for n in names)
    for text in names + glyphs:
        assert tok.decode_text(tok.encode_text(text)) == text, text


def test_random_unicode_round_trips(tok: MultimodalTokenizer) -> None:
    rng = random.Random(0)
    for _ in range(200):
        chars = [chr(rng.choice([rng.randrange(32, 0x250), rng.randrange(0x1F300, 0x1FAFF)]))]
        chars += [chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(0, 12))]
        text = "".join(chars)
        assert tok.decode_text(tok.encode_text(text)) == text


def test_special_tokens_are_never_split(tok: MultimodalTokenizer) -> None:
    for special in tok.specials:
        assert tok.parse(special) == [tok.special_ids[special]]
        glued = tok.parse(f"x{special}y")  # no spaces around it
        assert glued.count(tok.special_ids[special]) == 1
        assert tok.decode_text([t for t in glued if tok.is_text(t)]) == "xy"
        # In text, the same string is ordinary bytes: several text ids, no special id.
        as_text = tok.encode_text(special)
        assert all(tok.is_text(t) for t in as_text) and tok.decode_text(as_text) == special
    prompt = '<bos><img alt="red heart" src="<code:1><code:2><code:3><code:4>"><eos>'
    ids = tok.parse(prompt)
    assert ids[:2] == [tok.bos_id, tok.img_alt_id]
    assert ids[-7:] == [
        tok.src_id,
        *[tok.image_token(c) for c in (1, 2, 3, 4)],
        tok.close_id,
        tok.eos_id,
    ]
    assert tok.render(ids) == prompt


@pytest.mark.parametrize(
    "parts",
    [
        ("red heart",),
        (image(1, 2, 3, 4),),
        (image(1, 2, 3, 4), "red heart"),
        (image(0, 0, 0, 0), ""),  # an empty caption is kept
        ("before", image(5, 6, 7, 8), "after", "and more", image(15, 14, 13, 12)),
        (image(1, 1, 1, 1), image(2, 2, 2, 2), 'caption with "quotes" and <sep>'),
        ("text", "text again", "three"),
    ],
)
def test_document_round_trip(tok: MultimodalTokenizer, parts: tuple[str | ImageCodes, ...]) -> None:
    doc = CodedDocument(parts)
    ids = tok.encode_document(doc)
    assert tok.decode_document(ids) == doc


def test_cm3_serialisation_shape(tok: MultimodalTokenizer) -> None:
    doc = CodedDocument((image(1, 2, 3, 4), "red heart"))
    ids = tok.encode_document(doc)
    caption = tok.encode_text("red heart")
    assert ids == [
        tok.img_alt_id,
        *caption,
        tok.src_id,
        *[tok.image_token(c) for c in (1, 2, 3, 4)],
        tok.close_id,
    ]
    assert tok.render(ids) == '<img alt="red heart" src="<code:1><code:2><code:3><code:4>">'


def test_retrieved_documents_are_prepended_with_separators(tok: MultimodalTokenizer) -> None:
    m1 = CodedDocument((image(1, 2, 3, 4), "grinning face"))
    m2 = CodedDocument((image(4, 3, 2, 1), "red heart"))
    x = CodedDocument((image(9, 9, 9, 9), "smiling face with heart-eyes"))
    enc = tok.encode(x, [m1, m2])
    one, two, main = (tok.encode_document(d) for d in (m1, m2, x))
    assert enc.ids == [tok.bos_id, *one, tok.sep_id, *two, tok.sep_id, *main, tok.eos_id]
    assert len(enc.main) == len(enc.retrieved) == len(enc.ids)
    assert sum(enc.main) == len(main) + 1  # x and <eos>
    assert sum(enc.retrieved) == len(one) + len(two) + 2  # the documents and their <sep>s
    assert not enc.main[0] and not enc.retrieved[0]  # <bos>
    assert not any(a and b for a, b in zip(enc.main, enc.retrieved, strict=True))
    assert tok.decode(enc.ids) == (x, [m1, m2])
    start, end = enc.main_range
    assert enc.ids[start:end] == main and enc.ids[start - 1] == tok.sep_id
    assert tok.decode(tok.encode(x).ids) == (x, [])


def test_malformed_sequences_are_rejected(tok: MultimodalTokenizer) -> None:
    codes = [tok.image_token(c) for c in (1, 2, 3, 4)]
    with pytest.raises(TokenizerError, match="image codes"):
        tok.decode_document([tok.img_src_id, *codes[:3], tok.close_id])
    with pytest.raises(TokenizerError, match="after the image codes"):
        tok.decode_document([tok.img_src_id, *codes])
    with pytest.raises(TokenizerError, match="src="):
        tok.decode_document([tok.img_alt_id, *tok.encode_text("cat"), *codes])
    with pytest.raises(TokenizerError, match="unexpected"):
        tok.decode_document([tok.eos_id])
    with pytest.raises(TokenizerError, match="expects 4"):
        tok.encode_document(CodedDocument((image(1, 2),)))
    with pytest.raises(TokenizerError, match="empty text"):
        CodedDocument(("",))


def test_causal_mask_and_its_inverse(tok: MultimodalTokenizer) -> None:
    x = CodedDocument((image(1, 2, 3, 4), "smiling face with heart-eyes"))
    enc = tok.encode(x, [CodedDocument((image(5, 6, 7, 8), "red heart"))])
    ids = enc.ids
    spans = [(3, 6), (len(ids) - 6, len(ids) - 2)]
    masked, source = tok.causal_mask(ids, spans)
    s0, s1 = tok.sentinel_ids[:2]
    assert len(masked) == len(ids) + 4  # two sentinels in place, two at the end
    assert masked[0] == tok.bos_id and masked[-1] == tok.eos_id
    assert masked[3] == s0 and masked.count(s0) == 2 and masked.count(s1) == 2
    tail = masked.index(s0, 4)
    assert masked[tail : tail + 4] == [s0, *ids[3:6]]  # the first span, moved to the end
    assert masked[-6:-1] == [s1, *ids[len(ids) - 6 : len(ids) - 2]]
    assert [ids[j] for j in source if j >= 0] == [t for t in masked if t not in (s0, s1)]
    assert tok.causal_unmask(masked) == ids
    # Per-token masks follow the tokens through `source` (sentinels: -1).
    main = [enc.main[j] if j >= 0 else True for j in source]
    assert sum(main) == sum(enc.main) + 4  # the four sentinel tokens


def test_sampled_masks_always_invert(tok: MultimodalTokenizer) -> None:
    rng = np.random.default_rng(0)
    x = CodedDocument((image(1, 2, 3, 4), "grinning face with big eyes"))
    ids = tok.encode(x).ids
    counts = set()
    for _ in range(300):
        spans = tok.sample_spans(rng, 1, len(ids) - 1, mean_spans=1.5)
        counts.add(len(spans))
        assert all(1 <= a < b <= len(ids) - 1 for a, b in spans)
        masked, _ = tok.causal_mask(ids, spans)
        assert tok.causal_unmask(masked) == ids
    assert counts == {0, 1, 2, 3}  # Poisson, capped by the three sentinels


def test_causal_mask_rejects_bad_spans(tok: MultimodalTokenizer) -> None:
    ids = tok.encode(CodedDocument(("red heart",))).ids
    with pytest.raises(TokenizerError):
        tok.causal_mask(ids, [(0, 2)])  # would move <bos>
    with pytest.raises(TokenizerError):
        tok.causal_mask(ids, [(1, 3), (2, 4)])  # overlapping
    with pytest.raises(TokenizerError):
        tok.causal_mask(ids, [(1, 2)] * 4)  # more spans than sentinels
    masked, _ = tok.causal_mask(ids, [(1, 3)])
    with pytest.raises(TokenizerError, match="without a span"):
        tok.causal_unmask([*masked[: masked.index(tok.sentinel_ids[0], 2)], tok.eos_id])


def test_save_load_round_trip(tok: MultimodalTokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "tok")
    again = MultimodalTokenizer.from_pretrained(tmp_path / "tok")
    assert again.config == tok.config and again.vocab_size == tok.vocab_size
    for text in CAPTIONS + TRICKY:
        assert again.encode_text(text) == tok.encode_text(text)
    retrained = MultimodalTokenizer.train(CAPTIONS * 3, CONFIG)
    assert retrained.bpe.get_vocab() == tok.bpe.get_vocab()  # deterministic training


def test_documents_through_a_vq(tok: MultimodalTokenizer) -> None:
    torch.manual_seed(0)
    vq = VQModel(VQConfig.preset("tiny").replace(codebook_size=16, channel_mult=(1, 2, 2, 2)))
    assert vq.config.tokens_per_image == 4  # 16 px -> 2 x 2 codes, matching CONFIG
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    doc = Document.of(text="red heart", image=_png(img))
    coded = code_document(doc, vq)
    assert isinstance(coded.parts[0], ImageCodes) and coded.parts[1] == "red heart"
    assert tok.decode_document(tok.encode_document(coded)) == coded
    back = decode_document(coded, vq, grid=(2, 2))
    assert [p.kind for p in back.parts] == ["image", "text"] and back.text == "red heart"
    assert back.parts[0].open_image().size == (16, 16)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
