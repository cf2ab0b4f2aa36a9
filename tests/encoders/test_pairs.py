"""Caption-image pairs: the group split, group keys, recall with duplicate-aware matches."""

from __future__ import annotations

import numpy as np
import pytest

from mmrag.documents import Document
from mmrag.encoders.pairs import (
    _group_of,
    group_side,
    hash_split,
    match_matrix,
    recall_at,
    split_by_group,
)


def test_split_holds_out_whole_groups_reproducibly() -> None:
    groups = [f"g{i % 10}" for i in range(50)]
    kept, held = split_by_group(groups, 0.2, seed=3)
    assert len(kept) + len(held) == 50
    assert {groups[i] for i in held}.isdisjoint({groups[i] for i in kept})
    assert len({groups[i] for i in held}) == 2
    again = split_by_group(groups, 0.2, seed=3)
    np.testing.assert_array_equal(held, again[1])
    assert len(split_by_group(groups, 0.0, seed=3)[1]) == 0


def test_hash_split_decides_each_group_alone() -> None:
    groups = [f"g{i % 40}" for i in range(200)]
    train, val, held = hash_split(groups, 0.2, seed=0)
    assert sorted([*train, *val, *held]) == list(range(200))
    sides = [{groups[i] for i in part} for part in (train, val, held)]
    assert all(a.isdisjoint(b) for a, b in ((sides[0], sides[1]), (sides[0], sides[2])))
    assert 2 <= len(sides[2]) <= 16 and len(sides[1]) >= 1
    # Adding other groups (another data set) never moves these ones.
    more = groups + [f"other{i}" for i in range(100)]
    assert np.array_equal(hash_split(more, 0.2, seed=0)[2][: len(held)], held)
    assert [group_side(g, 0.2, 0) for g in groups] == [group_side(g, 0.2, 0) for g in groups]
    assert hash_split(groups, 0.0, seed=0)[0].tolist() == list(range(200))


def test_group_of_reads_the_first_key_present() -> None:
    emoji = Document.of(text="apple", metadata={"base": "🍎", "category": "x"})
    clipart = Document.of(text="cigno", metadata={"category": "animals/birds"})
    neither = Document.of(text="alone")
    assert _group_of(emoji, "base") == "🍎"
    assert _group_of(emoji, "base,category") == "🍎"  # the value alone: the same group (and
    assert _group_of(clipart, "base,category") == "animals/birds"  # split) for any key list
    assert _group_of(neither, "base,category") == f"id:{neither.id}"


def test_recall_counts_duplicate_images_and_captions_as_hits() -> None:
    matches = match_matrix(["a", "b", "c"], ["h1", "h1", "h2"])  # items 0 and 1 share an image
    scores = np.array([[0.1, 0.9, 0.0], [0.0, 0.2, 0.8], [0.5, 0.4, 0.3]])
    assert recall_at(scores, matches, ks=(1, 2)) == {
        1: pytest.approx(1 / 3),
        2: pytest.approx(2 / 3),
    }
