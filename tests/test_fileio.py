from __future__ import annotations

import os
from pathlib import Path

from mmrag.fileio import FILE_MODE, atomic_write


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two", fsync=False)
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
    assert os.stat(target).st_mode & 0o777 == FILE_MODE  # not mkstemp's private 0600
