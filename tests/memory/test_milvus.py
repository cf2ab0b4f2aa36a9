"""The Milvus backend (through milvus-lite, the same MilvusClient calls as a cluster) against the
embedded backend as the oracle: same documents in, same results out."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import COLORS, HASHING, png_bytes
from mmrag.cli.main import main
from mmrag.config import IndexConfig, RetrieverConfig
from mmrag.documents import Document
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory, MemoryFolderError, ensure_memory
from mmrag.memory.milvus import DIRTY_FILE, SEQ_FILE, MilvusMemory
from mmrag.memory.milvus_store import SEQ_BLOCK, SeqAllocator, filter_expr
from mmrag.memory.store import StoreError
from mmrag.retrieval import Retriever

pytest.importorskip("pymilvus", reason="the milvus backend needs the `scale` extra")
FILTERS = [
    None,
    {"color": "red"},
    {"color": ["red", "blue", "black"]},
    {"color": None},
    {"modality": "text"},
    {"modality": ["mixed", "image"], "shade": "dark"},
    {"shade": None, "i": [1, 2, 3.0]},
    {"flag": True},
]


def corpus() -> list[Document]:
    """Images with captions (some sharing an image), text-only and image-only documents, with
    metadata that exercises equality, membership, null and missing keys."""
    docs = [
        Document.of(
            text=f"a {shade} {name} square",
            image=png_bytes(rgb, pattern=p),
            metadata={"color": name, "shade": shade, "i": i, "flag": i % 2 == 0},
        )
        for i, (name, rgb) in enumerate(COLORS.items())
        for p, shade in ((0, "light"), (3, "dark"))
    ]
    docs += [
        Document.of(text=f"note {i}: {name}", metadata={"i": i}) for i, name in enumerate(COLORS)
    ]
    docs += [
        Document.of(image=png_bytes(rgb, pattern=7), metadata={"color": None})
        for rgb in COLORS.values()
    ]
    docs.append(
        Document.of(text="a red square again", image=png_bytes(COLORS["red"]))
    )  # shared blob
    return docs


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Memory, Memory]]:
    """The same corpus in an embedded and a Milvus memory."""
    embedded = ensure_memory(tmp_path / "embedded", HASHING)
    milvus = ensure_memory(tmp_path / "milvus", HASHING, backend="milvus")
    for memory in (embedded, milvus):
        assert ingest(memory, corpus(), progress=False).added == len(corpus())
    yield embedded, milvus
    embedded.close()
    milvus.close()


def ids_and_scores(
    memory: Memory, hits: list[list[tuple[int, float]]]
) -> list[list[tuple[str, float]]]:
    out = []
    for row in hits:
        docs = memory.get_by_seq([seq for seq, _ in row])
        out.append([(d.id, s) for d, (_, s) in zip(docs, row, strict=True) if d is not None])
    return out


def assert_same(a: list[list[tuple[str, float]]], b: list[list[tuple[str, float]]]) -> None:
    assert [[i for i, _ in row] for row in a] == [[i for i, _ in row] for row in b]
    np.testing.assert_allclose(
        [s for row in a for _, s in row], [s for row in b for _, s in row], rtol=1e-5, atol=1e-6
    )


def test_exact_search_equals_the_embedded_backend(pair: tuple[Memory, Memory]) -> None:
    embedded, milvus = pair
    assert isinstance(milvus, MilvusMemory) and len(milvus) == len(embedded) == len(corpus())
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((6, embedded.manifest.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for filters in FILTERS:
        expected = embedded.search_vectors(queries, 5, filters)
        got = milvus.search_vectors(queries, 5, filters)
        assert sum(map(len, expected)) > 0, filters
        assert_same(ids_and_scores(embedded, expected), ids_and_scores(milvus, got))
        assert milvus.store.count(filters) == embedded.store.count(filters), filters
    # The Retriever on top (over-fetch, MMR with stored vectors, exclusions) agrees too.
    config = RetrieverConfig(k=4, mmr_lambda=0.5)
    for text in ("a dark red square", "note 3"):
        a = Retriever(embedded, config).search(text=text, exclude_ids=[corpus()[0].id])
        b = Retriever(milvus, config).search(text=text, exclude_ids=[corpus()[0].id])
        assert [(r.id, r.metadata, r.text) for r in a] == [(r.id, r.metadata, r.text) for r in b]
        np.testing.assert_allclose([r.score for r in a], [r.score for r in b], rtol=1e-5)
        assert [Path(i).read_bytes() for r in b for i in r.images] == [
            Path(i).read_bytes() for r in a for i in r.images
        ]


def test_upsert_metadata_and_delete_behave_as_embedded(pair: tuple[Memory, Memory]) -> None:
    docs = corpus()
    for memory in pair:
        assert ingest(memory, docs, progress=False).added == 0  # same content: a no-op
        changed = {docs[0].id: {"color": "crimson"}, docs[1].id: {}, "0" * 32: {"x": 1}}
        assert memory.update_metadata(changed) == 2
        assert memory.store.count({"color": "crimson"}) == 1
        assert memory.get([docs[1].id])[0].metadata == {}  # type: ignore[union-attr]
        shared = docs[0].images[0].sha256 or ""  # also the last document's image
        own = docs[2].images[0].sha256 or ""
        assert memory.delete([docs[0].id, docs[2].id, "f" * 32]) == 2
        assert memory.contains([docs[0].id, docs[2].id, docs[3].id]) == {docs[3].id}
        assert memory.get([docs[0].id]) == [None]
        assert shared in {sha for sha, _ in memory.blobs.iter_names()}
        assert own not in {sha for sha, _ in memory.blobs.iter_names()}
        vector = memory.vectors([memory.get([docs[2 + 2].id])[0].seq])  # type: ignore[union-attr]
        hits = memory.search_vectors(vector, len(docs))
        returned = {d.id for d in memory.get_by_seq([s for s, _ in hits[0]]) if d}
        assert docs[0].id not in returned and docs[2].id not in returned  # gone at once
        assert len(returned) == len(docs) - 2
    stats = [memory.stats() for memory in pair]
    assert stats[0].keys() <= stats[1].keys()  # what the server's /stats reads
    for key in ("count", "by_modality", "images", "deleted_total"):
        assert stats[0][key] == stats[1][key], key
    assert stats[1]["database_bytes"] > 0


def test_reopen_keeps_seqs_unique_and_collects_blobs_of_a_dead_writer(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    docs = corpus()
    with ensure_memory(path, HASHING, backend="milvus") as memory:
        ingest(memory, docs[:5], progress=False)
        first = {d.id: d.seq for d in memory.get([d.id for d in docs[:5]]) if d}
        memory.delete([docs[4].id])
    assert json.loads((path / SEQ_FILE).read_text())["next"] == 1 + SEQ_BLOCK
    assert not (path / DIRTY_FILE).exists()
    with Memory.open(path) as reader:  # read-only
        assert isinstance(reader, MilvusMemory) and len(reader) == 4
        assert reader.manifest.count == 4
        with pytest.raises(MemoryFolderError, match="read-only"):
            reader.delete([docs[0].id])
    (path / SEQ_FILE).unlink()  # a lost allocator file restarts above every *stored* seq
    (path / DIRTY_FILE).write_text("pid 1\n")  # as if a writer had died mid-ingest
    orphan = path / "blobs" / "ab" / ("ab" * 32 + ".png")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(png_bytes((1, 2, 3)))
    with ensure_memory(path) as memory:
        assert not orphan.exists()
        ingest(memory, docs[4:8], progress=False)
        seqs = {d.id: d.seq for d in memory.get([d.id for d in docs[:8]]) if d}
    assert all(seqs[i] == s for i, s in first.items() if i != docs[4].id)
    assert min(seqs[d.id] for d in docs[4:8]) > max(first[d.id] for d in docs[:4])
    assert len(set(seqs.values())) == 8


def test_seq_allocator_never_reuses_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    a = SeqAllocator.open(path, lambda: 41)
    assert a.take(3) == [42, 43, 44]
    b = SeqAllocator.open(path, lambda: 0)  # another writer after a crash: above the mark
    assert b.take(1) == [42 + SEQ_BLOCK]


def test_filter_expressions_and_their_errors() -> None:
    assert filter_expr(None) == ""
    assert filter_expr({"color": ["red", None], "n": 3, "ok": True}) == (
        '(metadata["color"] == "red" or metadata["color"] is null) and '
        '(metadata["n"] == 3) and (metadata["ok"] == true)'
    )
    assert filter_expr({"modality": "text", "q": 'say "hi"\\'}) == (
        '(modality == "text") and (metadata["q"] == "say \\"hi\\"\\\\")'
    )
    for bad in ({"bad key": 1}, {"k": []}, {"k": {"nested": 1}}):
        with pytest.raises(StoreError):
            filter_expr(bad)


def test_index_kinds_and_backend_is_fixed(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    docs = corpus()
    with ensure_memory(path, HASHING, IndexConfig(kind="hnsw"), backend="milvus") as memory:
        ingest(memory, docs, progress=False)
        assert (
            memory.store.client.describe_index(memory.store.collection, "vector")["index_type"]
            == "HNSW"
        )
        exact = ids_and_scores(memory, memory.search_vectors(memory.vectors([1, 2]), 3))
    with Memory.open(path, "a", index=IndexConfig(kind="ivf", ivf_nlist=4, ivf_nprobe=4)) as memory:
        assert (
            memory.store.client.describe_index(memory.store.collection, "vector")["index_type"]
            == "IVF_FLAT"
        )
        hits = memory.search_vectors(memory.vectors([1, 2]), 3)
        assert ids_and_scores(memory, hits)[0][0][0] == exact[0][0][0]
    with pytest.raises(MemoryFolderError, match="backend and URI cannot change"):
        ensure_memory(path, backend="embedded")
    with pytest.raises(ValueError, match="URI"):
        ensure_memory(tmp_path / "other", HASHING, uri="x.db")
    with pytest.raises(ValueError, match="http"):
        ensure_memory(tmp_path / "other", HASHING, backend="milvus", uri="ftp://host")


def test_cli_ingest_search_info_delete_on_milvus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    for name, rgb in COLORS.items():
        (folder / f"{name}.png").write_bytes(png_bytes(rgb))
        (folder / f"{name}.txt").write_text(f"a {name} square\n", encoding="utf-8")
    outputs = {}
    for backend in ("embedded", "milvus"):
        mem = str(tmp_path / backend)
        args = ["ingest", mem, str(folder), "--encoder", "hashing", "--backend", backend]
        assert main([*args, "--no-progress", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["added"] == len(COLORS)
        query = ["search", mem, "--text", "a red square", "-k", "3", "--json"]
        assert main([*query, "--filter", "color=null"]) == 0
        outputs[backend] = json.loads(capsys.readouterr().out)["results"]
    for a, b in zip(outputs["embedded"], outputs["milvus"], strict=True):
        assert (a["id"], a["text"]) == (b["id"], b["text"])
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)
    mem = str(tmp_path / "milvus")
    assert main(["info", mem, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == len(COLORS) and info["backend"]["uri"] == "milvus.db"
    assert main(["delete", mem, outputs["milvus"][0]["id"]]) == 0
    assert f"holds {len(COLORS) - 1} documents" in capsys.readouterr().out


def test_milvus_lite_serves_one_process_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    with ensure_memory(path, HASHING, backend="milvus") as memory:
        ingest(memory, corpus()[:3], progress=False)
        probe = subprocess.run(
            [sys.executable, "-m", "mmrag.cli.main", "info", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.returncode == 1
        assert "one process at a time" in probe.stderr
    done = subprocess.run(  # closed: the file is free for another process
        [sys.executable, "-m", "mmrag.cli.main", "info", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["count"] == 3


def test_the_server_runs_on_a_milvus_memory(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmrag.server import create_app

    path = tmp_path / "mem"
    with ensure_memory(path, HASHING, backend="milvus") as memory:
        ingest(memory, corpus()[:6], progress=False)
    token = "t" * 24
    with TestClient(create_app(path, token=token)) as client:
        stats = client.get("/stats").json()
        assert (stats["count"], stats["images"], stats["deleted_total"]) == (6, 6, 0)
        hits = client.post("/search", json={"text": "a dark red square", "k": 2}).json()
        first = hits["results"][0]
        assert first["metadata"] == {"color": "red", "shade": "dark", "i": 0, "flag": True}
        assert client.get(first["images"][0]["url"]).status_code == 200
        auth = {"Authorization": f"Bearer {token}"}
        assert client.delete(f"/documents/{first['id']}", headers=auth).json()["count"] == 5
        assert client.get("/stats").json()["deleted_total"] == 1
