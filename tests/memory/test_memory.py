from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import png_bytes
from mmrag.config import IndexConfig
from mmrag.documents import Document
from mmrag.encoders.base import EncoderSpec
from mmrag.encoders.hashing import HashingEncoder
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import (
    INDEX,
    EncoderMismatchError,
    Memory,
    MemoryFolderError,
    ensure_memory,
)


def test_create_ingest_search_reopen(hashing_memory: Memory, color_docs: list[Document]) -> None:
    report = ingest(hashing_memory, color_docs, progress=False)
    assert report.added == len(color_docs) and not report.errors
    query = hashing_memory.encoder.encode_text(["a red square"])
    (top_seq, top_score), *_ = hashing_memory.search_vectors(query, 3)[0]
    doc = hashing_memory.get_by_seq([top_seq])[0]
    assert doc is not None and doc.metadata["color"] == "red"
    assert doc.image is not None and Path(doc.image).read_bytes() == color_docs[0].images[0].data
    root = hashing_memory.root
    hashing_memory.close()
    with Memory.open(root) as reader:
        assert len(reader) == len(color_docs)
        assert reader.search_vectors(query, 1)[0][0] == pytest.approx((top_seq, top_score))
        assert reader.manifest.count == len(color_docs)


def test_reingest_is_a_noop_and_metadata_update(
    hashing_memory: Memory, color_docs: list[Document]
) -> None:
    ingest(hashing_memory, color_docs, progress=False)
    generation = hashing_memory.store.generation()
    again = ingest(hashing_memory, color_docs, progress=False)
    assert (again.added, again.existing) == (0, len(color_docs))
    assert hashing_memory.store.generation() == generation
    changed = Document(parts=color_docs[0].parts, metadata={"color": "crimson"})
    report = ingest(hashing_memory, [changed], progress=False, update_metadata=True)
    assert report.updated == 1
    stored = hashing_memory.get([changed.id])[0]
    assert stored is not None and stored.metadata == {"color": "crimson"}


def test_delete_is_immediate_and_collects_blobs(
    hashing_memory: Memory, color_docs: list[Document]
) -> None:
    shared = Document.of(text="another caption", image=color_docs[0].images[0].data)
    ingest(hashing_memory, [*color_docs, shared], progress=False)
    blob = Path(hashing_memory.get([color_docs[0].id])[0].image)  # type: ignore[union-attr,arg-type]
    query = hashing_memory.encoder.encode_text(["a red square"])
    assert hashing_memory.delete([color_docs[0].id, "unknown"]) == 1
    ids = [
        d.id
        for d in hashing_memory.get_by_seq(
            [s for s, _ in hashing_memory.search_vectors(query, 10)[0]]
        )
        if d
    ]
    assert color_docs[0].id not in ids
    assert blob.exists()  # still used by `shared`
    hashing_memory.delete([shared.id])
    assert not blob.exists()
    assert len(hashing_memory) == len(color_docs) - 1


def test_encoder_mismatch_is_a_clear_error(
    hashing_memory: Memory, color_docs: list[Document]
) -> None:
    ingest(hashing_memory, color_docs[:2], progress=False)
    root = hashing_memory.root
    hashing_memory.close()
    with pytest.raises(EncoderMismatchError, match="built with encoder 'hashing'"):
        Memory.open(root, encoder=HashingEncoder(dim=32))


def test_not_a_memory_and_readonly_and_single_writer(
    tmp_path: Path, hashing_memory: Memory
) -> None:
    with pytest.raises(MemoryFolderError, match="not an mmrag memory"):
        Memory.open(tmp_path / "nothing")
    with pytest.raises(MemoryFolderError, match="open for writing"):
        Memory.open(hashing_memory.root, mode="a")
    with (
        Memory.open(hashing_memory.root) as reader,
        pytest.raises(MemoryFolderError, match="read-only"),
    ):
        reader.delete(["x"])


