"""`mmrag check`: every kind of damage is found, named and, with --repair, fixed."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from mmrag.cli.main import main
from mmrag.documents import Document
from mmrag.memory.check import MISSING_IMAGES_KEY, check_memory
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import DATABASE, INDEX, Memory
from mmrag.retrieval import Retriever


@pytest.fixture
def closed_memory(color_memory: Memory, memory_path: Path) -> Path:
    color_memory.checkpoint()
    color_memory.close()
    return memory_path


def blob_files(path: Path) -> list[Path]:
    return sorted(p for p in (path / "blobs").rglob("*") if p.is_file())


def test_a_sound_memory_is_ok(closed_memory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = check_memory(closed_memory)
    assert report.ok and report.findings == []
    assert report.checked["documents"] == report.checked["index_vectors"] == 6
    assert report.checked["hashed"] == report.checked["blobs"] == 6
    assert main(["check", str(closed_memory), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def damage(path: Path) -> dict[str, str]:
    """Delete one blob, corrupt another, add an orphan, write NaN metadata and a wrong kept
    count behind the memory's back, and edit the index header's generation."""
    files = blob_files(path)
    files[0].unlink()
    files[1].write_bytes(b"not the image it was")
    (path / "blobs" / "ab").mkdir(exist_ok=True)
    (path / "blobs" / "ab" / f"{'ab' * 32}.png").write_bytes(b"an orphan")
    con = sqlite3.connect(path / DATABASE)
    con.execute("UPDATE documents SET metadata = '{\"x\": NaN}' WHERE seq = 3")
    con.execute("UPDATE meta SET value = '42' WHERE key = 'count'")
    nan_id = con.execute("SELECT id FROM documents WHERE seq = 3").fetchone()[0]
    con.commit()
    con.close()
    raw = (path / INDEX).read_bytes()
    (path / INDEX).write_bytes(raw.replace(b'"generation": 1', b'"generation": 0', 1))
    return {
        "gone": files[0].name.split(".")[0],
        "corrupt": files[1].name.split(".")[0],
        "nan": nan_id,
    }


def test_damage_is_found_then_repaired(
    closed_memory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marks = damage(closed_memory)
    assert main(["check", str(closed_memory)]) == 1
    out = capsys.readouterr().out
    for words in (
        "the kept count says 42, the store holds 6",
        "1 documents hold JSON SQLite cannot read (NaN or Infinity)",
        "1 stored images are missing and 1 do not hash to their name (corrupt)",
        "1 image files no document references",
        "the index file cannot be trusted",
        "problems found: --repair",
    ):
        assert words in out, words
    report = check_memory(closed_memory)
    assert not report.ok
    checks = {f.check for f in report.findings}
    assert checks == {"documents", "count", "blobs", "index"}
    image_finding = next(f for f in report.findings if "missing" in f.message)
    assert len(image_finding.ids) == 2 and not image_finding.repaired

    repaired = check_memory(closed_memory, repair=True)
    assert repaired.ok and {f.check for f in repaired.findings} == checks
    assert check_memory(closed_memory).ok  # nothing left
    assert main(["check", str(closed_memory)]) == 0

    with Memory.open(closed_memory) as memory:
        assert len(memory) == 6
        marked = {
            d.id: d.metadata.get(MISSING_IMAGES_KEY) for d in memory.get(image_finding.ids) if d
        }
        assert sorted(sha for shas in marked.values() for sha in shas) == sorted(
            [marks["gone"], marks["corrupt"]]
        )
        nan_doc = memory.get([marks["nan"]])[0]
        assert nan_doc is not None and nan_doc.metadata == {"x": None}
        # metadata filters work again (they failed on the NaN row)
        hits = Retriever(memory).search(text="a red square", filters={"color": "red"})
        assert [h.metadata["color"] for h in hits] == ["red"]
    assert not any(f.name.startswith("abab") for f in blob_files(closed_memory))


def test_a_writer_recounts_a_wrong_kept_count(
    closed_memory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    con = sqlite3.connect(closed_memory / DATABASE)
    con.execute("UPDATE meta SET value = '3' WHERE key = 'count'")
    con.commit()
    con.close()
    with Memory.open(closed_memory, "a") as memory:
        assert len(memory) == 6
        ingest(memory, [Document.of(text="one more")], progress=False)
        assert len(memory) == 7
    assert "recounted" in caplog.text


def test_index_holding_other_vectors_is_rebuilt(closed_memory: Path) -> None:
    """An index file that passes its checksum but holds a vector the store lacks (written by
    a buggy tool, say) is found by comparing ids."""
    with Memory.open(closed_memory, "a") as memory:
        index = memory.index_snapshot()
        index.add([999], memory.vectors([1]))
        memory._dirty = True
    report = check_memory(closed_memory)
    assert [f.check for f in report.findings] == ["index"]
    assert "7 vectors for 6 documents (1 unknown to the store" in report.findings[0].message
    assert check_memory(closed_memory, repair=True).ok and check_memory(closed_memory).ok
