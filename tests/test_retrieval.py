from __future__ import annotations

import numpy as np
import pytest

from conftest import png_bytes
from mmrag.config import RetrieverConfig
from mmrag.documents import Document
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory, StoredDocument
from mmrag.retrieval import Retriever, drop_query_tokens, select


def test_select_cap_redundancy_and_mmr() -> None:
    scores = np.array([0.95, 0.9, 0.89, 0.5], np.float32)
    vectors = np.array([[1, 0], [1, 0], [0.99, 0.141], [0, 1]], np.float32)
    assert select(scores, vectors, 2, RetrieverConfig()) == [0, 1]
    assert select(scores, vectors, 2, RetrieverConfig(relevance_cap=0.92)) == [1, 2]
    assert select(scores, vectors, 2, RetrieverConfig(redundancy_threshold=0.95)) == [0, 3]
    # MMR with a strong diversity weight prefers the orthogonal candidate second
    assert select(scores, vectors, 2, RetrieverConfig(mmr_lambda=0.5)) == [0, 3]
    assert select(scores, vectors, 2, RetrieverConfig(mmr_lambda=1.0)) == [0, 1]


def test_drop_query_tokens_is_seeded_and_keeps_a_word() -> None:
    text = "a photo of a small red bird on a branch"
    a = drop_query_tokens(text, 0.2, np.random.default_rng(0))
    b = drop_query_tokens(text, 0.2, np.random.default_rng(0))
    assert a == b and set(a.split()) <= set(text.split()) and len(a.split()) < len(text.split())
    assert drop_query_tokens("one two", 0.999, np.random.default_rng(1)) in {"one", "two"}
    assert drop_query_tokens("single", 0.5, np.random.default_rng(0)) == "single"


@pytest.fixture
def filled(hashing_memory: Memory, color_docs: list[Document]) -> Memory:
    near_copies = [
        Document.of(
            text="a red square", image=png_bytes((230, 20, 20), pattern=p), metadata={"copy": p}
        )
        for p in (1, 2, 3)
    ]
    ingest(hashing_memory, [*color_docs, *near_copies], progress=False)
    return hashing_memory


def test_text_image_and_mixed_queries(filled: Memory, color_docs: list[Document]) -> None:
    retriever = Retriever(filled, RetrieverConfig(k=3))
    by_text = retriever.search(text="a blue square")
    assert by_text[0].metadata["color"] == "blue"
    blue_png = color_docs[2].images[0].data
    assert blue_png is not None
    by_image = retriever.search(image=blue_png)
    assert by_image[0].metadata["color"] == "blue"
    mixed = retriever.search(text="a blue square", image=blue_png, k=1)
    assert mixed[0].id == color_docs[2].id
    assert mixed[0].score == pytest.approx(1.0, abs=1e-5)  # same encoding as the document
    result = mixed[0].to_json()
    assert set(result) == {"id", "score", "text", "image", "metadata"}
    assert result["text"] == "a blue square" and result["image"].endswith(".png")


def test_exclusion_cap_filters_and_diversity(filled: Memory, color_docs: list[Document]) -> None:
    red = color_docs[0]
    retriever = Retriever(filled)
    base = retriever.search(text="a red square", k=4)
    assert red.id in [r.id for r in base]
    excluded = retriever.search(text="a red square", k=4, exclude_ids=[red.id])
    assert red.id not in [r.id for r in excluded] and len(excluded) == 4
    capped = retriever.search(
        text="a red square",
        image=red.images[0].data,
        k=4,
        config=RetrieverConfig(relevance_cap=0.999),
    )
    assert red.id not in [r.id for r in capped]  # the exact copy of the query is skipped
    filtered = retriever.search(text="a red square", k=5, filters={"color": ["green", "blue"]})
    assert {r.metadata["color"] for r in filtered} == {"green", "blue"}
    diverse = retriever.search(
        text="a red square", k=3, config=RetrieverConfig(redundancy_threshold=0.9)
    )
    vecs = filled.vectors([filled.get([r.id])[0].seq for r in diverse])  # type: ignore[union-attr]
    sims = vecs @ vecs.T
    assert (sims[~np.eye(len(vecs), dtype=bool)] <= 0.9 + 1e-6).all()


