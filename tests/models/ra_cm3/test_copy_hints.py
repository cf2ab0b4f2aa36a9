"""Copy hints: building them, the generator's hint tables, decoding and training with them,
and an RA-CM3 that trusts its hints drawing the retrieved image; text copy hints the same
way, down to an RA-CM3 that trusts them writing the retrieved caption."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import HASHING, build_tiny_racm3, tiny_ra_cm3_config, trusting_racm3
from mmrag.documents import load_image
from mmrag.memory.memory import Memory
from mmrag.models.ra_cm3.copy_hints import (
    NO_HINT,
    TextCopy,
    caption_cells,
    hints_for,
    image_cells,
    in_slots,
    merge_hints,
    moved_cells,
    pad_hints,
    suggest,
    text_hints_for,
)
from mmrag.models.ra_cm3.data import MODES, build_sequence, caption_span, collate
from mmrag.models.ra_cm3.decoding import decode
from mmrag.models.ra_cm3.generator import Generator, GeneratorConfig
from mmrag.models.ra_cm3.model import RACM3
from mmrag.models.ra_cm3.prepare import Prepared, prepare
from mmrag.models.ra_cm3.tokenizer import ImageCodes, code_document
from mmrag.models.ra_cm3.train import Batcher, main, resolve_generator, train_ra_cm3
from mmrag.sampling import Sampling

TINY = GeneratorConfig.preset("tiny")
HINTED = TINY.replace(hint_slots=2, hint_codes=50)
TEXT_HINTED = HINTED.replace(text_hints=True)


T = TypeVar("T")

pytestmark = pytest.mark.usefixtures("one_thread")


# --- building hints -------------------------------------------------------------------------


def test_hints_look_up_the_cell_the_next_token_is() -> None:
    cells = [None, None, 0, 1, 2, None]  # <img ...> src=" c0 c1 c2 ">
    images = [(10, 11, 12), (20, 21, 22)]
    out = hints_for(cells, images, slots=3)
    assert out.tolist() == [
        [NO_HINT] * 3,
        [10, 20, NO_HINT],  # src=" predicts cell 0
        [11, 21, NO_HINT],
        [12, 22, NO_HINT],
        [NO_HINT] * 3,  # the last code predicts ">"
        [NO_HINT] * 3,
    ]
    assert (hints_for(cells, [], 2) == NO_HINT).all()
    assert hints_for(cells, images, 1).tolist()[1] == [10]
    with pytest.raises(ValueError, match="beyond"):
        hints_for([None, 5], images, 2)


def test_image_cells_and_moved_cells() -> None:
    ids = [1, 60, 61, 2, 3, 62, 63, 64, 4]  # a retrieved image (60 61), then the main one
    cells = image_cells(ids, first=3, image_first=50, image_count=50)
    assert cells == [None] * 5 + [0, 1, 2, None]
    # cells 1 and 2 moved behind a sentinel: ... c0 <s> "> <s> c1 c2
    source = [0, 1, 2, 3, 4, 5, -1, 8, -1, 6, 7]
    assert moved_cells(cells, source) == [None] * 5 + [0, None, None, None, 1, 2]
    rows = pad_hints(
        [torch.ones(2, 1, dtype=torch.long), torch.ones(3, 2, dtype=torch.long)], 4, True
    )
    assert rows.shape == (2, 4, 2) and rows[0, :2].eq(NO_HINT).all() and rows[0, 2:, 0].eq(1).all()


# --- the generator --------------------------------------------------------------------------


def test_a_model_without_hints_is_the_plain_model() -> None:
    torch.manual_seed(0)
    plain = Generator(TINY).eval()
    torch.manual_seed(0)
    hinted = Generator(HINTED).eval()
    weights = dict(hinted.named_parameters())
    for name, param in plain.named_parameters():
        assert torch.equal(param, weights[name])  # the hint table is built last
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    none = torch.full((2, 9, 2), NO_HINT)
    with torch.no_grad():
        torch.testing.assert_close(hinted(ids), plain(ids))
        torch.testing.assert_close(hinted(ids, hints=none), plain(ids))
        some = none.clone()
        some[:, 4, 0] = 7
        changed = hinted(ids, hints=some)
    torch.testing.assert_close(changed[:, :4], plain(ids)[:, :4].detach())  # causal
    assert not torch.allclose(changed[:, 4], plain(ids)[:, 4].detach())
    with pytest.raises(ValueError, match="hint slots"):
        plain(ids, hints=none)
    with pytest.raises(ValueError, match="must be in"):
        hinted(ids, hints=none + 51)
    with pytest.raises(ValueError, match="must be"):
        hinted(ids, hints=none[:, :3])


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_cached_decoding_with_hints_equals_full_recomputation(guidance: float) -> None:
    torch.manual_seed(0)
    model = Generator(HINTED).eval()
    prompts = [[1, 2, 3, 4], [5, 6]]
    new = 5
    hints = [
        torch.randint(-1, 50, (len(p) + new, 2), generator=torch.Generator().manual_seed(i))
        for i, p in enumerate(prompts)
    ]
    greedy, uncond = Sampling(temperature=0), [[1], [1]]
    cached = decode(model, prompts, new, None, greedy, uncond, guidance, hints=hints)
    full = decode(model, prompts, new, None, greedy, uncond, guidance, hints=hints, use_cache=False)
    assert cached.tokens == full.tokens
    np.testing.assert_allclose(cached.mean_nll, full.mean_nll, rtol=1e-4)
    plain = decode(model, prompts, new, None, greedy, uncond, guidance)
    assert plain.mean_nll != cached.mean_nll
    with pytest.raises(ValueError, match="len\\(prompt\\)"):
        decode(model, prompts, new, hints=[h[1:] for h in hints])


# --- training -------------------------------------------------------------------------------


@pytest.fixture
def prep(shapes_dataset: Path, tiny_vq_dir: Path, tmp_path: Path) -> Prepared:
    """The tiny shapes corpus prepared for training (VQ codes, BPE, memory, retrievals)."""
    config = tiny_ra_cm3_config()
    return prepare([shapes_dataset], tmp_path / "run", config, tiny_vq_dir, HASHING, False)


def test_training_sequences_carry_the_retrieved_codes_at_each_cell(prep: Prepared) -> None:
    tok, corpus = prep.tokenizer, prep.corpus
    n, codes = tok.config.image_tokens, tok.config.image_codes
    assert codes**2 >= n
    # The two retrieved images' codes together name the cell: (c mod 16, c // 16).
    corpus.codes[1], corpus.codes[2] = torch.arange(n) % codes, torch.arange(n) // codes
    main_codes = corpus.codes[0].tolist()
    rng = np.random.default_rng(0)
    for mode in MODES:
        for _ in range(4):
            ex = build_sequence(tok, corpus, 0, [1, 2], mode, rng, prep.grid, hint_slots=2)
            assert ex.hints is not None and ex.hints.shape == (len(ex.ids), 2)
            if mode == "uncond":
                assert (ex.hints == NO_HINT).all()  # no retrieval: no hints
                continue
            # Hinted: exactly the tokens followed by a main-image code (the retrieved images
            # come first), each cell once, and the code that follows is the main image's
            # code at the hinted cell.
            main_start = len(ex.ids) - ex.main[::-1].index(False)
            hinted = [t for t in range(len(ex.ids)) if ex.hints[t, 0] != NO_HINT]
            assert hinted == [
                t
                for t in range(main_start - 1, len(ex.ids) - 1)
                if 0 <= ex.ids[t + 1] - tok.image_offset < codes
            ], mode
            cells = [int(ex.hints[t, 0] + codes * ex.hints[t, 1]) for t in hinted]
            assert sorted(cells) == list(range(n))
            for t, cell in zip(hinted, cells, strict=True):
                assert ex.ids[t + 1] - tok.image_offset == main_codes[cell]
    batch = collate([build_sequence(tok, corpus, 0, [1], "plain", rng, prep.grid, 2)], tok.pad_id)
    assert batch["hints"].shape[:2] == batch["ids"].shape
    assert (batch["hints"][0, :, 1] == NO_HINT).all()  # one retrieved document: one slot


def test_training_with_copy_hints(shapes_dataset: Path, tiny_vq_dir: Path, tmp_path: Path) -> None:
    config = tiny_ra_cm3_config(copy_hints=True)
    out = train_ra_cm3(
        [shapes_dataset], tmp_path / "ra", config, tiny_vq_dir, HASHING, progress=False
    )
    assert np.isfinite(out["loss"])
    model = Generator.from_pretrained(tmp_path / "ra" / "generator")
    assert model.config.hint_slots == 2 and model.hints is not None
    rc = main(
        [
            "--data",
            str(shapes_dataset),
            "--out",
            str(tmp_path / "vanilla"),
            "--config",
            str(tmp_path / "ra" / "train-config.json"),
            "--vq",
            str(tiny_vq_dir),
            "--encoder",
            "hashing",
            "--retrieval",
            "off",
            "--copy-hints",
            "on",
            "--steps",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0  # the vanilla baseline has the same table and never gets a hint
    vanilla = Generator.from_pretrained(tmp_path / "vanilla" / "generator")
    assert vanilla.config == model.config


# --- RA-CM3 ---------------------------------------------------------------------------------


def test_a_model_that_trusts_its_hints_draws_the_retrieved_image(color_memory: Memory) -> None:
    model = trusting_racm3(color_memory)
    out = model.generate_image("a red square", seed=0)
    assert out.evidence
    top = color_memory.get([out.evidence[0].id])[0]
    assert top is not None
    image = code_document(top.to_document(), model.vq).parts[0]
    assert isinstance(image, ImageCodes)
    assert out.codes == list(image.codes)
    again = model.generate_image("a red square", seed=0, retrieval=False)
    assert again.codes != out.codes


# --- text copy hints ------------------------------------------------------------------------


def test_suggest_follows_the_longest_match_else_the_same_position() -> None:
    woman = [5, 6, 7, 8]  # "woman dancing : dark"
    assert suggest(woman, [], 0, end=99) == 5
    assert suggest(woman, [9], 1, end=99) == 6  # "man" is not in it: same position
    assert suggest(woman, [9, 6], 2, end=99) == 7  # after "dancing"
    assert suggest([1, 2, 3, 4], [1, 9, 2], 3, end=99) == 3  # an inserted word is skipped
    assert suggest([1, 2, 1, 3], [2, 1], 2, end=99) == 3  # the longest suffix wins ...
    assert suggest([1, 2, 1, 3], [4, 1], 2, end=99) == 2  # ... else the first occurrence
    assert suggest([1, 2], [1, 2], 2, end=99) == 99  # the source ends: the closing token
    assert suggest([1, 2], [7], 1, end=99) == 2
    assert suggest([1], [], 1, end=99) == 99
    assert suggest([1], [], 3, end=99) == NO_HINT
    assert suggest([], [], 0, end=99) == NO_HINT
    copy = TextCopy(((5, 6, 7, 8), (5, 9)), end=99, offset=50, start=1)
    assert copy.row([], 3) == [56, 59, NO_HINT]  # position 1 after a kept left context
    assert copy.row([6], 3) == [57, 149, NO_HINT]


def test_text_hints_of_a_sequence_and_merging_them() -> None:
    # <alt> w0 w1 <src> x <eos>: cells 0, 1; the caption closes with <src> (id 3)
    ids = [1, 10, 11, 3, 4, 2]
    cells = caption_cells(len(ids), 1, 3)
    assert cells == [None, 0, 1, None, None, None]
    out = text_hints_for(ids, cells, [10, 11], [[10, 12], [13]], slots=2, offset=50)
    assert out.tolist() == [[60, 63], [62, 53], [53, NO_HINT]] + [[NO_HINT] * 2] * 3
    # cell 1 moved behind a sentinel (id 7): <alt> w0 <s> <src> ... <s> w1 <eos>
    source = [0, 1, -1, 3, 4, -1, 2, 5]
    moved = [1, 10, 7, 3, 4, 7, 11, 2]
    out = text_hints_for(moved, moved_cells(cells, source), [10, 11], [[10, 12]], 1, 50)
    # the sentinel after w1's place predicts <src>, not a caption token: no hint there; the
    # moved w1 comes after a sentinel (no run: same position); it closes with <eos> (id 2)
    assert out[:, 0].tolist() == [60, NO_HINT, NO_HINT, NO_HINT, NO_HINT, 62, 52, NO_HINT]
    image = torch.tensor([[NO_HINT], [4], [NO_HINT]])
    text = torch.tensor([[60, 61], [NO_HINT, NO_HINT], [NO_HINT, 62]])
    assert merge_hints(image, text).tolist() == [[60, 61], [4, NO_HINT], [NO_HINT, 62]]
    assert merge_hints(image, None) is image


def test_text_hints_start_as_the_plain_model_and_change_only_later_tokens() -> None:
    torch.manual_seed(0)
    hinted = Generator(HINTED).eval()
    torch.manual_seed(0)
    model = Generator(TEXT_HINTED).eval()
    assert model.text_hint_maps is not None and not model.text_hint_maps.any()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    hints = torch.full((2, 9, 2), NO_HINT)
    hints[:, 2, 0] = 7  # an image code
    hints[:, 5, 1] = 50 + 42  # token 42
    codes_only = hints.masked_fill(hints >= 50, NO_HINT)
    with torch.no_grad():
        for name, param in hinted.named_parameters():  # built first, initialised alike
            assert torch.equal(param, dict(model.named_parameters())[name])
        before = hinted(ids, hints=codes_only)
        torch.testing.assert_close(model(ids, hints=hints), before)  # zero maps
        model.text_hint_maps.normal_()
        changed = model(ids, hints=hints)
    torch.testing.assert_close(changed[:, :5], before[:, :5])
    assert not torch.allclose(changed[:, 5], before[:, 5])
    with pytest.raises(ValueError, match="must be in"):
        model(ids, hints=torch.full((2, 9, 2), 50 + TEXT_HINTED.vocab_size))
    with pytest.raises(ValueError, match="must be in"):
        hinted(ids, hints=hints)  # a model without text hints takes codes only
    with pytest.raises(ValueError, match="text_hints"):
        HINTED.replace(hint_slots=0, hint_codes=0, text_hints=True)


def test_cached_decoding_with_text_copy_equals_full_recomputation() -> None:
    torch.manual_seed(0)
    model = Generator(TEXT_HINTED).eval()
    with torch.no_grad():
        assert model.text_hint_maps is not None
        model.text_hint_maps.normal_(std=0.3)
    prompts = [[1, 2, 3, 4], [5, 6]]
    copies = [TextCopy(((60, 61, 62), (63,)), end=2, offset=50), None]
    greedy = Sampling(temperature=0)
    cached = decode(model, prompts, 6, None, greedy, stop_id=2, text_copy=copies)
    full = decode(model, prompts, 6, None, greedy, stop_id=2, text_copy=copies, use_cache=False)
    assert cached.tokens == full.tokens
    np.testing.assert_allclose(cached.mean_nll, full.mean_nll, rtol=1e-4)
    plain = decode(model, prompts, 6, None, greedy, stop_id=2)
    assert plain.mean_nll[0] != cached.mean_nll[0]
    assert plain.tokens[1] == cached.tokens[1]  # the row without retrieved captions
    with pytest.raises(ValueError, match="offset"):
        decode(model, prompts, 2, text_copy=[TextCopy(((60,),), 2, 10), None])
    # a model without text hints gets the interpolation alone
    copied = [TextCopy(((60, 61, 62),), end=2, offset=HINTED.hint_codes, copy_from=0, weight=1.0)]
    out = decode(
        Generator(HINTED).eval(), prompts[:1], 6, None, greedy, stop_id=2, text_copy=copied
    )
    assert out.tokens == [[60, 61, 62, 2]]


def test_text_copy_interpolation_copies_the_followed_caption_exactly() -> None:
    torch.manual_seed(0)
    model = Generator(TEXT_HINTED).eval()
    source = (60, 61, 60, 62)  # a repeated token: the suffix rule still follows the source
    copy = TextCopy((source, (63, 64)), end=2, offset=50, copy_from=0, weight=1.0)
    sampled = Sampling(temperature=1.0, top_p=0.9)
    gen = torch.Generator().manual_seed(0)
    out = decode(
        model, [[1, 2, 3]] * 3, 8, None, sampled, stop_id=2, text_copy=[copy] * 3, generator=gen
    )
    assert out.tokens == [[*source, 2]] * 3
    assert out.mean_nll == pytest.approx([0.0] * 3, abs=1e-4)  # the copy holds all the mass
    # weight 0: hints only, the model samples freely
    free = dataclasses.replace(copy, weight=0.0)
    gen = torch.Generator().manual_seed(0)
    loose = decode(
        model, [[1, 2, 3]] * 3, 8, None, sampled, stop_id=2, text_copy=[free] * 3, generator=gen
    )
    assert loose.tokens != out.tokens
    with pytest.raises(ValueError, match="weight"):
        TextCopy((source,), end=2, offset=50, copy_from=0, weight=1.5)
    with pytest.raises(ValueError, match="copy_from"):
        TextCopy((source,), end=2, offset=50, copy_from=1, weight=0.5)


def test_text_copy_target_follows_the_left_context_and_stops_at_the_right() -> None:
    # "man surfing : <mask> skin tone" against "man surfing : dark skin tone"
    source = (10, 11, 12, 13, 14, 15)
    copy = TextCopy(
        (source,),
        end=2,
        offset=0,
        start=3,
        copy_from=0,
        weight=1.0,
        left=(10, 11, 12),
        right=(14, 15),
    )
    assert copy.target([]) == 13  # after the left context
    assert copy.target([13]) == 2  # the source goes on as the right context does: stop
    # without the right context, the rest of the source is suggested
    whole = dataclasses.replace(copy, right=())
    assert [whole.target(d) for d in ([], [13], [13, 14], [13, 14, 15])] == [13, 14, 15, 2]
    assert dataclasses.replace(copy, weight=0.0).target([]) == NO_HINT


def test_training_sequences_carry_the_retrieved_captions_suggestions(prep: Prepared) -> None:
    tok, corpus = prep.tokenizer, prep.corpus
    codes = tok.config.image_codes
    sources = [tok.encode_text(corpus.captions[j]) for j in (1, 2)]
    caption = tok.encode_text(corpus.captions[0])
    rng = np.random.default_rng(0)
    for mode in MODES:
        for _ in range(4):
            ex = build_sequence(tok, corpus, 0, [1, 2], mode, rng, prep.grid, 2, text_hints=True)
            assert ex.hints is not None
            text_rows = [t for t in range(len(ex.ids)) if ex.hints[t, 0] >= codes]
            if mode == "uncond":
                assert not text_rows
                continue
            plain = build_sequence(tok, corpus, 0, [1, 2], "plain", rng, prep.grid, 2)
            assert plain.hints is not None
            image_rows = (ex.hints[:, 0] != NO_HINT) & (ex.hints[:, 0] < codes)
            assert int(image_rows.sum()) == tok.config.image_tokens  # the image hints stay
            if mode == "plain":  # <alt> caption <src>: the hints decoding would compute
                a, b = caption_span(tok, ex.ids)
                copy = TextCopy(tuple(map(tuple, sources)), tok.src_id, codes)
                assert text_rows == list(range(a - 1, b))
                for t in text_rows:
                    assert ex.hints[t].tolist() == copy.row(ex.ids[a : t + 1], 2)
            if mode == "caption":  # ... <sentinel> caption <eos>: as in generate_caption
                a = len(ex.ids) - 1 - len(caption)
                copy = TextCopy(tuple(map(tuple, sources)), tok.eos_id, codes)
                assert text_rows == list(range(a - 1, len(ex.ids) - 1))
                for t in text_rows:
                    assert ex.hints[t].tolist() == copy.row(ex.ids[a : t + 1], 2)
            for t in text_rows:  # every hinted token predicts a caption token or its end
                assert tok.is_text(ex.ids[t + 1]) or ex.ids[t + 1] in (tok.src_id, tok.eos_id)
    no_text = build_sequence(tok, corpus, 0, [1, 2], "plain", rng, prep.grid, 2)
    assert no_text.hints is not None and not (no_text.hints >= codes).any()


def test_training_with_text_hints(shapes_dataset: Path, tiny_vq_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="copy_hints"):
        tiny_ra_cm3_config(text_hints=True)
    config = tiny_ra_cm3_config(copy_hints=True, text_hints=True)
    out = train_ra_cm3(
        [shapes_dataset], tmp_path / "ra", config, tiny_vq_dir, HASHING, progress=False
    )
    assert np.isfinite(out["loss"])
    model = Generator.from_pretrained(tmp_path / "ra" / "generator")
    assert model.config.text_hints and model.text_hint_maps is not None
    assert model.text_hint_maps.abs().sum() > 0  # trained away from zero


def trusting_text(memory: Memory, slot: int = 0, same_document_slot: bool = False) -> RACM3:
    """A tiny RA-CM3 whose text hint in `slot` points at the head row of the hinted token,
    with a sharp output: it writes what that slot's caption suggests (slot 0: the top
    retrieved one; with `same_document_slot`, slot 2 is the document asked about)."""
    model = build_tiny_racm3(
        memory=memory,
        hint_slots=3 if same_document_slot else 2,
        text_hints=True,
        same_document_slot=same_document_slot,
    )
    gen = model.generator
    assert gen.text_hint_maps is not None
    with torch.no_grad():
        gen.head.weight.copy_(gen.embed.weight)
        gen.text_hint_maps[slot] = 200 * torch.eye(gen.config.dim)
        gen.norm.weight.fill_(30.0)
    return model


def test_a_model_that_trusts_its_text_hints_writes_the_retrieved_caption(
    color_memory: Memory,
) -> None:
    model = trusting_text(color_memory)
    image = Image.new("RGB", (16, 16), (220, 20, 20))
    out = model.generate_caption(image, seed=0)
    assert out.evidence
    top = color_memory.get([out.evidence[0].id])[0]
    assert top is not None and top.text
    assert out.text == top.text
    assert model.generate_caption(image, seed=0, retrieval=False).text != out.text


def spied_hints(call: Callable[[], T]) -> tuple[torch.Tensor, T]:
    """The hints of the first row that `call` (an RA-CM3 method) decodes with, and its
    result."""
    seen: list[torch.Tensor] = []
    real_decode = decode

    def spy(*args: object, **kwargs: object) -> object:
        seen.extend(kwargs["hints"] or [])  # type: ignore[arg-type]
        return real_decode(*args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mmrag.models.ra_cm3.model.decode", spy)
        result = call()
    return seen[0], result


def test_the_prompts_caption_gets_the_text_hints_training_gives_it(color_memory: Memory) -> None:
    # caption -> image: the caption in the prompt is hinted as in a plain training sequence
    model = build_tiny_racm3(memory=color_memory, hint_slots=2, text_hints=True)
    tok, offset = model.tokenizer, model.generator.config.hint_codes
    draw = lambda: model.generate_image("a red square", samples=1, seed=0, copy_weight=0.5)  # noqa: E731
    hints, out = spied_hints(draw)  # sampled (a stored caption copied at weight 1 is not)
    docs = color_memory.get([e.id for e in out.evidence])
    sources = tuple(tuple(tok.encode_text(d.text)) for d in docs if d is not None)
    caption = tok.encode_text("a red square")
    n = tok.config.image_tokens
    a = hints.shape[0] - n - 1 - len(caption)  # <alt> caption <src> [n codes]
    copy = TextCopy(sources, tok.src_id, offset)
    for j in range(len(caption) + 1):  # <alt> and each caption token
        assert hints[a - 1 + j].tolist() == copy.row(caption[:j], 2)
    assert (hints[: a - 1] == NO_HINT).all()
    assert (hints[-n - 1 : -1] < offset).all() and (hints[-n - 1 : -1] >= 0).all()


# --- the same-document slot -----------------------------------------------------------------


def test_in_slots_keeps_the_last_slot_for_the_same_document() -> None:
    docs = [(1,), (2,), (3,)]
    assert in_slots(docs, 2, False, None) == [(1,), (2,)]
    assert in_slots(docs, 2, False, 1) == [(1,), (2,)]  # no such slot: rank order
    assert in_slots(docs, 3, True, None) == [(1,), (2,), ()]  # the slot stays free
    assert in_slots(docs, 3, True, 1) == [(1,), (3,), (2,)]
    assert in_slots(docs[:1], 3, True, 0) == [(), (), (1,)]
    # an empty image is a free slot
    cells = [None, 0, 1, None]
    assert hints_for(cells, [(), (20, 21)], 2).tolist() == [
        [NO_HINT, 20],
        [NO_HINT, 21],
        [NO_HINT, NO_HINT],
        [NO_HINT, NO_HINT],
    ]


def test_training_sequences_give_the_document_itself_its_own_slot(prep: Prepared) -> None:
    tok, corpus = prep.tokenizer, prep.corpus
    codes = tok.config.image_codes
    rng = np.random.default_rng(0)
    for mode in ("plain", "caption"):
        ex = build_sequence(tok, corpus, 0, [0, 3], mode, rng, prep.grid, 3, True, True)
        assert ex.hints is not None
        image_rows = [
            t for t in range(len(ex.ids) - 1) if 0 <= ex.hints[t, 2] < codes and ex.main[t + 1]
        ]
        assert len(image_rows) == tok.config.image_tokens
        for t in image_rows:  # the same slot holds the document's own code; slot 0 the other's
            assert ex.hints[t, 2] == ex.ids[t + 1] - tok.image_offset
            assert 0 <= ex.hints[t, 0] < codes and ex.hints[t, 1] == NO_HINT
        text_rows = [t for t in range(len(ex.ids) - 1) if ex.hints[t, 2] >= codes]
        assert text_rows
        for t in text_rows:  # and suggests its own next caption token (or the caption's end)
            assert ex.hints[t, 2] - codes == ex.ids[t + 1]
    other = build_sequence(tok, corpus, 0, [1, 3], "plain", rng, prep.grid, 3, True, True)
    assert other.hints is not None and (other.hints[:, 2] == NO_HINT).all()


def test_training_with_the_same_document_slot(
    shapes_dataset: Path, tiny_vq_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="same_document"):
        tiny_ra_cm3_config(same_document=0.5)
    with pytest.raises(ValueError, match="same_document"):
        tiny_ra_cm3_config(copy_hints=True, same_document=1.5)
    config = tiny_ra_cm3_config(copy_hints=True, text_hints=True, same_document=1.0)
    run = tmp_path / "ra"
    out = train_ra_cm3([shapes_dataset], run, config, tiny_vq_dir, HASHING, progress=False)
    assert np.isfinite(out["loss"])
    model = RACM3.from_pretrained(run)
    assert model.generator.config.hint_slots == 3 and model.config.same_document_slot


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_batches_retrieve_the_document_itself_at_the_same_document_rate(
    prep: Prepared, rate: float
) -> None:
    config = resolve_generator(tiny_ra_cm3_config(copy_hints=True, same_document=rate), prep)
    assert config.generator.hint_slots == 2 + (rate > 0)
    batcher, cursor = Batcher(prep, config), 0
    same = other = 0
    for step in range(12):
        examples, cursor = batcher.batch(step, cursor)
        for ex in examples:
            assert ex.hints is not None
            if rate and (ex.hints[:, 2] != NO_HINT).any():
                same += 1
            elif (ex.hints != NO_HINT).any():
                other += 1
    assert other > 0 and (same > 0) == (rate > 0)


def stored(memory: Memory, model: RACM3, text: str) -> tuple[Image.Image, list[int]]:
    """The image of the memory's document `text` and its codes."""
    doc = next(d for d in memory.get_by_seq(list(range(1, 7))) if d and d.text == text)
    assert doc.image is not None
    image = load_image(doc.image)
    return image, model.vq.encode_images([image])[0].flatten().tolist()


