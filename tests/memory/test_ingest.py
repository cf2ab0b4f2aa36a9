"""The ingest never loses or duplicates anything: bad input, kill -9, concurrent readers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes
from mmrag.data.readers import read_sources
from mmrag.documents import Document
from mmrag.encoders.base import Encoder, Vectors
from mmrag.memory.ingest import DocumentLimits, ingest
from mmrag.memory.memory import DATABASE, Memory

N_DOCS = 3000


def write_jsonl(folder: Path, n: int) -> Path:
    (folder / "img").mkdir(parents=True)
    lines = []
    for i in range(n):
        (folder / "img" / f"{i}.png").write_bytes(
            png_bytes((i % 256, (i // 256) % 256, 99), pattern=i % 7)
        )
        lines.append(
            json.dumps(
                {
                    "parts": [{"image": f"img/{i}.png"}, {"text": f"document {i}"}],
                    "metadata": {"i": i},
                }
            )
        )
    path = folder / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ingest_cmd(memory: Path, source: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mmrag.cli.main",
        "ingest",
        str(memory),
        str(source),
        "--encoder",
        "hashing",
        "--batch-size",
        "8",
        "--no-progress",
        "--json",
    ]


def count_rows(memory: Path) -> int:
    try:
        with sqlite3.connect(f"file:{memory / DATABASE}?mode=ro", uri=True, timeout=5) as con:
            return int(con.execute("SELECT COUNT(*) FROM documents").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def assert_consistent(memory_path: Path, expected: int, orphans_allowed: bool = False) -> None:
    with Memory.open(memory_path) as memory:
        assert len(memory) == expected
        con = memory.store._connect()
        assert con.execute("SELECT COUNT(DISTINCT id) FROM documents").fetchone()[0] == expected
        referenced = memory.store.referenced_blobs()
        on_disk = {name for name, _ in memory.blobs.iter_names()}
        assert referenced <= on_disk, "a stored document lost its image"
        # a killed writer may leave unreferenced blobs; the next writer collects them
        assert orphans_allowed or on_disk == referenced, "orphan blobs"
        index = memory._sync()
        assert len(index) == expected
        seqs = [r[0] for r in con.execute("SELECT seq FROM documents ORDER BY seq")]
        vecs = memory.vectors(seqs)
        query = vecs[[0, expected // 2, expected - 1]]
        hits = memory.search_vectors(query, 5)
        brute = np.asarray(seqs)[np.argsort(-(query @ vecs.T), axis=1, kind="stable")[:, :5]]
        assert [[s for s, _ in h] for h in hits] == brute.tolist()


@pytest.mark.slow
def test_kill_9_mid_ingest_then_resume(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "src", N_DOCS)
    memory = tmp_path / "memory"
    proc = subprocess.Popen(
        ingest_cmd(memory, source), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while count_rows(memory) < 200 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the ingest finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    partial = count_rows(memory)
    assert 0 < partial < N_DOCS
    assert_consistent(memory, partial, orphans_allowed=True)  # committed work is whole
    done = subprocess.run(ingest_cmd(memory, source), capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert report["added"] == N_DOCS - partial and report["existing"] == partial
    assert report["count"] == N_DOCS
    assert_consistent(memory, N_DOCS)


def test_bad_inputs_are_reported_and_the_rest_ingested(
    tmp_path: Path, hashing_memory: Memory
) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    good = png_bytes((10, 200, 30), size=32)
    (folder / "good.png").write_bytes(good)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (folder / "truncated.png").write_bytes(png_bytes((200, 10, 30), size=64)[:60])
    lines = [
        json.dumps({"text": "fine", "image": "good.png"}),
        '{"text": "broken json',
        json.dumps({"text": "bad image", "image": "corrupt.png"}),
        json.dumps({"text": "cut image", "image": "truncated.png"}),
        json.dumps({"text": "no such image", "image": "absent.png"}),
        json.dumps({"text": "text only"}),
    ]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = ingest(hashing_memory, read_sources([folder / "docs.jsonl"]), progress=False)
    assert report.added == 2 and len(hashing_memory) == 2
    reasons = {e.source.rsplit("/", 1)[-1]: e.reason for e in report.errors}
    # Every error names the line that referenced it; an image that fails to decode, its file.
    assert set(reasons) == {"docs.jsonl:2", "docs.jsonl:3", "docs.jsonl:4", "docs.jsonl:5"}
    assert "malformed JSON" in reasons["docs.jsonl:2"]
    assert "corrupt.png" in reasons["docs.jsonl:3"]
    assert "unreadable image" in reasons["docs.jsonl:3"]
    assert "truncated.png" in reasons["docs.jsonl:4"]
    assert "unreadable image" in reasons["docs.jsonl:4"]
    assert "cannot read image file" in reasons["docs.jsonl:5"]
    assert {
        name for name, _ in hashing_memory.blobs.iter_names()
    } == hashing_memory.store.referenced_blobs()


def test_documents_over_the_limits_are_reported_and_the_rest_ingested(
    tmp_path: Path, hashing_memory: Memory
) -> None:
    deep: dict[str, object] = {}
    node = deep
    for _ in range(40):
        node["a"] = {}
        node = node["a"]  # type: ignore[assignment]
    lines = [
        json.dumps({"text": "fine"}),
        json.dumps({"text": "x" * 2_000}),
        json.dumps({"text": "deep", "metadata": deep}),
        json.dumps({"text": "big", "metadata": {"blob": "y" * 70_000}}),
        json.dumps({"text": "also fine"}),
    ]
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    limits = DocumentLimits(max_text_chars=1_000)
    report = ingest(hashing_memory, read_sources([source]), progress=False, limits=limits)
    assert report.added == 2 and len(hashing_memory) == 2
    reasons = {e.source.rsplit("/", 1)[-1]: e.reason for e in report.errors}
    assert reasons == {
        "docs.jsonl:2": "text: 2000 characters of text, over the 1000 limit",
        "docs.jsonl:3": "metadata: nested 41 levels deep, over the 32 limit",
        "docs.jsonl:4": "metadata: 70012 bytes of JSON, over the 65536 limit",
    }


class Refusing:
    """The hashing encoder, refusing texts that contain "poison" (as a real tower might
    refuse an input it cannot tokenise)."""

    def __init__(self, inner: Encoder) -> None:
        self.inner, self.name, self.dim = inner, inner.name, inner.dim

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def encode_text(self, texts: Sequence[str]) -> Vectors:
        if any("poison" in t for t in texts):
            raise ValueError("cannot encode poison")
        return self.inner.encode_text(texts)

    def encode_image(self, images: Sequence[Image.Image]) -> Vectors:
        return self.inner.encode_image(images)


def test_a_document_the_encoder_refuses_fails_alone(hashing_memory: Memory) -> None:
    hashing_memory.use_encoder(Refusing(hashing_memory.encoder))
    docs = [Document.of(text=t) for t in ("one", "the poison one", "two", "three")]
    report = ingest(hashing_memory, docs, progress=False)
    assert report.added == 3 and len(hashing_memory) == 3
    assert [e.reason for e in report.errors] == ["the encoder refused it: cannot encode poison"]
    with pytest.raises(ValueError, match="poison"):  # no document's fault: the run stops
        ingest(hashing_memory, [Document.of(text=f"poison {i}") for i in range(3)], progress=False)
    assert len(hashing_memory) == 3


@pytest.mark.slow
def test_readers_search_while_a_writer_ingests(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "src", N_DOCS)
    memory = tmp_path / "memory"
    seed = Document.of(text="seed document")
    first = subprocess.run(
        ingest_cmd(memory, _one_doc_jsonl(tmp_path, seed)), capture_output=True, check=True
    )
    assert first.returncode == 0
    proc = subprocess.Popen(
        ingest_cmd(memory, source), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    seen: list[int] = []
    with Memory.open(memory) as reader:
        query = reader.encoder.encode_text(["document 42"])
        while proc.poll() is None:
            hits = reader.search_vectors(query, 3)[0]
            assert hits, "a reader must always get results"
            seen.append(len(reader))
    _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert len(seen) > 3 and seen == sorted(seen)
    assert_consistent(memory, N_DOCS + 1)


def _one_doc_jsonl(tmp_path: Path, doc: Document) -> Path:
    path = tmp_path / "seed.jsonl"
    path.write_text(json.dumps({"text": doc.text}) + "\n", encoding="utf-8")
    return path
