"""Content-addressed blobs: where a stored name lives."""

from __future__ import annotations

from pathlib import Path

from mmrag.memory.blobs import BlobStore


def test_location_is_the_resolved_path_as_a_string(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = b"\x89PNG\r\n\x1a\n" + b"rest"
    name = blobs.put("ab" + "c" * 62, data)
    assert blobs.location(name) == str(blobs.resolve(name))
    assert Path(blobs.location(name)).read_bytes() == data
