"""Deterministic synthetic documents for the server benchmark: captioned shapes (32x32 PNG,
all distinct) and some text-only documents, and the cached memory built from them."""

from __future__ import annotations

import io
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mmrag.documents import Document
from mmrag.encoders.base import EncoderSpec
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import Memory, ensure_memory

log = logging.getLogger("server_data")

PALETTE = (  # name:RRGGBB
    "red:dc1e1e orange:f08c14 yellow:ebdc28 green:28aa3c teal:149696 blue:1e3cdc "
    "purple:8232b4 pink:f078b4 brown:785028 black:0f0f0f white:f5f5f5 grey:808080"
)
COLORS = {name: tuple(bytes.fromhex(rgb)) for name, rgb in (c.split(":") for c in PALETTE.split())}
SHAPES = ("circle", "square", "triangle", "bar", "ring", "cross")
SIZES = ("tiny", "small", "large", "huge")
SCENES = ("on a table", "in the sky", "under water", "on snow", "in a field", "on a wall")


def caption(i: int) -> str:
    color = list(COLORS)[i % len(COLORS)]
    shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
    size = SIZES[(i // 7) % len(SIZES)]
    scene = SCENES[(i // 11) % len(SCENES)]
    return f"a {size} {color} {shape} {scene}, number {i}"


def picture(i: int, side: int = 32) -> bytes:
    """A small PNG: a coloured shape on a background that varies with i (all distinct)."""
    color = list(COLORS.values())[i % len(COLORS)]
    shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
    background = ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
    img = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(img)
    box = (4 + i % 5, 4 + (i // 5) % 5, side - 4, side - 4)
    {
        "circle": lambda: draw.ellipse(box, fill=color),
        "square": lambda: draw.rectangle(box, fill=color),
        "triangle": lambda: draw.polygon(
            [(box[0], box[3]), (box[2], box[3]), (side // 2, box[1])], fill=color
        ),
        "bar": lambda: draw.rectangle((box[0], side // 2 - 3, box[2], side // 2 + 3), fill=color),
        "ring": lambda: draw.ellipse(box, outline=color, width=3),
        "cross": lambda: draw.line((box[0], box[1], box[2], box[3]), fill=color, width=4),
    }[shape]()
    img.putpixel((i % side, (i // side) % side), (i % 251, 7, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def documents(n: int, start: int = 0) -> Iterator[Document]:
    """Mostly captioned images; every tenth document is text only."""
    for i in range(start, start + n):
        image = None if i % 10 == 9 else picture(i)
        meta = {"color": list(COLORS)[i % len(COLORS)], "shape": SHAPES[(i // 12) % 6], "n": i}
        yield Document.of(text=caption(i), image=image, metadata=meta)


def build_memory(path: Path, n: int, spec: EncoderSpec) -> dict[str, Any]:
    """The cached memory of n documents (rebuilt if its size or encoder differ)."""
    if path.exists():
        try:
            with Memory.open(path) as memory:
                if len(memory) == n and memory.manifest.encoder.name == spec.name:
                    return {"built": False, "count": n}
        except Exception as e:  # a broken cache is rebuilt
            log.warning("rebuilding %s: %s", path, e)
        shutil.rmtree(path)
    start = time.perf_counter()
    with ensure_memory(path, spec) as memory:
        report = ingest(memory, documents(n), batch_size=256, progress=False)
        count = len(memory)
    return {
        "built": True,
        "count": count,
        "ingest_s": round(time.perf_counter() - start, 1),
        "errors": len(report.errors),
    }
