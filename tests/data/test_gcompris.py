"""The GCompris builder on small resource archives written here in Qt's binary format."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from mmrag.data.gcompris import (
    ResourceError,
    build_gcompris,
    caption_for,
    read_rcc,
    readable_name,
)
from mmrag.data.writer import DatasetError


def write_rcc(path: Path, files: dict[str, bytes], compress: frozenset[str] = frozenset()) -> None:
    """A version-3 archive as `rcc --binary` lays it out: directories' children contiguous,
    22-byte nodes, names as u16 length + u32 hash + UTF-16BE, data as u32 size + bytes."""
    tree: dict = {}
    for name in files:
        node = tree
        parts = name.strip("/").split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = name
    names, data = bytearray(), bytearray()
    name_offsets: dict[str, int] = {}

    def name_offset(name: str) -> int:
        if name not in name_offsets:
            name_offsets[name] = len(names)
            encoded = name.encode("utf-16-be")
            names.extend(struct.pack(">HI", len(name), 0) + encoded)
        return name_offsets[name]

    nodes: list[bytes] = [b""]  # the root is node 0
    queue: list[tuple[int, str, object]] = [(0, "", tree)]
    while queue:
        index, name, item = queue.pop(0)
        if isinstance(item, dict):
            first = len(nodes)
            children = sorted(item.items())
            nodes.extend(b"" for _ in children)
            nodes[index] = struct.pack(
                ">IHIIQ", name_offset(name) if index else 0, 0x02, len(children), first, 0
            )
            for offset, (child, value) in enumerate(children):
                queue.append((first + offset, child, value))
        else:
            raw = files[str(item)]
            flags = 0
            if item in compress:
                raw, flags = struct.pack(">I", len(raw)) + zlib.compress(raw), 0x01
            nodes[index] = struct.pack(">IHHHIQ", name_offset(name), flags, 0, 0, len(data), 0)
            data.extend(struct.pack(">I", len(raw)) + raw)
    header = 24
    tree_at = header
    data_at = tree_at + 22 * len(nodes)
    names_at = data_at + len(data)
    path.write_bytes(
        b"qres"
        + struct.pack(">IIIII", 3, tree_at, data_at, names_at, 0)
        + b"".join(nodes)
        + bytes(data)
        + bytes(names)
    )


def picture(color: str, size: tuple[int, int] = (80, 90), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, format=fmt)
    return buf.getvalue()


def test_read_rcc_walks_the_tree_and_inflates(tmp_path: Path) -> None:
    archive = tmp_path / "a.rcc"
    files = {"/x/a.txt": b"plain", "/x/y/b.bin": b"squeezed" * 10}
    write_rcc(archive, files, compress=frozenset(["/x/y/b.bin"]))
    found = {str(r.path): r.data for r in read_rcc(archive)}
    assert found == files


def test_read_rcc_refuses_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.rcc"
    bad.write_bytes(b"PK\x03\x04 not a resource archive")
    with pytest.raises(ResourceError, match="qres"):
        list(read_rcc(bad))
    cut = tmp_path / "cut.rcc"
    write_rcc(cut, {"/a/b.png": b"x" * 100})
    cut.write_bytes(cut.read_bytes()[:40])
    with pytest.raises(ResourceError, match="damaged"):
        list(read_rcc(cut))


@pytest.mark.parametrize(
    ("stem", "name"),
    [
        ("measuringTape3", "measuring tape"),
        ("northern_harrier", "northern harrier"),
        ("hammer1", "hammer"),
        ("polar_bear", "polar bear"),
    ],
)
def test_readable_name(stem: str, name: str) -> None:
    assert readable_name(stem) == name


def test_captions_skip_abstract_words_and_use_folder_names() -> None:
    assert caption_for("lang", "words_sample", "blue") is None
    assert caption_for("lang", "words_sample", "seven") is None
    assert caption_for("lang", "words_sample", "giraffe") == "giraffe"
    assert caption_for("categorization", "fishes", "fish12") == "fish"
    assert caption_for("categorization", "renewable", "solar3") == "solar panels"


def test_build_gcompris(tmp_path: Path) -> None:
    root = tmp_path / "rcc"
    root.mkdir()
    base = "/gcompris/src/activities"
    write_rcc(
        root / "categorization.rcc",
        {
            f"{base}/categorization/resource/images/tools/hammer1.webp": picture("red", fmt="WEBP"),
            f"{base}/categorization/resource/images/tools/hammer2.png": picture("blue"),
            f"{base}/categorization/resource/images/tools/tiny.png": picture("blue", (8, 8)),
            f"{base}/categorization/resource/images/tools/broken.png": b"not a picture",
            f"{base}/categorization/resource/images/paintings/mona.png": picture("green"),
            f"{base}/categorization/resource/board/category_tools.qml": b"QtObject {}",
        },
        compress=frozenset([f"{base}/categorization/resource/images/tools/hammer2.png"]),
    )
    write_rcc(
        root / "lang.rcc",
        {
            f"{base}/lang/resource/words_sample/cat.webp": picture("gray", fmt="WEBP"),
            f"{base}/lang/resource/words_sample/blue.webp": picture("navy", fmt="WEBP"),
            f"{base}/lang/resource/words_sample/hammer.png": picture("blue"),  # a repeat
        },
    )
    (root / "erase.rcc").write_bytes(b"qres" + b"\x00" * 30)  # damaged: skipped, not fatal
    out = tmp_path / "out"
    summary = build_gcompris(out, progress=False, root=root)
    docs = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    captions = [d["parts"][1]["text"] for d in docs]
    assert captions == ["hammer", "hammer", "cat"]
    assert summary.count == 3
    meta = docs[2]["metadata"]
    assert meta["category"] == "cat" and meta["activity"] == "lang"
    assert meta["licence"].startswith("GPL-3.0")
    assert meta["file"].startswith("lang.rcc:/gcompris/")
    with Image.open(out / docs[0]["parts"][0]["image"]) as image:
        assert image.mode == "RGB" and max(image.size) <= 256
    # Deterministic: a second build writes the same bytes.
    first = (out / "documents.jsonl").read_bytes()
    build_gcompris(out, progress=False, root=root)
    assert (out / "documents.jsonl").read_bytes() == first
    assert len(list((out / "images").glob("*.png"))) == 3


def test_build_gcompris_without_the_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="apt-get install gcompris-qt-data"):
        build_gcompris(tmp_path / "out", progress=False, root=tmp_path / "absent")
