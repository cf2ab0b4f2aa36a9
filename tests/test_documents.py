from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import png_bytes
from mmrag.documents import (
    Document,
    DocumentError,
    Part,
    decode_image,
    document_from_json,
    document_to_json,
    iter_jsonl,
)


def test_id_hashes_content_not_metadata_or_source() -> None:
    a = Document.of(text="a cat", image=png_bytes((1, 2, 3)), metadata={"x": 1})
    b = Document.of(text="a cat", image=png_bytes((1, 2, 3)), metadata={"x": 2})
    c = Document.of(text="a cat", image=png_bytes((1, 2, 4)))
    assert a.id == b.id
    assert a.id != c.id
    assert len(a.id) == 32
    assert Document.of(text="a cat").id != Document.of(text="a dog").id


def test_part_order_matters_and_modality() -> None:
    img = Part.of_image(data=png_bytes((9, 9, 9)))
    text = Part.of_text("hello")
    assert Document(parts=(img, text)).id != Document(parts=(text, img)).id
    assert Document(parts=(img, text)).modality == "mixed"
    assert Document(parts=(text,)).modality == "text"
    assert Document(parts=(img,)).modality == "image"


def test_invalid_parts_and_metadata() -> None:
    with pytest.raises(DocumentError, match="at least one part"):
        Document(parts=())
    with pytest.raises(DocumentError, match="JSON"):
        Document(parts=(Part.of_text("x"),), metadata={"bad": object()})
    with pytest.raises(DocumentError, match="bytes or a path"):
        Part(kind="image")
    with pytest.raises(DocumentError, match="do not match"):
        Part(kind="image", data=b"abc", sha256="0" * 64)


def test_jsonl_round_trip_and_errors(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes((200, 10, 10)))
    lines = [
        json.dumps({"parts": [{"image": "images/a.png"}, {"text": "red"}], "metadata": {"k": 1}}),
        "{not json",
        json.dumps({"text": "caption only", "colour": "x"}),
        json.dumps({"image": "images/missing.png"}),
        json.dumps({"parts": [{"image": "../missing-too.png"}]}),
        "",
        json.dumps({"text": "short form", "image": "images/a.png"}),
        json.dumps({"parts": [{"video": "x.mp4"}]}),
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = list(iter_jsonl(path))
    assert len(items) == 7  # the blank line is skipped
    good = [i for i in items if isinstance(i, Document)]
    bad = [i for i in items if isinstance(i, DocumentError)]
    assert [d.text for d in good] == ["red", "short form"]
    assert good[0].metadata == {"k": 1}
    assert good[1].parts[0].kind == "image"  # short form: image first, then its caption
    assert [(e.line, e.field) for e in bad] == [
        (2, ""),
        (3, "colour"),
        (4, "parts[0].image"),
        (5, "parts[0].image"),
        (8, "parts[0]"),
    ]
    assert all(e.file == str(path) for e in bad)
    assert "malformed JSON" in str(bad[0]) and f"{path}:2" in str(bad[0])
    assert "cannot read image file" in str(bad[2])
    back = document_from_json(document_to_json(good[0]), Path("/"))
    assert back.id == good[0].id


def test_jsonl_invalid_utf8_line_is_reported_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\xff\xfe bad\n{"text": "after"}\n')
    items = list(iter_jsonl(path))
    assert isinstance(items[1], DocumentError) and items[1].line == 2
    assert [i.text for i in items if isinstance(i, Document)] == ["ok", "after"]


def test_decode_image_flattens_alpha_and_rejects_bad_bytes() -> None:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    data = png_bytes((10, 20, 30), size=64)
    with pytest.raises(DocumentError, match="unreadable image"):
        decode_image(data[: len(data) // 2], source="half.png")
    with pytest.raises(DocumentError, match="unreadable image"):
        decode_image(b"definitely not an image", source="x.png")
    with pytest.raises(DocumentError, match="pixel limit"):
        decode_image(data, max_pixels=100)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): a decompression bomb probe."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_pixel_limit_applies_before_pillows_bomb_warning() -> None:
    # 100 MP sits between Pillow's warning (89 MP) and error (179 MP) thresholds
    with pytest.raises(DocumentError, match="pixel limit"):
        decode_image(_png_header_only(10_000, 10_000), max_pixels=40_000_000)
    with pytest.raises(DocumentError, match="unreadable image"):
        decode_image(_png_header_only(50_000, 50_000), max_pixels=40_000_000)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Document.of(text="x", metadata={"score": float("nan")}), "finite JSON"),
        (lambda: Document.of(text="x", metadata={"score": float("inf")}), "finite JSON"),
        (lambda: Document.of(text="   \n"), "non-blank text or an image"),
        (lambda: Document.of(text="broken \ud800 text"), "not valid Unicode"),
    ],
)
def test_documents_that_would_poison_a_memory_are_refused(make: object, message: str) -> None:
    with pytest.raises(DocumentError, match=message):
        make()  # type: ignore[operator]


