"""Captions composed from retrieved ones: recombinations at shared words, infilling spans."""

from __future__ import annotations

from mmrag.models.ra_cm3.compose import join, recombinations, spans_between, words


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
