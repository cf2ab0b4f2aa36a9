"""RA-CM3 on tiny random parts: evidence, constraints, guidance, infilling, pinned demos."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import build_tiny_racm3
from mmrag.documents import Document, load_image
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory
from mmrag.models.ra_cm3.compose import analogous_pairs, caption_edits, translate_codes
from mmrag.models.ra_cm3.model import MASK, RACM3, Evidence, _Ranking, reference_vq
from mmrag.models.vq.model import VQModel

pytestmark = pytest.mark.usefixtures("one_thread")


build = build_tiny_racm3


@pytest.fixture
def query_image(make_png) -> Image.Image:  # type: ignore[no-untyped-def]
    return Image.open(io.BytesIO(make_png((200, 30, 30), pattern=3))).convert("RGB")


def test_generate_image_returns_best_sample_and_evidence(color_memory: Memory) -> None:
    model = build(memory=color_memory)
    out = model.generate_image("a red square", seed=1)
    assert out.image.size == (16, 16)
    assert len(out.scores) == 1  # a stored caption: its image copied, nothing to sample
    out = model.generate_image("a red square", seed=1, copy_weight=0.5)
    assert len(out.scores) == 2
    assert len(out.codes) == model.tokenizer.config.image_tokens
    assert all(0 <= c < model.tokenizer.config.image_codes for c in out.codes)
    assert 1 <= len(out.evidence) <= 2
    assert {e.id for e in out.evidence} <= {
        d.id for d in color_memory.get_by_seq(list(range(1, 7))) if d
    }
    assert all(e.source == "retrieved" for e in out.evidence)
    scores = [e.score for e in out.evidence]
    assert scores == sorted(scores, reverse=True)
    best = model.image_text_scores([out.image], "a red square")[0]
    assert best == pytest.approx(max(out.scores), abs=1e-5)
    again = model.generate_image("a red square", seed=1, copy_weight=0.5)
    assert again.codes == out.codes  # seeded


def test_with_vq_draws_the_same_codes_with_another_decoder(color_memory: Memory) -> None:
    model = build(memory=color_memory)
    refined = VQModel(model.vq.config)
    refined.load_state_dict(model.vq.state_dict())
    with torch.no_grad():
        refined.decoder.conv_out.bias.add_(0.5)  # a different decoder, the same codes
    redrawn = model.with_vq(refined)
    assert redrawn.vq is refined and redrawn.memory is color_memory
    a = model.generate_image("a red square", seed=1)
    b = redrawn.generate_image("a red square", seed=1, samples=1)
    c = model.generate_image("a red square", seed=1, samples=1)
    assert b.codes == c.codes and b.image.tobytes() != c.image.tobytes()
    assert a.evidence == b.evidence
    with torch.no_grad():
        refined.quantize.codebook.mul_(2.0)
    with pytest.raises(ValueError, match="codes images differently"):
        model.with_vq(refined)


def test_copy_weight_follows_the_top_retrieved_image(
    color_memory: Memory, color_docs: list[Document]
) -> None:
    model = build(memory=color_memory)

    def codes_of(path: str | None) -> list[int]:
        assert path is not None
        return model.vq.encode_images([load_image(path)])[0].reshape(-1).tolist()

    out = model.generate_image("a red square", seed=2, copy_weight=1.0)
    assert out.codes == codes_of(out.evidence[0].image)  # weight 1: the top image, cell by cell
    assert model.generate_image("a red square", seed=2, copy_weight=0.0).codes != out.codes
    pinned = model.generate_image("a red square", demos=[color_docs[4].id], copy_weight=1.0)
    assert pinned.codes == codes_of(pinned.evidence[0].image)  # pinned demonstrations too
    nothing = model.generate_image("a red square", retrieval=False, seed=2, copy_weight=1.0)
    assert nothing.codes == model.generate_image("a red square", retrieval=False, seed=2).codes
    query = color_docs[0].images[0].open_image()  # a stored image: retrieval finds it first
    band = model.infill_image(query, (1, 3), copy_weight=1.0)
    own = model.vq.encode_images([query])[0].reshape(-1).tolist()
    assert codes_of(band.evidence[0].image) == own
    followed = next(codes_of(e.image) for e in band.evidence if codes_of(e.image) != own)
    grid = model.grid  # the band follows the next document, not the image's own band back
    assert band.codes[grid : 3 * grid] == followed[grid : 3 * grid] != own[grid : 3 * grid]


def test_no_retrieval_and_pinned_demos(color_memory: Memory, color_docs: list[Document]) -> None:
    model = build(memory=color_memory)
    assert model.generate_image("a red square", retrieval=False).evidence == []
    pinned = [color_docs[4].id, color_docs[1].id]
    out = model.generate_image("a red square", demos=pinned)
    assert [e.id for e in out.evidence] == pinned
    assert all(e.source == "pinned" for e in out.evidence)
    with pytest.raises(KeyError, match="not in the memory"):
        model.generate_image("a red square", demos=["0" * 32])
    assert out.to_json("x.png")["evidence"][0]["id"] == pinned[0]


def test_retrieval_changes_the_conditioning(color_memory: Memory) -> None:
    model = build(memory=color_memory)
    with_ret = model.generate_image("a red square", guidance=1.0, seed=3)
    without = model.generate_image("a red square", guidance=1.0, seed=3, retrieval=False)
    assert with_ret.codes != without.codes


def test_prompt_drops_low_ranked_documents_to_fit(color_memory: Memory) -> None:
    tokens = 64 + 8  # one document or the main request is ~70 tokens
    model = build(max_seq_len=2 * tokens + 16, memory=color_memory)
    out = model.generate_image("a red square")
    assert len(out.evidence) == 1  # the second retrieved document did not fit
    with pytest.raises(ValueError, match="tokens"):
        build(max_seq_len=40, memory=color_memory).generate_image("a red square")


def test_generate_caption_reranks_by_perplexity(
    color_memory: Memory, query_image: Image.Image
) -> None:
    model = build(memory=color_memory)
    out = model.generate_caption(query_image, seed=0)
    perplexities = [p for _, p in out.candidates]
    assert perplexities == sorted(perplexities) and out.text == out.candidates[0][0]
    assert out.perplexity == perplexities[0] and out.perplexity > 1
    assert len(out.evidence) >= 1
    assert out.to_json()["output"] == out.text


def test_infill_image_keeps_the_codes_outside_the_band(
    color_memory: Memory, query_image: Image.Image
) -> None:
    model = build(memory=color_memory)
    grid = model.grid
    before = model.vq.encode_images([query_image])[0].reshape(-1).tolist()
    out = model.infill_image(query_image, (2, 5), caption="a red square")
    assert out.codes[: 2 * grid] == before[: 2 * grid]
    assert out.codes[5 * grid :] == before[5 * grid :]
    with pytest.raises(ValueError, match="rows"):
        model.infill_image(query_image, (5, 5))


def test_infill_caption_keeps_the_given_words(
    color_memory: Memory, query_image: Image.Image
) -> None:
    model = build(memory=color_memory)
    out = model.infill_caption(query_image, f"a {MASK} square", retrieval=False)
    assert out.text.startswith("a ") and out.text.endswith(" square")
    assert all(t.startswith("a ") for t, _ in out.candidates)
    with pytest.raises(ValueError, match="exactly once"):
        model.infill_caption(query_image, "no mask here")


def test_without_memory_nothing_is_retrieved(query_image: Image.Image) -> None:
    model = build()
    assert model.generate_image("a red square").evidence == []
    assert model.generate_caption(query_image).evidence == []
    with pytest.raises(ValueError, match="memory"):
        model.generate_image("a red square", demos=["x"])


def test_from_pretrained_round_trip(tmp_path: Path, color_memory: Memory) -> None:
    model = build(memory=color_memory)
    model.save_pretrained(tmp_path)
    loaded = RACM3.from_pretrained(tmp_path, color_memory)
    assert loaded.config == model.config
    assert (
        loaded.generate_image("a blue disc", seed=2).codes
        == model.generate_image("a blue disc", seed=2).codes
    )
    with pytest.raises(FileNotFoundError, match="model folder"):
        RACM3.from_pretrained(tmp_path / "generator")


def test_a_model_folder_may_name_the_shipped_vq_instead_of_a_copy(
    tmp_path: Path, color_memory: Memory, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build(memory=color_memory)
    model.save_pretrained(tmp_path / "model")
    shutil.copytree(tmp_path / "model" / "vq", tmp_path / "shipped" / "vq")
    monkeypatch.setenv("MMRAG_CHECKPOINTS", str(tmp_path / "shipped"))
    reference_vq(tmp_path / "model")
    assert not (tmp_path / "model" / "vq").exists()
    loaded = RACM3.from_pretrained(tmp_path / "model", color_memory)
    assert loaded.generate_image("a blue disc", seed=2).codes == (
        model.generate_image("a blue disc", seed=2).codes
    )
    weights = tmp_path / "shipped" / "vq" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")
    with pytest.raises(ValueError, match="not the VQ this model uses"):
        RACM3.from_pretrained(tmp_path / "model")
    (tmp_path / "model" / "vq.json").unlink()
    with pytest.raises(FileNotFoundError, match="no vq/ or vq"):
        RACM3.from_pretrained(tmp_path / "model")


# --- copying what is stored, composing what is not -----------------------------------------


def stored_image(color_docs: list[Document], i: int = 0) -> Image.Image:
    part = color_docs[i].images[0]
    assert part.data is not None
    return Image.open(io.BytesIO(part.data)).convert("RGB")


def test_an_image_whose_codes_agree_but_pixels_differ_is_not_the_same_image(
    color_memory: Memory, color_docs: list[Document]
) -> None:
    # agreement 1e-9: any retrieved image's codes "agree"; the pixels decide
    model = build(memory=color_memory).with_config(same_image_agreement=1e-9)
    purple = Image.new("RGB", (32, 32), (128, 0, 128))  # not stored
    assert model.generate_caption(purple, seed=0).copied is not None  # codes alone: copied
    gated = model.with_config(same_image_difference=16.0)
    assert gated.generate_caption(purple, seed=0).copied is None
    out = gated.generate_caption(stored_image(color_docs), seed=0)  # stored: still copied
    assert out.copied == color_docs[0].id and out.text == color_docs[0].text


def test_a_stored_image_is_captioned_with_its_stored_caption(
    color_memory: Memory, color_docs: list[Document]
) -> None:
    model = build(memory=color_memory)  # random weights: only the copy can write it
    for i in range(3):
        out = model.generate_caption(stored_image(color_docs, i), seed=i)
        assert out.text == color_docs[i].text and out.copied == color_docs[i].id
        assert out.to_json()["copied"] == color_docs[i].id
        pinned = model.generate_caption(stored_image(color_docs, i), demos=[color_docs[i].id])
        assert pinned.text == color_docs[i].text
    alone = model.generate_caption(stored_image(color_docs), copy_weight=0.0, seed=0)
    assert alone.copied is None and alone.text != color_docs[0].text


def test_a_stored_caption_is_drawn_as_its_stored_image(
    color_memory: Memory, color_docs: list[Document]
) -> None:
    model = build(memory=color_memory)
    for i in range(3):
        out = model.generate_image(color_docs[i].text, samples=2, seed=i)
        stored = model.vq.encode_images([stored_image(color_docs, i)])[0].reshape(-1).tolist()
        assert out.codes == stored
    # near matches keep the model's share: the generator alone does not draw the copy
    free = model.generate_image(color_docs[0].text, samples=2, copy_weight=0.0)
    assert free.codes != model.vq.encode_images([stored_image(color_docs)])[0].reshape(-1).tolist()


def pasting(model: RACM3, size: int = 32) -> RACM3:
    """The model drawing at `size` pixels, keeping the copied image's pixels where its codes
    agree."""
    return model.with_config(paste_reference=True, output_size=size)


def test_a_stored_caption_is_drawn_as_its_stored_pixels_when_pasting(
    color_memory: Memory, color_docs: list[Document]
) -> None:
    model = pasting(build(memory=color_memory))
    for i in range(3):
        out = model.generate_image(color_docs[i].text, samples=2, seed=i)
        assert out.image.size == (32, 32)
        want = stored_image(color_docs, i).resize((32, 32), Image.Resampling.BICUBIC)
        assert out.image.tobytes() == want.tobytes()  # every code agrees: every pixel stored
    free = model.generate_image(color_docs[0].text, samples=1, copy_weight=0.0, seed=0)
    assert free.image.size == (32, 32)  # the decoding upscaled where the codes differ


def test_infill_image_keeps_the_pixels_outside_the_band_when_pasting(
    color_memory: Memory, query_image: Image.Image
) -> None:
    model = pasting(build(memory=color_memory), size=16)
    out = model.infill_image(query_image, (1, 3), caption="a red square")
    given = np.asarray(query_image.resize((16, 16), Image.Resampling.BOX))
    drawn = np.asarray(out.image)
    cell = 16 // model.grid
    assert (drawn[3 * cell + 2 :] == given[3 * cell + 2 :]).all()  # below the band, past the seam
    plain = build(memory=color_memory).infill_image(query_image, (1, 3), caption="a red square")
    assert plain.codes == out.codes and plain.image.size == (16, 16)


GREEN, BLUE = (40, 180, 60), (30, 60, 220)


def shape_png(rgb: tuple[int, int, int], disc: bool, side: int = 32) -> bytes:
    """A white PNG `side` pixels square with a coloured disc or square."""
    img = Image.new("RGB", (side, side), (255, 255, 255))
    box = (side * 3 // 16, side * 3 // 16, side * 13 // 16, side * 13 // 16)
    (ImageDraw.Draw(img).ellipse if disc else ImageDraw.Draw(img).rectangle)(box, fill=rgb)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def shapes_model(memory: Memory) -> RACM3:
    """A tiny model drawing by colour analogy over a memory of a green disc and a green and a
    blue square, with pasting at 32 px."""
    docs = [
        Document.of(text="a shiny green disc", image=shape_png(GREEN, True)),
        Document.of(text="a green square", image=shape_png(GREEN, False)),
        Document.of(text="a blue square", image=shape_png(BLUE, False)),
    ]
    ingest(memory, docs, progress=False)
    return build(memory=memory).with_config(
        analogy_k=3, copy_weight=1.0, colour_analogy_gain=0.5, paste_reference=True, output_size=32
    )


def test_a_stored_caption_is_copied_even_where_redundancy_skipping_drops_it(
    hashing_memory: Memory,
) -> None:
    # the same words in another order: the same hashed vector, so the retriever's redundancy
    # skipping keeps only one of the two
    docs = [
        Document.of(text="a red and blue square", image=shape_png(GREEN, False)),
        Document.of(text="a blue and red square", image=shape_png(BLUE, True)),
    ]
    ingest(hashing_memory, docs, progress=False)
    model = build(memory=hashing_memory)
    for doc, image in zip(docs, (shape_png(GREEN, False), shape_png(BLUE, True)), strict=True):
        out = model.generate_image(doc.text, samples=1)
        stored = Image.open(io.BytesIO(image)).convert("RGB")
        assert out.codes == model.vq.encode_images([stored])[0].reshape(-1).tolist()
        assert out.evidence[0].id == doc.id


def test_drawing_by_colour_analogy_recolours_the_copied_image(hashing_memory: Memory) -> None:
    model = shapes_model(hashing_memory)
    out = model.generate_image("a shiny blue disc", samples=1)
    assert out.evidence[0].text == "a shiny green disc"  # copied, recoloured as the squares are
    assert {e.text for e in out.evidence} == {
        "a shiny green disc",
        "a green square",
        "a blue square",
    }
    expected = Image.open(io.BytesIO(shape_png(BLUE, True))).convert("RGB")
    assert np.abs(np.asarray(out.image, int) - np.asarray(expected, int)).max() <= 1
    kept = model.with_config(colour_analogy_gain=2.0)  # the codes translated instead
    kept_out = kept.generate_image("a shiny blue disc", samples=1)
    assert np.abs(np.asarray(kept_out.image, int) - np.asarray(expected, int)).max() > 100


def test_captions_are_verified_by_drawing_them(hashing_memory: Memory) -> None:
    model = shapes_model(hashing_memory).with_config(synthesis_k=3, synthesis_distance=4.0)
    ranked = [("a green square", 0.9), ("a shiny blue disc", 0.5), ("a blue square", 0.3)]

    def verified(
        m: RACM3, image: Image.Image
    ) -> tuple[tuple[str, list[Evidence]] | None, dict[str, object]]:
        assert m.memory is not None
        ranking = _Ranking(m.memory.encoder, image)
        ranking.add([t for t, _ in ranked])
        tried: dict[str, tuple[float, list[Evidence]] | None] = {}
        return m._verified(image, ranked, ranking, tried), dict(tried)

    # the recoloured green disc looks like the blue disc: verified
    blue_disc = Image.open(io.BytesIO(shape_png(BLUE, True))).convert("RGB")
    found, tried = verified(model, blue_disc)
    assert found is not None and found[0] == "a shiny blue disc"
    used = found[1]
    assert used[0].text == "a shiny green disc"  # copied, and the pair that recoloured it
    assert {e.text for e in used[1:]} == {"a green square", "a blue square"}
    assert set(tried) == {t for t, _ in ranked}  # each candidate drawn once
    stored, from_docs = model._imagined("a blue square")  # stored: its own image
    assert stored is not None and [e.text for e in from_docs] == ["a blue square"]
    assert model._imagined("a purple triangle") == (None, [])  # would have to be sampled
    green_square = Image.open(io.BytesIO(shape_png(GREEN, False))).convert("RGB")
    found, _ = verified(model, green_square)
    assert found is not None and found[0] == "a green square"
    unsure = model.with_config(synthesis_distance=0.0)
    like_none = Image.new("RGB", (32, 32), (250, 250, 250))
    assert verified(unsure, like_none)[0] is None


def test_the_generator_samples_captions_only_when_no_composed_one_verifies(
    hashing_memory: Memory, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = shapes_model(hashing_memory).with_config(compose_k=3, synthesis_k=3)
    sampled: list[int] = []
    decode_samples = RACM3._caption

    def counted(self: RACM3, *args: object, **kwargs: object) -> object:
        sampled.append(1)
        return decode_samples(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RACM3, "_caption", counted)
    purple = Image.new("RGB", (32, 32), (128, 0, 128))  # an image the memory does not hold
    sure = model.with_config(synthesis_distance=255.0)  # any drawable candidate verifies
    out = sure.generate_caption(purple, seed=0)
    assert not sampled and out.candidates == [] and math.isnan(out.perplexity)
    assert out.text == out.ranked[0][0] and out.text in {
        "a green square",
        "a blue square",
        "a shiny green disc",
    }
    unsure = model.with_config(synthesis_distance=0.0)  # nothing verifies: samples compete
    out = unsure.generate_caption(purple, seed=0)
    assert sampled == [1] and out.candidates
    assert {t for t, _ in out.candidates} <= {t for t, _ in out.ranked}
    assert out.text == out.ranked[0][0]


def test_infilling_a_stored_image_fills_the_stored_words(
    color_memory: Memory, color_docs: list[Document]
) -> None:
    model = build(memory=color_memory)
    red = color_docs[0].text  # "a red square"
    out = model.infill_caption(stored_image(color_docs), red.replace("red", MASK))
    assert out.text == red


def test_samples_copy_several_retrieved_images(color_memory: Memory) -> None:
    model = build(memory=color_memory).with_config(copy_sources=2, copy_weight=1.0)
    out = model.generate_image("a reddish square", samples=2, seed=0)
    assert len(out.evidence) == 2 and len(out.scores) == 2
    codes = [
        model.vq.encode_images([load_image(e.image)])[0].reshape(-1).tolist()
        for e in out.evidence
        if e.image
    ]
    assert out.codes in codes


def test_composition_ranks_recombined_captions_by_the_dual_encoder(
    color_memory: Memory, query_image: Image.Image
) -> None:
    model = build(memory=color_memory).with_config(compose_k=4)
    out = model.generate_caption(query_image, seed=0)  # an image the memory does not hold
    matches = [m for _, m in out.ranked]
    assert out.ranked and matches == sorted(matches, reverse=True)
    assert out.text == out.ranked[0][0] and out.copied is None
    texts = {t for t, _ in out.ranked}
    assert {t for t, _ in out.candidates} <= texts  # the generator's samples compete too
    assert "a red square" in texts  # and the retrieved captions
    assert model.generate_caption(query_image, seed=0, compose=False).ranked == []
    filled = model.infill_caption(query_image, f"a {MASK} square", seed=0)
    assert filled.text.startswith("a ") and filled.text.endswith(" square") and filled.ranked


def test_drawing_by_analogy_changes_the_copied_codes_as_stored_pairs_do(
    hashing_memory: Memory,
) -> None:
    def shape(rgb: tuple[int, int, int], disc: bool) -> bytes:
        return shape_png(rgb, disc, side=16)

    docs = [
        Document.of(text="a red square", image=shape((230, 20, 20), False)),
        Document.of(text="a red disc", image=shape((230, 20, 20), True)),
        Document.of(text="a blue square", image=shape((20, 40, 230), False)),
    ]
    ingest(hashing_memory, docs, progress=False)
    model = build(memory=hashing_memory).with_config(analogy_k=3, copy_weight=1.0, copy_sources=1)
    out = model.generate_image("a blue disc", samples=1)
    top = out.evidence[0]
    assert top.text in {"a red square", "a blue square", "a red disc"}

    def codes(text: str) -> list[int]:
        doc = next(d for d in docs if d.text == text)
        image = Image.open(io.BytesIO(doc.images[0].data or b"")).convert("RGB")
        return model.vq.encode_images([image])[0].reshape(-1).tolist()

    edits = caption_edits(top.text, "a blue disc")
    pairs = analogous_pairs([d.text for d in docs], edits)
    expected = translate_codes(
        codes(top.text), [(codes(docs[i].text), codes(docs[j].text)) for i, j in pairs]
    )
    assert out.codes == expected
    assert top.text == "a blue square"  # the pair (red square, red disc) teaches the change
    assert pairs == [(0, 1)] and out.codes != codes("a blue square")


def test_with_config_keeps_the_weights_and_memory(color_memory: Memory) -> None:
    model = build(memory=color_memory)
    changed = model.with_config(copy_weight=1.0)
    assert changed.generator is model.generator and changed.memory is color_memory
    assert changed.config == model.config.replace(copy_weight=1.0)
    assert model.with_config().config == model.config
