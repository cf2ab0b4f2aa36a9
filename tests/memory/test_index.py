from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmrag.config import IndexConfig
from mmrag.memory.index import (
    IVF_MIN_TRAIN,
    FaissIndex,
    IndexFileError,
    NumpyIndex,
    load_index,
    save_index,
)

DIM = 32


def clustered(n: int, dim: int = DIM, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: ANN indexes are only meaningful on such data."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall(truth: np.ndarray, found: np.ndarray) -> float:
    return float(
        np.mean([len(set(t) & set(f)) / len(t) for t, f in zip(truth, found, strict=True)])
    )


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = clustered(5000)
    ids = np.arange(100, 5100, dtype=np.int64)
    queries = clustered(50, seed=1)
    return ids, x, queries


def test_numpy_oracle_is_exact(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, x, q = data
    oracle = NumpyIndex(DIM)
    oracle.add(ids, x)
    scores, found = oracle.search(q, 10)
    brute = q @ x.T
    expected = ids[np.argsort(-brute, axis=1)[:, :10]]
    assert np.array_equal(found, expected)
    assert np.allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :10], atol=1e-6)


def test_flat_equals_oracle_with_filters_and_deletes(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    ids, x, q = data
    oracle, flat = NumpyIndex(DIM), FaissIndex(DIM, IndexConfig(kind="flat"))
    for index in (oracle, flat):
        index.add(ids, x)
        index.remove(ids[::3])
    allowed = ids[1::2]
    for kwargs in ({}, {"allowed": allowed}):
        s1, i1 = oracle.search(q, 10, **kwargs)
        s2, i2 = flat.search(q, 10, **kwargs)
        assert np.array_equal(i1, i2)
        assert np.allclose(s1, s2, atol=1e-5)
    assert len(flat) == len(oracle) == len(ids) - len(ids[::3])


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_meet_recall(
    kind: str, data: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    ids, x, q = data
    oracle = NumpyIndex(DIM)
    oracle.add(ids, x)
    index = FaissIndex.build(DIM, IndexConfig(kind=kind), ids, x)
    if kind == "ivf":
        assert index.is_ivf  # 5000 >= IVF_MIN_TRAIN: trained
    _, truth = oracle.search(q, 10)
    _, found = index.search(q, 10)
    assert recall(truth, found) >= 0.95


def test_hnsw_tombstones_and_rebuild_signal(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    ids, x, q = data
    index = FaissIndex.build(DIM, IndexConfig(kind="hnsw", max_tombstone_fraction=0.2), ids, x)
    _, before = index.search(q[:1], 1)
    index.remove(before[0])
    _, after = index.search(q[:1], 10)
    assert before[0, 0] not in after[0]
    assert not index.needs_rebuild()
    index.remove(ids[: len(ids) // 4])
    assert index.needs_rebuild()


def test_filtered_ann_uses_exact_path_for_tight_filters(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    ids, x, q = data
    oracle = NumpyIndex(DIM)
    oracle.add(ids, x)
    index = FaissIndex.build(DIM, IndexConfig(kind="hnsw"), ids, x)
    allowed = ids[::97]  # ~1% of the index: graph search alone would miss most of it
    _, truth = oracle.search(q, 5, allowed=allowed)
    _, found = index.search(q, 5, allowed=allowed)
    assert np.array_equal(truth, found)


def test_ivf_stays_exact_until_big_enough() -> None:
    x = clustered(IVF_MIN_TRAIN - 1)
    index = FaissIndex.build(DIM, IndexConfig(kind="ivf"), np.arange(len(x)), x)
    assert not index.is_ivf and not index.needs_rebuild()
    more = clustered(10, seed=3)
    index.add(np.arange(len(x), len(x) + 10), more)
    assert index.needs_rebuild()


def test_save_load_round_trip_and_damage(tmp_path: Path, data: tuple[np.ndarray, ...]) -> None:
    ids, x, q = data
    config = IndexConfig(kind="hnsw")
    index = FaissIndex.build(DIM, config, ids, x)
    index.remove(ids[:5])
    path = tmp_path / "index.bin"
    save_index(path, index, generation=7, max_seq=int(ids.max()))
    loaded, generation, max_seq = load_index(path, DIM, config)
    assert (generation, max_seq) == (7, int(ids.max()))
    assert np.array_equal(loaded.search(q, 10)[1], index.search(q, 10)[1])
    with pytest.raises(IndexFileError, match="another index configuration"):
        load_index(path, DIM, IndexConfig(kind="flat"))
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match="checksum"):
        load_index(path, DIM, config)
    path.write_bytes(b"garbage")
    with pytest.raises(IndexFileError):
        load_index(path, DIM, config)


def test_the_checksum_covers_the_header(tmp_path: Path, data: tuple[np.ndarray, ...]) -> None:
    """Editing the generation or max_seq in the header (same length, so the JSON still
    parses) makes the file untrusted: the memory rebuilds its index from the store."""
    ids, x, _ = data
    config = IndexConfig(kind="flat")
    path = tmp_path / "index.bin"
    save_index(path, FaissIndex.build(DIM, config, ids, x), generation=7, max_seq=600)
    raw = path.read_bytes()
    for old, new in (
        (b'"generation": 7', b'"generation": 9'),
        (b'"max_seq": 600', b'"max_seq": 700'),
    ):
        assert old in raw
        path.write_bytes(raw.replace(old, new))
        with pytest.raises(IndexFileError, match="checksum"):
            load_index(path, DIM, config)
