"""The README is a quick start: short, and its Python example runs as written."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mmrag
from conftest import COLORS, png_bytes

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_is_short() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_the_examples_use_only_the_public_api() -> None:
    blocks = _python_blocks()
    assert len(blocks) >= 2
    used: set[str] = set()
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "mmrag":
                used.add(node.attr)
            assert not isinstance(node, ast.ImportFrom), "examples import mmrag, nothing deeper"
    assert used <= set(mmrag.__all__), used - set(mmrag.__all__)
    assert {"ensure_memory", "ingest", "Retriever", "RACM3", "load_chat"} <= used


@pytest.mark.slow
@pytest.mark.pretrained
def test_the_python_quick_start_runs(tmp_path: Path) -> None:
    data = tmp_path / "data" / "emoji"
    (data / "images").mkdir(parents=True)
    lines = []
    for name, rgb in COLORS.items():
        (data / "images" / f"{name}.png").write_bytes(png_bytes(rgb, size=32))
        parts = [{"image": f"images/{name}.png"}, {"text": f"a {name} square"}]
        lines.append(json.dumps({"parts": parts, "metadata": {"dataset": "emoji"}}))
    (data / "documents.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-c", _python_blocks()[0]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.splitlines()[0] == f"{len(COLORS)} []"
    assert (tmp_path / "apple.png").is_file()
