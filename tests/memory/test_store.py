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


def test_the_kept_count_follows_every_write(store: Store) -> None:
    def counted() -> int:
        return int(store._connect().execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    assert store.count() == counted() == 4
    store.insert([row(0, {}), row(7, {}), row(8, {})])  # id0 exists: two new
    assert store.count() == counted() == 6
    seqs, _ = store.delete(["id7", "id7", "nope", *[f"x{i}" for i in range(600)], "id7"])
    assert len(seqs) == 1  # an id given twice (across 500-id chunks too) is one deletion
    assert store.count() == counted() == 5
    with pytest.raises(StoreError):  # a failed write moves nothing
        store.insert([row(9, {}), NewRow("bad", [], {}, "text", np.zeros(3, np.float32), ())])
    assert store.count() == counted() == 5


def test_a_store_made_before_the_kept_count(tmp_path: Path) -> None:
    """Older stores have no count row: read-only opens count the rows, the first writer
    adds the row."""
    path = tmp_path / "old.sqlite"
    s = Store(path, dim=4)
    s.insert([row(i, {}) for i in range(3)])
    s._connect().execute("DELETE FROM meta WHERE key='count'")
    s.close()
    reader = Store(path, dim=4, readonly=True)
    assert reader.count() == 3
    writer = Store(path, dim=4)
    writer.insert([row(5, {})])
    assert writer.count() == reader.count() == 4
    assert writer._connect().execute("SELECT value FROM meta WHERE key='count'").fetchone() == (
        "4",
    )


def test_rows_leave_vectors_out_and_vectors_keep_order(store: Store) -> None:
    rows = store.rows_by_seq([3, 1])
    assert rows[3].id == "id2" and rows[3].vector is None
    assert rows[3].metadata == {"color": "red", "n": 3}
    np.testing.assert_array_equal(store.vectors([3, 1]), np.eye(4, dtype=np.float32)[[2, 0]])
    assert store.vectors([]).shape == (0, 4)
    big = Store(store.path, dim=4)
    big.insert([NewRow("huge", [{"text": "h"}], {"n": 2**70}, "text", np.ones(4, np.float32), ())])
    assert big.rows_by_id(["huge"])["huge"].metadata == {"n": 2**70}  # beyond orjson's ints