def test_inference_routes_the_document_asked_about_to_the_same_slot(
    color_memory: Memory,
) -> None:
    model = build_tiny_racm3(memory=color_memory, hint_slots=3, same_document_slot=True)
    image, codes = stored(color_memory, model, "a red square")
    n = model.tokenizer.config.image_tokens
    # image -> caption of an image the memory holds: its codes in the last slot at the
    # prompt's image cells (the prompt ends <alt> <sentinel> <src> codes <close> <sentinel>)
    hints, _ = spied_hints(lambda: model.generate_caption(image, seed=0))
    last = hints.shape[0] - 8  # max_caption_tokens
    cells = hints[last - 3 - n : last - 3]  # the tokens that predict codes 0 .. n-1
    assert cells[:, 2].tolist() == codes
    assert (cells[:, 0] >= 0).all() and (cells[:, 1] == NO_HINT).all()  # one other retrieved
    # caption -> image with a caption the memory holds, sampled (below weight 1): the same
    hints, _ = spied_hints(lambda: model.generate_image("a red square", 1, copy_weight=0.5))
    assert hints[-n - 1 : -1, 2].tolist() == codes
    # nothing the memory holds: the slot stays free; a model without it: rank order
    novel = Image.new("RGB", (16, 16), (90, 10, 200))
    hints, _ = spied_hints(lambda: model.generate_caption(novel, seed=0))
    assert (hints[:, 2] == NO_HINT).all() and (hints[:, 1] != NO_HINT).any()
    plain = build_tiny_racm3(memory=color_memory, hint_slots=3)
    hints, _ = spied_hints(lambda: plain.generate_caption(image, seed=0))
    assert (hints[:, 2] == NO_HINT).all() and (hints[:, 1] != NO_HINT).any()


def test_a_model_that_trusts_the_same_slot_writes_the_stored_caption(
    color_memory: Memory,
) -> None:
    model = trusting_text(color_memory, slot=2, same_document_slot=True)
    for text in ("a red square", "a blue square"):
        image, _ = stored(color_memory, model, text)
        assert model.generate_caption(image, seed=0).text == text
    novel = model.generate_caption(Image.new("RGB", (16, 16), (90, 10, 200)), seed=0)
    assert novel.text not in {d.text for d in color_memory.get_by_seq(list(range(1, 7))) if d}
