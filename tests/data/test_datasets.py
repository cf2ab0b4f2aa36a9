"""Offline data set builders: emoji, photos, fashion-mnist; the registry; determinism."""

from __future__ import annotations

import collections
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrag.data import emoji as emoji_data
from mmrag.data import fashion_mnist
from mmrag.data.datasets import DATASETS, DatasetError, build_dataset
from mmrag.data.readers import read_source
from mmrag.documents import Document

needs_font = pytest.mark.skipif(
    not emoji_data.FONT_PATH.is_file(), reason="apt-get install fonts-noto-color-emoji"
)
needs_fashion = pytest.mark.skipif(
    not (fashion_mnist.DATA_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist",
)


def read_lines(out: Path) -> list[dict]:
    with (out / "documents.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_registry_and_unknown_name(tmp_path: Path) -> None:
    assert set(DATASETS) == {
        "emoji",
        "twemoji",
        "openmoji",
        "openclipart",
        "gcompris",
        "photos",
        "fashion-mnist",
    }
    with pytest.raises(DatasetError, match="unknown data set 'mnist'"):
        build_dataset("mnist", tmp_path)


# --- emoji names (no rendering) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("sequence", "name", "skin_tone"),
    [
        ("💃🏽", "woman dancing: medium skin tone", "medium skin tone"),
        ("🇯🇵", "flag: Japan", None),
        ("👨🏿‍💻", "man technologist: dark skin tone", "dark skin tone"),
        (
            "🧑🏼‍🤝‍🧑🏿",
            "people holding hands: medium-light skin tone, dark skin tone",
            "medium-light skin tone, dark skin tone",
        ),
        ("👩🏽‍🦰", "woman: medium skin tone, red hair", "medium skin tone"),
        ("👩‍❤️‍💋‍👨", "kiss: woman, man", None),
        ("#️⃣", "keycap: #", None),
        ("🏴󠁧󠁢󠁳󠁣󠁴󠁿", "flag: Scotland", None),
        ("💋", "kiss mark", None),
    ],
)
def test_emoji_names(sequence: str, name: str, skin_tone: str | None) -> None:
    meta = emoji_data.describe_emoji(sequence)
    assert meta["name"] == name
    assert meta["skin_tone"] == skin_tone
    assert meta["emoji"] == sequence
    assert meta["dataset"] == "emoji"


def test_emoji_bases_join_skin_tones_and_genders() -> None:
    def base(s: str) -> str:
        return str(emoji_data.describe_emoji(s)["base"])

    assert base("💃🏽") == base("💃") == "💃"
    assert base("👨🏿‍💻") == base("👩‍💻") == base("🧑‍💻") == "🧑\u200d💻"
    assert base("🕵️‍♀️") == base("🕵🏻‍♂️") == "🕵"
    assert base("🏃🏽‍♂️‍➡️") == base("🏃‍➡️")  # gender sign in the middle of the sequence
    assert base("👨") == base("👩🏾") == "🧑"
    assert base("👩🏻‍❤️‍💋‍👨🏿") == base("💏") == "💏"
    meta = emoji_data.describe_emoji("👩🏽‍🦰")
    assert meta["base_name"] == "person: red hair"
    assert emoji_data.describe_emoji("💃🏽")["base_name"] == "woman dancing"
    assert emoji_data.file_stem("💃🏽") == "1f483-1f3fd"


# --- emoji rendering -------------------------------------------------------------------------


@needs_font
def test_emoji_build_limit_and_determinism(tmp_path: Path) -> None:
    first = build_dataset("emoji", tmp_path / "a", limit=20, progress=False)
    second = build_dataset("emoji", tmp_path / "b", limit=20, progress=False)
    assert first.count == second.count == 20
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")

    lines = read_lines(tmp_path / "a")
    assert len(lines) == 20
    keys = {"emoji", "name", "base", "base_name", "skin_tone", "dataset"}
    assert all(set(line["metadata"]) == keys for line in lines)
    first_line = lines[0]
    assert first_line["metadata"]["emoji"] == "#️⃣"
    assert first_line["parts"] == [{"image": "images/23-fe0f-20e3.png"}, {"text": "keycap: #"}]
    with Image.open(tmp_path / "a" / "images" / "23-fe0f-20e3.png") as img:
        assert (img.size, img.mode) == ((128, 128), "RGB")
        assert img.getpixel((0, 0)) == (255, 255, 255)  # white margin

    docs = list(read_source(tmp_path / "a"))  # the folder reads back through its JSONL
    assert all(isinstance(d, Document) for d in docs)
    assert len(docs) == 20

    smaller = build_dataset("emoji", tmp_path / "a", limit=5, progress=False)
    assert smaller.count == 5
    assert len(list((tmp_path / "a" / "images").glob("*.png"))) == 5


@needs_font
def test_emoji_render_skips_empty_and_unsupported() -> None:
    image = emoji_data.render("💃🏽")
    assert image is not None
    assert image.size == (128, 128)
    assert len(image.getcolors(maxcolors=128 * 128) or []) > 50  # a real glyph, not blank
    assert emoji_data.is_single_glyph("👨🏿‍💻")
    # Newer than the font: drawn as two men and a rabbit, so it is skipped.
    assert not emoji_data.is_single_glyph("👨🏻‍🐰‍👨🏿")


@pytest.fixture
def missing_font(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    emoji_data._font.cache_clear()
    monkeypatch.setattr(emoji_data, "FONT_PATH", tmp_path / "none.ttf")
    yield
    emoji_data._font.cache_clear()


@pytest.mark.usefixtures("missing_font")
def test_emoji_without_font_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="apt-get install fonts-noto-color-emoji"):
        build_dataset("emoji", tmp_path / "out", limit=1, progress=False)


# --- photos ----------------------------------------------------------------------------------


def test_photos(tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    summary = build_dataset("photos", tmp_path, progress=False)
    lines = read_lines(tmp_path)
    assert summary.count == len(lines) > 5
    names = [line["metadata"]["name"] for line in lines]
    assert names == sorted(names)
    assert "astronaut" in names
    assert "camera" in names
    assert "china" in names  # scikit-learn's sample photographs too
    for line in lines:
        image_part, text_part = line["parts"]
        assert len(text_part["text"]) > 20
        assert line["metadata"]["dataset"] == "photos"
        with Image.open(tmp_path / image_part["image"]) as img:
            assert img.mode == "RGB"
            assert max(img.size) == 256


# --- fashion-mnist ---------------------------------------------------------------------------


@needs_fashion
def test_fashion_mnist_balanced(tmp_path: Path) -> None:
    summary = build_dataset("fashion-mnist", tmp_path, limit=50, progress=False)
    lines = read_lines(tmp_path)
    assert summary.count == len(lines) == 50
    classes = collections.Counter(line["metadata"]["class"] for line in lines)
    assert set(classes.values()) == {5}
    assert len(classes) == 10
    pullover = next(line for line in lines if line["metadata"]["label"] == 2)
    assert pullover["parts"][1] == {"text": "a grayscale photo of a pullover"}
    meta = pullover["metadata"]
    assert meta["class"] == "Pullover"
    assert meta["split"] == "train"
    assert pullover["parts"][0]["image"] == f"images/train-{meta['index']:05d}.png"
    images, labels = fashion_mnist.load_split("train")
    assert labels[meta["index"]] == 2
    with Image.open(tmp_path / pullover["parts"][0]["image"]) as img:
        assert (img.size, img.mode) == ((28, 28), "L")
        assert np.array_equal(np.asarray(img), images[meta["index"]])


def test_idx_parser_and_balanced_order(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">u4").tobytes()
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + data.tobytes()))
    assert np.array_equal(fashion_mnist.read_idx(path), data)
    path.write_bytes(gzip.compress(header + data.tobytes()[:-1]))
    with pytest.raises(DatasetError, match="header says 24"):
        fashion_mnist.read_idx(path)
    order = fashion_mnist.balanced_order(np.array([1, 1, 0, 2, 0, 1]))
    assert order.tolist() == [2, 0, 3, 4, 1, 5]


def test_fashion_mnist_missing_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.build_fashion_mnist(tmp_path / "out", limit=1, data_dir=tmp_path)
