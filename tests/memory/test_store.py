from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmrag.memory.store import NewRow, Store, StoreError, filter_sql


def row(i: int, meta: dict, modality: str = "text", blobs: tuple[str, ...] = ()) -> NewRow:
    vec = np.zeros(4, np.float32)
    vec[i % 4] = 1.0
    return NewRow(f"id{i}", [{"text": f"t{i}"}], meta, modality, vec, blobs)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "m.sqlite", dim=4)
    s.insert(
        [
            row(0, {"color": "red", "n": 1, "flag": True}, "mixed", ("a",)),
            row(1, {"color": "blue", "n": 2}, "text"),
            row(2, {"color": "red", "n": 3}, "image", ("a", "b")),
            row(3, {"n": 4}, "text"),
        ]
    )
    return s


def test_filters(store: Store) -> None:
    def ids(filters: dict) -> list[int]:
        return sorted(store.seqs_matching(filters).tolist())

    assert ids({"color": "red"}) == [1, 3]
    assert ids({"color": ["red", "blue"]}) == [1, 2, 3]
    assert ids({"color": "red", "n": 3}) == [3]
    assert ids({"color": None}) == [4]
    assert ids({"color": ["blue", None]}) == [2, 4]
    assert ids({"flag": True}) == [1]
    assert ids({"modality": ["image", "mixed"]}) == [1, 3]
    assert ids({"missing": "x"}) == []
    assert store.count({"color": "red"}) == 2
    with pytest.raises(StoreError, match="invalid filter key"):
        filter_sql({"a') OR 1=1 --": 1})
    with pytest.raises(StoreError, match="empty list"):
        filter_sql({"color": []})
    with pytest.raises(StoreError, match="JSON scalars"):
        filter_sql({"color": [{"x": 1}]})


def test_generation_and_change_log(store: Store) -> None:
    g0 = store.generation()
    assert g0 == 1  # one insert transaction
    assert store.insert([row(0, {})]) == []  # same id: ignored, no new generation
    assert store.generation() == g0
    seqs, orphans = store.delete(["id0", "id2", "nope"])
    assert sorted(seqs) == [1, 3]
    assert orphans == {"a", "b"}
    inserted = store.insert([row(9, {})])
    assert inserted[0][0] == "id9" and inserted[0][1] > 4  # seqs grow, never reused
    changes = store.changes_since(g0, max_seq=4)
    assert changes.generation == store.generation() == g0 + 2
    assert changes.added_seqs.tolist() == [inserted[0][1]]
    assert sorted(changes.deleted_seqs.tolist()) == [1, 3]
    assert store.referenced_blobs() == set()


def test_shared_blob_is_not_orphaned_while_referenced(store: Store) -> None:
    _, orphans = store.delete(["id0"])
    assert orphans == set()  # "a" is still used by id2
    _, orphans = store.delete(["id2"])
    assert orphans == {"a", "b"}


def test_vector_shape_is_checked(store: Store) -> None:
    bad = NewRow("x", [{"text": "x"}], {}, "text", np.zeros(3, np.float32), ())
    with pytest.raises(StoreError, match="expected"):
        store.insert([bad])
    assert store.count() == 4  # the failed transaction left nothing behind


def test_readonly_store_sees_writes(store: Store, tmp_path: Path) -> None:
    reader = Store(tmp_path / "m.sqlite", dim=4, readonly=True)
    assert reader.count() == 4
    store.insert([row(7, {})])
    assert reader.count() == 5
    assert reader.rows_by_id(["id7"])["id7"].metadata == {}
