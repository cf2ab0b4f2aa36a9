"""Copy hints: building them, the generator's hint tables, decoding and training with them,
and an RA-CM3 that trusts its hints drawing the retrieved image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import HASHING, build_tiny_racm3, tiny_ra_cm3_config
from mmrag.copy_hints import NO_HINT, hints_for, image_cells, moved_cells, pad_hints
from mmrag.decoding import Sampling, decode
from mmrag.generator import Generator, GeneratorConfig
from mmrag.memory.memory import Memory
from mmrag.ra_cm3 import RACM3
from mmrag.tokenizer import ImageCodes, code_document
from mmrag.train.ra_cm3 import main, prepare, train_ra_cm3
from mmrag.train.ra_cm3_data import MODES, build_sequence, collate

TINY = GeneratorConfig.preset("tiny")
HINTED = TINY.replace(hint_slots=2, hint_codes=50)


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
    with pytest.raises(ValueError, match="codes in"):
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


def test_training_sequences_carry_the_retrieved_codes_at_each_cell(
    shapes_dataset: Path, tiny_vq_dir: Path, tmp_path: Path
) -> None:
    prep = prepare(
        [shapes_dataset], tmp_path / "run", tiny_ra_cm3_config(), tiny_vq_dir, HASHING, False
    )
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


def trusting(memory: Memory) -> RACM3:
    """A tiny RA-CM3 whose slot-0 hint of code c points at the head row of code c, with a
    sharp output: it writes what its top retrieved image holds at each cell."""
    model = build_tiny_racm3(memory=memory, hint_slots=2)
    gen, tok = model.generator, model.tokenizer
    assert gen.hints is not None
    n = tok.config.image_codes
    with torch.no_grad():
        gen.hints.weight.zero_()
        gen.hints.weight[:n] = 50 * gen.head.weight[tok.image_offset : tok.image_offset + n]
        gen.norm.weight.fill_(30.0)
    return model


def test_a_model_that_trusts_its_hints_draws_the_retrieved_image(color_memory: Memory) -> None:
    model = trusting(color_memory)
    out = model.generate_image("a red square", seed=0)
    assert out.evidence
    top = color_memory.get([out.evidence[0].id])[0]
    assert top is not None
    image = code_document(top.to_document(), model.vq).parts[0]
    assert isinstance(image, ImageCodes)
    assert out.codes == list(image.codes)
    again = model.generate_image("a red square", seed=0, retrieval=False)
    assert again.codes != out.codes
