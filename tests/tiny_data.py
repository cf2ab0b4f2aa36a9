"""Tiny caption-image data sets the training tests share (written to a folder as
`images/*.png` + `documents.jsonl`)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from conftest import COLORS, png_bytes

# The encoder heads' set: 12 colours in 2 shades.
ENCODER_COLOURS = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (130, 40, 160),
    "orange": (250, 140, 10),
    "pink": (250, 150, 200),
    "brown": (120, 70, 20),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
    "grey": (128, 128, 128),
    "cyan": (20, 220, 230),
}
ENCODER_SHADES = {"light": 1.35, "dark": 0.55}


def write_encoder_pairs(folder: Path) -> Path:
    """24 documents (12 colours x 2 shades, in 12 groups), one bad line, one text-only."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, (name, rgb) in enumerate(ENCODER_COLOURS.items()):
        for j, (shade, factor) in enumerate(ENCODER_SHADES.items()):
            pixel = tuple(min(255, round(c * factor)) for c in rgb)
            file = f"images/{shade}-{name}.png"
            Image.new("RGB", (48, 48), pixel).save(folder / file)
            # A group pairs light colour i with dark colour i+1, so a held-out colour was
            # seen in training in its other shade: retrieval can generalise to it.
            meta = {"base": f"g{(i + j) % len(ENCODER_COLOURS)}"}
            parts = [{"image": file}, {"text": f"a {shade} {name} square"}]
            lines.append(json.dumps({"parts": parts, "metadata": meta}))
    lines.insert(3, "{not json")
    lines.append(json.dumps({"text": "a caption without an image"}))
    (folder / "documents.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


FROMAGE_SHAPES = ("square", "stripe", "dot")


def write_fromage_pairs(root: Path) -> Path:
    """18 caption-image documents in 6 colour groups (3 variants each)."""
    (root / "images").mkdir(parents=True)
    lines = []
    for c, (name, rgb) in enumerate(COLORS.items()):
        for s, shape in enumerate(FROMAGE_SHAPES):
            file = f"images/{name}-{shape}.png"
            (root / file).write_bytes(png_bytes(rgb, size=32, pattern=3 + 7 * s + c))
            doc = {"parts": [{"image": file}, {"text": f"a {name} {shape}"}]}
            lines.append(json.dumps(doc | {"metadata": {"base": name}}))
    (root / "documents.jsonl").write_text("\n".join(lines) + "\n")
    return root


VQ_COLOURS = [(220, 20, 20), (20, 160, 40), (30, 60, 220), (240, 200, 20), (130, 40, 160)]


def write_vq_images(folder: Path) -> Path:
    """10 documents: 5 colour groups x 2 shapes (disc, square) on white, plus a bad line."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, rgb in enumerate(VQ_COLOURS):
        for shape in ("disc", "square"):
            img = Image.new("RGB", (32, 32), (255, 255, 255))
            draw = ImageDraw.Draw(img)
            box = (6, 6, 26, 26)
            (draw.ellipse if shape == "disc" else draw.rectangle)(box, fill=rgb)
            file = f"images/{i}-{shape}.png"
            img.save(folder / file)
            parts = [{"image": file}, {"text": f"a {shape} of colour {i}"}]
            lines.append(json.dumps({"parts": parts, "metadata": {"base": f"c{i}"}}))
    lines.insert(2, "{broken")
    (folder / "documents.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_families(root: Path, families: int = 40) -> Path:
    """`families` families of two captioned variants each (`base` = "thing N")."""
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(families):
        for variant in ("red", "blue"):
            file = f"images/{i}-{variant}.png"
            (root / file).write_bytes(png_bytes((20 * (i % 12), 40, 200), 32, i + 1))
            parts = [{"image": file}, {"text": f"{variant} thing {i}"}]
            lines.append(json.dumps({"parts": parts, "metadata": {"base": f"thing {i}"}}))
    (root / "documents.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
