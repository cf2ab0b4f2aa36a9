"""Shared fixtures: tiny images, documents, and memories built with the hashing encoder."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from mmrag.documents import Document
from mmrag.encoders.base import EncoderSpec
from mmrag.memory.memory import Memory, ensure_memory

COLORS = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (20, 40, 230),
    "yellow": (240, 230, 30),
    "black": (5, 5, 5),
    "white": (250, 250, 250),
}


def png_bytes(color: tuple[int, int, int], size: int = 16, pattern: int = 0) -> bytes:
    """A small PNG: a solid colour, optionally with a stripe so images of one colour differ."""
    img = Image.new("RGB", (size, size), color)
    if pattern:
        for x in range(size):
            img.putpixel((x, pattern % size), (128, 128, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def make_png() -> Callable[..., bytes]:
    return png_bytes


@pytest.fixture
def color_docs() -> list[Document]:
    """One caption + image document per colour, with metadata."""
    return [
        Document.of(text=f"a {name} square", image=png_bytes(rgb), metadata={"color": name, "i": i})
        for i, (name, rgb) in enumerate(COLORS.items())
    ]


@pytest.fixture
def memory_path(tmp_path: Path) -> Path:
    return tmp_path / "memory"


@pytest.fixture
def hashing_memory(memory_path: Path) -> Iterator[Memory]:
    memory = ensure_memory(memory_path, EncoderSpec(name="hashing"))
    yield memory
    memory.close()
