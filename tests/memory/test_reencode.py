"""Re-encoding a memory in place: same documents, new vectors, and a crash never mixes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import HASHING
from mmrag.documents import Document
from mmrag.encoders.hashing import HashingEncoder
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import (
    DATABASE,
    MANIFEST,
    NEW_DATABASE,
    NEW_MANIFEST,
    EncoderMismatchError,
    Memory,
    ensure_memory,
    finish_pending,
)
from mmrag.memory.memory import (
    REENCODE_COMMIT as COMMIT,
)
from mmrag.memory.reencode import reencode

OTHER = HashingEncoder(dim=32, seed=1)


def _build(root: Path, docs: list[Document]) -> list[str]:
    with ensure_memory(root, HASHING) as memory:
        ingest(memory, docs, progress=False)
        return sorted(memory.ids())


def test_reencode_replaces_every_vector_and_keeps_the_documents(
    memory_path: Path, color_docs: list[Document]
) -> None:
    ids = _build(memory_path, color_docs)
    with pytest.raises(EncoderMismatchError, match="--reencode"):
        Memory.open(memory_path, encoder=OTHER)

    report = reencode(memory_path, HASHING, encoder=OTHER, progress=False)
    assert (report.count, report.skipped) == (len(color_docs), False)
    assert report.new_fingerprint == OTHER.fingerprint() != report.old_fingerprint
    assert not any((memory_path / n).exists() for n in (NEW_DATABASE, NEW_MANIFEST, COMMIT))

    with Memory.open(memory_path, encoder=OTHER) as memory:
        assert memory.manifest.dim == 32 and memory.manifest.count == len(color_docs)
        assert sorted(memory.ids()) == ids
        stored = memory.get([color_docs[0].id])[0]
        assert stored is not None and stored.metadata == dict(color_docs[0].metadata)
        assert stored.image is not None and Path(stored.image).is_file()
        query = OTHER.encode_text([color_docs[0].text])
        (seq, _), *_ = memory.search_vectors(query, 1)[0]
        vector = memory.vectors([seq])[0]
        expected = ingest_vector(OTHER, color_docs, memory.get_by_seq([seq])[0].id)  # type: ignore[union-attr]
        np.testing.assert_allclose(vector, expected, atol=1e-6)

    again = reencode(memory_path, HASHING, encoder=OTHER, progress=False)
    assert again.skipped


def ingest_vector(encoder: HashingEncoder, docs: list[Document], doc_id: str) -> np.ndarray:
    """What a fresh ingest with `encoder` stores for the document."""
    from mmrag.encoders.mixed import encode_documents

    doc = next(d for d in docs if d.id == doc_id)
    return encode_documents(encoder, [doc], [[p.open_image() for p in doc.images]])[0]


def test_a_crash_before_the_commit_keeps_the_old_memory(
    memory_path: Path, color_docs: list[Document]
) -> None:
    ids = _build(memory_path, color_docs)
    before = (memory_path / MANIFEST).read_bytes()
    (memory_path / NEW_DATABASE).write_bytes(b"half a database")
    (memory_path / NEW_MANIFEST).write_text("{}")
    assert not finish_pending(memory_path)
    assert not (memory_path / NEW_DATABASE).exists()
    assert (memory_path / MANIFEST).read_bytes() == before
    with Memory.open(memory_path, encoder=HashingEncoder()) as memory:
        assert sorted(memory.ids()) == ids


def test_a_crash_after_the_commit_is_finished_on_open(
    memory_path: Path, color_docs: list[Document], tmp_path: Path
) -> None:
    ids = _build(memory_path, color_docs)
    other = tmp_path / "other"  # the same documents, encoded by the other encoder
    with ensure_memory(other, HASHING, encoder=OTHER) as memory:
        ingest(memory, color_docs, progress=False)
    (other / DATABASE).replace(memory_path / NEW_DATABASE)
    (other / MANIFEST).replace(memory_path / NEW_MANIFEST)
    (memory_path / COMMIT).write_text("reencode\n")
    with Memory.open(memory_path, encoder=OTHER) as memory:  # finishes the swap first
        assert sorted(memory.ids()) == ids
        assert memory.manifest.dim == 32
    assert not (memory_path / COMMIT).exists()


def test_finishing_a_swap_twice_is_harmless(memory_path: Path, color_docs: list[Document]) -> None:
    """The writer and a reader opening meanwhile may both finish the same committed swap."""
    _build(memory_path, color_docs)
    (memory_path / NEW_DATABASE).write_bytes((memory_path / DATABASE).read_bytes())
    (memory_path / NEW_MANIFEST).write_bytes((memory_path / MANIFEST).read_bytes())
    (memory_path / COMMIT).write_text("reencode\n")
    assert finish_pending(memory_path)
    assert not finish_pending(memory_path)  # nothing left to do, nothing raised
    with Memory.open(memory_path, encoder=HashingEncoder()) as memory:
        assert len(memory) == len(color_docs)