def test_refetch_when_filters_remove_candidates(hashing_memory: Memory) -> None:
    docs = [Document.of(text=f"item {i}", metadata={"i": i}) for i in range(50)]
    ingest(hashing_memory, docs, progress=False)
    retriever = Retriever(hashing_memory, RetrieverConfig(k=3, candidate_factor=1))
    query = "item 1"
    excluded = [r.id for r in retriever.search(text=query, k=20)]
    results = retriever.search(text=query, k=3, exclude_ids=excluded[:10])
    assert len(results) == 3 and not set(excluded[:10]) & {r.id for r in results}


def test_search_batch_equals_single_searches(filled: Memory) -> None:
    retriever = Retriever(filled, RetrieverConfig(k=3))
    texts = ["a red square", "a green square", "yellow"]
    batch = retriever.search_batch(texts)
    singles = [retriever.search(text=t) for t in texts]
    assert [[r.id for r in b] for b in batch] == [[r.id for r in s] for s in singles]


def test_query_dropout_changes_the_query_only_with_an_rng(filled: Memory) -> None:
    retriever = Retriever(filled, RetrieverConfig(query_dropout=0.5))
    text = "a bright red square with a grey stripe on top"
    plain = retriever.encode(text)
    assert np.allclose(plain, retriever.encode(text))
    dropped = retriever.encode(text, rng=np.random.default_rng(3))
    assert not np.allclose(plain, dropped)
    with pytest.raises(ValueError, match="needs text, an image"):
        retriever.encode()


def test_fetches_only_what_the_options_need(
    filled: Memory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """k rows (no vectors) when nothing re-ranks; k x candidate_factor for the cap or
    diversity, plus what exclusion may remove; the results are the same either way."""
    fetched: list[int] = []
    vector_reads: list[int] = []
    search, vectors = filled.search_vectors, filled.vectors
    monkeypatch.setattr(
        filled, "search_vectors", lambda q, k, f=None: fetched.append(k) or search(q, k, f)
    )
    monkeypatch.setattr(filled, "vectors", lambda s: vector_reads.append(len(s)) or vectors(s))
    retriever = Retriever(filled, RetrieverConfig(k=3, candidate_factor=4))
    plain = retriever.search(text="a red square")
    assert fetched == [3] and vector_reads == []
    wide = retriever.search(text="a red square", config=RetrieverConfig(k=3, relevance_cap=1.5))
    assert fetched[-1] == 12 and vector_reads == []
    assert [r.id for r in wide] == [r.id for r in plain]  # a cap above every score: same top 3
    retriever.search(text="a red square", exclude_ids=["x", "y"])
    assert fetched[-1] == 5
    retriever.search(text="a red square", config=RetrieverConfig(k=3, mmr_lambda=0.5))
    assert fetched[-1] == 12 and vector_reads == [min(12, len(filled))]


def test_a_document_deleted_between_index_and_rows_is_refetched(
    filled: Memory, monkeypatch: pytest.MonkeyPatch
) -> None:
    retriever = Retriever(filled, RetrieverConfig(k=3))
    expected = retriever.search(text="a red square", k=4)
    get_by_seq = filled.get_by_seq
    gone = expected[0].seq

    def first_row_missing(seqs: list[int]) -> list[StoredDocument | None]:
        return [None if s == gone else d for s, d in zip(seqs, get_by_seq(seqs), strict=True)]

    monkeypatch.setattr(filled, "get_by_seq", first_row_missing)
    results = retriever.search(text="a red square")
    assert [r.id for r in results] == [r.id for r in expected[1:]]
