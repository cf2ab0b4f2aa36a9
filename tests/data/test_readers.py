"""Readers: folders with sidecars, JSONL, CSV / Parquet, WebDataset tar, unknown kinds."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mmrag.data import readers
from mmrag.data.readers import read_source, read_sources
from mmrag.documents import Document, DocumentError


def png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


RED, GREEN, BLUE = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))


def split(results: list[Document | DocumentError]) -> tuple[list[Document], list[DocumentError]]:
    docs = [r for r in results if isinstance(r, Document)]
    errors = [r for r in results if isinstance(r, DocumentError)]
    assert len(docs) + len(errors) == len(results)
    return docs, errors


# --- folder ----------------------------------------------------------------------------------


def test_folder_with_sidecars(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.png").write_bytes(RED)
    (tmp_path / "b.txt").write_text("  a red square \n", encoding="utf-8")
    (tmp_path / "b.json").write_text('{"colour": "red", "n": 1}', encoding="utf-8")
    (tmp_path / "a.jpg").write_bytes(GREEN)  # no caption: image-only document
    (tmp_path / "sub" / "c.PNG").write_bytes(BLUE)
    (tmp_path / "sub" / "c.txt").write_text("blue", encoding="utf-8")
    (tmp_path / "orphan.txt").write_text("no image beside me", encoding="utf-8")

    docs, errors = split(list(read_source(tmp_path)))

    assert errors == []
    assert [d.metadata["source_path"] for d in docs] == ["a.jpg", "b.png", "sub/c.PNG"]
    a, b, c = docs
    assert a.modality == "image"
    assert a.text == ""
    assert a.images[0].image_bytes() == GREEN
    assert b.modality == "mixed"
    assert b.text == "a red square"
    assert b.parts[0].kind == "image"
    assert b.parts[0].image_bytes() == RED
    assert dict(b.metadata) == {"colour": "red", "n": 1, "source_path": "b.png"}
    assert c.text == "blue"
    assert dict(c.metadata) == {"source_path": "sub/c.PNG"}


def test_folder_bad_json_sidecar_is_an_error_for_that_image_only(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(RED)
    (tmp_path / "a.json").write_text("[1, 2]", encoding="utf-8")
    (tmp_path / "b.png").write_bytes(GREEN)
    docs, errors = split(list(read_source(tmp_path)))
    assert [d.metadata["source_path"] for d in docs] == ["b.png"]
    (err,) = errors
    assert err.file == str(tmp_path / "a.json")
    assert err.field == "metadata"


def test_folder_with_documents_jsonl_reads_the_jsonl(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(RED)
    line = {"parts": [{"image": "images/x.png"}, {"text": "red"}], "metadata": {"k": 1}}
    (tmp_path / "documents.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    (doc,) = list(read_source(tmp_path))
    assert isinstance(doc, Document)
    assert doc.text == "red"
    assert dict(doc.metadata) == {"k": 1}


# --- JSONL -----------------------------------------------------------------------------------


def test_jsonl_good_and_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "r.png").write_bytes(RED)
    lines = [
        json.dumps({"image": "img/r.png", "text": "red", "metadata": {"i": 1}}),
        "{not json",
        json.dumps({"text": "hi", "colour": "red"}),
        json.dumps({"parts": [{"image": "img/missing.png"}, {"text": "gone"}]}),
        json.dumps({"text": "only text"}),
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    results = list(read_source(path))

    assert [type(r).__name__ for r in results] == [
        "Document",
        "DocumentError",
        "DocumentError",
        "DocumentError",
        "Document",
    ]
    good, malformed, unknown, missing, text_only = results
    assert isinstance(good, Document)
    assert good.text == "red"
    assert good.images[0].image_bytes() == RED
    assert isinstance(malformed, DocumentError)
    assert (malformed.file, malformed.line) == (str(path), 2)
    assert "malformed JSON" in str(malformed)
    assert isinstance(unknown, DocumentError)
    assert (unknown.line, unknown.field) == (3, "colour")
    assert isinstance(missing, DocumentError)
    assert (missing.file, missing.line, missing.field) == (str(path), 4, "parts[0].image")
    assert isinstance(text_only, Document)
    assert text_only.modality == "text"


# --- CSV and Parquet -------------------------------------------------------------------------


ROWS = [
    {"image": "imgs/r.png", "caption": "a red square", "split": "train"},
    {"image": "imgs/missing.png", "caption": "lost", "split": "train"},
    {"image": "", "caption": "just words", "split": "test"},
    {"image": "imgs/g.png", "caption": "", "split": "test"},
    {"image": "", "caption": "", "split": "test"},
]


def write_images(folder: Path) -> None:
    (folder / "imgs").mkdir()
    (folder / "imgs" / "r.png").write_bytes(RED)
    (folder / "imgs" / "g.png").write_bytes(GREEN)


def check_table_results(
    results: list[Document | DocumentError], path: Path, lines: list[int]
) -> None:
    ok_red, missing, text_only, image_only, empty = results
    assert isinstance(ok_red, Document)
    assert ok_red.text == "a red square"
    assert ok_red.images[0].image_bytes() == RED
    assert dict(ok_red.metadata) == {"split": "train"}  # caption fell back to "caption"
    assert isinstance(missing, DocumentError)
    assert (missing.file, missing.line, missing.field) == (str(path), lines[1], "image")
    assert "cannot read image file" in str(missing)
    assert isinstance(text_only, Document)
    assert text_only.modality == "text"
    assert isinstance(image_only, Document)
    assert image_only.modality == "image"
    assert image_only.images[0].image_bytes() == GREEN
    assert isinstance(empty, DocumentError)
    assert empty.line == lines[4]


def test_csv_rows(tmp_path: Path) -> None:
    write_images(tmp_path)
    path = tmp_path / "table.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "split"])
        writer.writeheader()
        writer.writerows(ROWS)
    results = list(read_source(path))
    check_table_results(results, path, lines=[2, 3, 4, 5, 6])  # header is line 1


def test_parquet_rows(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    write_images(tmp_path)
    path = tmp_path / "table.parquet"
    rows = [{**r, "image": r["image"] or None} for r in ROWS]  # nulls as well as ""
    pq.write_table(pa.Table.from_pylist(rows), path)
    results = list(read_source(path))
    check_table_results(results, path, lines=[1, 2, 3, 4, 5])  # row numbers


def test_table_custom_columns_and_missing_columns(tmp_path: Path) -> None:
    write_images(tmp_path)
    path = tmp_path / "t.csv"
    path.write_text(f"file,alt\n{tmp_path / 'imgs' / 'r.png'},red\n", encoding="utf-8")
    (doc,) = list(read_source(path, image_column="file", text_column="alt"))  # absolute path
    assert isinstance(doc, Document)
    assert doc.text == "red"
    assert dict(doc.metadata) == {}
    (err,) = list(read_source(path))
    assert isinstance(err, DocumentError)
    assert err.field == "image"
    assert "no 'image' or 'text' column" in str(err)
    with pytest.raises(TypeError, match="image_column"):
        read_source(tmp_path / "x.jsonl", image_column="file")


# --- WebDataset ------------------------------------------------------------------------------


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


SHARD = [
    ("s/000.png", RED),
    ("s/000.txt", b"a red square\n"),
    ("s/001.jpg", GREEN),
    ("s/001.caption", b"green"),
    ("s/001.json", b'{"colour": "green"}'),
    ("s/002.json", b'{"only": "metadata"}'),
    ("s/003.webp", BLUE),
]


def test_webdataset_tar(tmp_path: Path) -> None:
    path = tmp_path / "shard-0000.tar"
    make_tar(path, SHARD)
    first, second, no_parts, image_only = list(read_source(path))
    assert isinstance(first, Document)
    assert first.text == "a red square"
    assert first.images[0].image_bytes() == RED
    assert first.images[0].path == f"{path}#s/000.png"
    assert dict(first.metadata) == {"key": "s/000"}
    assert isinstance(second, Document)
    assert second.text == "green"
    assert dict(second.metadata) == {"colour": "green", "key": "s/001"}
    assert isinstance(no_parts, DocumentError)
    assert no_parts.file == f"{path}#s/002"
    assert isinstance(image_only, Document)
    assert image_only.modality == "image"


def test_truncated_tar_keeps_what_it_can(tmp_path: Path) -> None:
    whole = tmp_path / "whole.tar"
    make_tar(whole, SHARD)
    data = whole.read_bytes()
    # Cut inside the data of s/001.json: samples 000 and the members before are intact.
    cut = data.index(b'{"colour"') + 5
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:cut])
    results = list(read_source(path))
    docs, errors = split(results)
    assert [d.metadata["key"] for d in docs] == ["s/000"]
    (err,) = errors
    assert err.file == f"{path}#s/001.json"
    assert "truncated or corrupt tar" in str(err)
    assert results[-1] is err


def test_garbage_tar_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    path.write_bytes(b"this is not a tar file at all" * 40)
    (err,) = list(read_source(path))
    assert isinstance(err, DocumentError)
    assert err.file == str(path)


# --- dispatch --------------------------------------------------------------------------------


def test_unknown_kind_and_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "notes.docx"
    path.write_bytes(b"x")
    (err,) = list(read_source(path))
    assert isinstance(err, DocumentError)
    assert err.file == str(path)
    assert all(kind in str(err) for kind in (".jsonl", ".csv", ".parquet", ".tar", "folder"))
    (gone,) = list(read_source(tmp_path / "nowhere.jsonl"))
    assert isinstance(gone, DocumentError)
    assert "no such file" in str(gone)


def test_read_sources_chains(tmp_path: Path) -> None:
    a = tmp_path / "a.jsonl"
    a.write_text('{"text": "one"}\n', encoding="utf-8")
    b = tmp_path / "b.jsonl"
    b.write_text('{"text": "two"}\n{"text": "three"}\n', encoding="utf-8")
    texts = [r.text for r in read_sources([a, b]) if isinstance(r, Document)]
    assert texts == ["one", "two", "three"]


def test_tar_link_and_oversized_members_are_reported_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "MAX_IMAGE_BYTES", 64)
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("s/000.png", RED), ("s/000.txt", b"a red square")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("s/001.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        small = tarfile.TarInfo("s/002.txt")
        small.size = 5
        tar.addfile(small, io.BytesIO(b"small"))
    docs, errors = split(list(read_source(path)))
    assert len(RED) > 64  # the PNG member is over the (patched) limit: reported, not read
    assert sorted(e.file for e in errors) == [f"{path}#s/000.png", f"{path}#s/001.png"]
    assert any("link member" in str(e) for e in errors)
    assert any("over the 64-byte limit" in str(e) for e in errors)
    assert [d.text for d in docs] == ["a red square", "small"]