def test_one_bad_jsonl_line_never_stops_the_rest(tmp_path: Path) -> None:
    """NaN metadata, 5,000 levels of nesting, a lone surrogate and a blank text: each line is
    reported with its line number, and the good lines around them are read."""
    deep = '{"a": ' * 5000 + "1" + "}" * 5000
    lines = [
        json.dumps({"text": "first"}),
        '{"text": "nan", "metadata": {"x": NaN}}',
        '{"text": "deep", "metadata": ' + deep + "}",
        '{"text": "lone \\ud800 surrogate"}',
        '{"text": "   "}',
        json.dumps({"text": "last", "metadata": {"n": 1.5}}),
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = list(iter_jsonl(path))
    good = [i for i in items if isinstance(i, Document)]
    bad = [i for i in items if isinstance(i, DocumentError)]
    assert [d.text for d in good] == ["first", "last"]
    assert [e.line for e in bad] == [2, 3, 4, 5]
    assert all(str(path) in str(e) for e in bad)


def test_image_paths_must_be_regular_files(tmp_path: Path) -> None:
    """A device or a FIFO is refused at once (reading /dev/zero never ends; opening a FIFO
    waits for a writer); a symlink is followed only to a regular file."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    real = tmp_path / "red.png"
    real.write_bytes(png_bytes((200, 0, 0)))
    good_link, bad_link = tmp_path / "good.png", tmp_path / "bad.png"
    good_link.symlink_to(real)
    bad_link.symlink_to("/dev/zero")
    for path in (fifo, Path("/dev/zero"), bad_link, tmp_path):
        with pytest.raises(DocumentError, match="not a regular file"):
            Part.of_image(path=path)
    assert Part.of_image(path=good_link).sha256 == Part.of_image(path=real).sha256
    lines = [
        json.dumps({"text": "zero", "image": "/dev/zero"}),
        json.dumps({"text": "pipe", "image": str(fifo)}),
        json.dumps({"text": "fine", "image": str(good_link)}),
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = list(iter_jsonl(tmp_path / "docs.jsonl"))
    assert [i.line for i in items if isinstance(i, DocumentError)] == [1, 2]
    assert [d.text for d in items if isinstance(d, Document)] == ["fine"]


def test_reading_many_images_holds_no_memory_mapping_each(tmp_path: Path) -> None:
    """Each image read once asked for the size limit (256 MB): every bytes object became its
    own memory mapping, and 65k images exhausted the process's mappings (MemoryError)."""
    for i in range(2000):
        (tmp_path / f"{i}.png").write_bytes(png_bytes((i % 256, 0, 0), size=8))

    def mappings() -> int:
        return len(Path("/proc/self/maps").read_text().splitlines())

    before = mappings()
    parts = [Part.of_image(path=tmp_path / f"{i}.png") for i in range(2000)]
    assert mappings() - before < 200
    assert len({p.sha256 for p in parts}) == 256
