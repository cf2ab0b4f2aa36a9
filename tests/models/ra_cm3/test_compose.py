"""Captions composed from retrieved ones: recombinations at shared words, infilling spans."""

from __future__ import annotations

from mmrag.models.ra_cm3.compose import (
    analogous_pairs,
    apply_edits,
    caption_edits,
    join,
    recombinations,
    spans_between,
    translate_codes,
    words,
)


def test_words_split_punctuation_and_join_puts_it_back() -> None:
    assert words("man: dark skin tone, red hair") == [
        "man",
        ":",
        "dark",
        "skin",
        "tone",
        ",",
        "red",
        "hair",
    ]
    for text in ("man: dark skin tone, red hair", "red apple", "a; b"):
        assert join(words(text)) == text


def test_recombinations_join_a_prefix_to_another_captions_suffix_at_a_shared_word() -> None:
    found = recombinations(
        ["woman cook: medium skin tone", "man cook: dark skin tone", "cook"], heads=2
    )
    assert found[:3] == ["woman cook: medium skin tone", "man cook: dark skin tone", "cook"]
    assert "woman cook: dark skin tone" in found  # the composition asked for
    assert "man cook: medium skin tone" in found  # the second head joins too
    assert len(found) == len(set(found))
    # only the first `heads` captions give prefixes
    assert "cook: dark skin tone" not in recombinations(["a cook", "b cook", "cook: x"], heads=1)
    assert recombinations(["", "  "]) == []


def test_spans_between_the_contexts_of_an_infilling() -> None:
    captions = ["man surfing: dark skin tone", "woman surfing: medium-light skin tone", "pizza"]
    assert spans_between(captions, "man surfing:", " skin tone") == ["dark", "medium-light"]
    assert spans_between(captions, "", " skin tone") == [
        "man surfing: dark",
        "woman surfing: medium-light",
    ]
    assert spans_between(captions, "man surfing:", "") == [
        "dark skin tone",
        "medium-light skin tone",
    ]
    assert spans_between(["a b"], "x", "y") == []


def test_caption_edits_and_their_application() -> None:
    edits = caption_edits("woman cook: medium skin tone", "woman cook: dark skin tone")
    assert edits == [(("medium",), ("dark",))]
    assert apply_edits("man cook: medium skin tone", edits) == "man cook: dark skin tone"
    assert apply_edits("pizza", edits) is None
    insertion = caption_edits("cook", "cook: dark skin tone")
    assert apply_edits("man cook", insertion) is None  # nothing to replace: no analogy


def test_analogous_pairs_differ_as_the_asked_caption_differs() -> None:
    captions = [
        "woman cook: medium skin tone",
        "man cook: medium skin tone",
        "man cook: dark skin tone",
        "cook: medium skin tone",
    ]
    edits = caption_edits(captions[0], "woman cook: dark skin tone")
    assert analogous_pairs(captions, edits) == [(1, 2)]
    assert analogous_pairs(captions, []) == []


def test_translate_codes_follows_the_codes_that_change_in_the_pairs() -> None:
    # in the pairs code 5 (a skin colour) becomes 9 where the skin darkens; 1 (outline) stays
    pairs = [([1, 5, 5, 2], [1, 9, 9, 2]), ([5, 1, 3, 3], [9, 1, 4, 3])]
    assert translate_codes([5, 1, 2, 3, 7], pairs) == [9, 1, 2, 3, 7]  # 3 stayed more than moved
    assert translate_codes([5, 5], []) == [5, 5]


def test_an_inserted_word_is_learnt_where_it_replaced_another() -> None:
    captions = ["banana", "yellow heart", "purple heart", "green heart", "purple car", "red apple"]
    edits = caption_edits("banana", "purple banana")
    assert edits == [((), ("purple",))]
    assert sorted(analogous_pairs(captions, edits)) == [(1, 2), (3, 2)]
    # words inserted that never replaced any: no pair
    assert analogous_pairs(captions, caption_edits("banana", "banana with a crown")) == []