@pytest.mark.parametrize("damage", ["missing", "garbage", "stale"])
def test_index_cache_is_rebuilt_or_caught_up(
    damage: str, memory_path: Path, color_docs: list[Document]
) -> None:
    with ensure_memory(memory_path, EncoderSpec(name="hashing")) as memory:
        ingest(memory, color_docs[:4], progress=False)
        query = memory.encoder.encode_text(["a blue square"])
        expected = memory.search_vectors(query, 6)
    index_file = memory_path / INDEX
    if damage == "missing":
        index_file.unlink()
    elif damage == "garbage":
        index_file.write_bytes(b"\x00" * 64)
    else:  # a writer stored more rows but died before saving the index
        stale = index_file.read_bytes()
        with Memory.open(memory_path, mode="a") as memory:
            ingest(memory, color_docs[4:], progress=False)
            expected = memory.search_vectors(query, 6)
        index_file.write_bytes(stale)
    with Memory.open(memory_path) as reader:
        assert reader.search_vectors(query, 6) == expected


def test_switching_index_kind_rebuilds(memory_path: Path, color_docs: list[Document]) -> None:
    with ensure_memory(memory_path, EncoderSpec(name="hashing")) as memory:
        ingest(memory, color_docs, progress=False)
        query = memory.encoder.encode_text(["green"])
        flat = memory.search_vectors(query, 3)
    with Memory.open(memory_path, mode="a", index=IndexConfig(kind="hnsw")) as memory:
        assert memory.manifest.index.kind == "hnsw"
        assert memory.search_vectors(query, 3) == flat
    assert Memory.open(memory_path).manifest.index.kind == "hnsw"


def test_filtered_search_and_stats(hashing_memory: Memory, color_docs: list[Document]) -> None:
    text_only = Document.of(text="a note about red", metadata={"color": "red"})
    ingest(hashing_memory, [*color_docs, text_only], progress=False)
    q = hashing_memory.encoder.encode_text(["red"])
    hits = hashing_memory.search_vectors(q, 10, filters={"color": "red"})[0]
    assert len(hits) == 2
    hits = hashing_memory.search_vectors(q, 10, filters={"modality": "text"})[0]
    assert [d.id for d in hashing_memory.get_by_seq([s for s, _ in hits]) if d] == [text_only.id]
    stats = hashing_memory.stats()
    assert stats["count"] == len(color_docs) + 1
    assert stats["by_modality"] == {"mixed": len(color_docs), "text": 1}
    assert stats["images"] == len(color_docs)
    assert stats["encoder"]["name"] == "hashing" and stats["index"]["vectors"] == stats["count"]


def test_search_vectors_matches_brute_force(hashing_memory: Memory) -> None:
    docs = [
        Document.of(text=f"doc number {i}", image=png_bytes((i, 255 - i, 7), pattern=i))
        for i in range(60)
    ]
    ingest(hashing_memory, docs, progress=False, batch_size=7)
    seqs = [s for s, _ in hashing_memory.search_vectors(np.ones((1, 64), np.float32), 60)[0]]
    vecs = hashing_memory.vectors(seqs)
    q = hashing_memory.encoder.encode_text(["doc number 17"])
    got = hashing_memory.search_vectors(q, 5)[0]
    brute = vecs @ q[0]
    order = np.argsort(-brute)[:5]
    assert [s for s, _ in got] == [seqs[i] for i in order]


def test_missing_blobs_are_noticed(color_memory: Memory, caplog: pytest.LogCaptureFixture) -> None:
    """An image deleted behind the memory's back is counted by `stats` and named when a
    writer opens (the documents keep their vectors)."""
    root = color_memory.root
    (first,) = color_memory.get([next(iter(color_memory.ids()))])
    assert first is not None and first.image is not None
    Path(first.image).unlink()
    assert color_memory.stats()["missing_images"] == 1
    color_memory.close()
    with (
        caplog.at_level("WARNING", logger="mmrag.memory.memory"),
        Memory.open(root, mode="a") as writer,
    ):
        assert len(writer) > 0
    assert any("1 stored images are missing" in r.getMessage() for r in caplog.records)


def test_a_damaged_or_mismatched_manifest_is_one_clear_error(color_memory: Memory) -> None:
    root = color_memory.root
    color_memory.close()
    manifest = root / "manifest.json"
    good = manifest.read_bytes()
    manifest.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(MemoryFolderError, match=r"manifest\.json is damaged"):
        Memory.open(root)
    manifest.write_bytes(good.replace(b'"dim": 64', b'"dim": 32'))
    with pytest.raises(MemoryFolderError, match="64-d ones"):
        Memory.open(root)
    manifest.write_bytes(good)
    with Memory.open(root) as memory:
        assert len(memory) > 0
