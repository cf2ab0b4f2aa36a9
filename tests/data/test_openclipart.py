"""The openclipart builder on a small fake tree shaped like Debian's openclipart-png."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmrag.data import openclipart
from mmrag.data.writer import DatasetError

AUTHORS = frozenset({"architetto", "nicu"})


@pytest.mark.parametrize(
    ("stem", "title"),
    [
        ("cigno_architetto_frances_01", "cigno"),  # author cut off
        ("bored_dog_01", "bored dog"),
        ("star_95pt06step", "star"),  # words holding digits go
        ("gnome-fs-trash-empty", "gnome fs trash empty"),
        ("redApple", "red apple"),  # camelCase split
        ("mouth_-_body_part_nicu_b_06", "mouth body part"),
        ("very_long_title_of_some_", "very long title of"),  # cut at 24: last word truncated
    ],
)
def test_clean_title(stem: str, title: str) -> None:
    assert openclipart.clean_title(stem, AUTHORS) == title


def _tree(root: Path) -> Path:
    files = {
        "animals/birds/cigno_architetto_frances_01.png": (255, 255, 255, 0),
        "animals/birds/aquila_architetto_franc_02.png": (90, 60, 20, 255),
        "animals/birds/owl_nicu_buculei_01.png": (90, 60, 20, 255),
        "food/fruit/apple_architetto_fra_01.png": (200, 20, 20, 255),
        "food/fruit/pear_nicu_buculei_01.png": (180, 200, 40, 255),
        "tools/hammer_nicu_buculei_01.png": (90, 90, 90, 255),
        "tools/saw_architetto_franc_01.png": (90, 90, 90, 128),
        "shapes/stars/star_01pt01step.png": (250, 220, 0, 255),
        "shapes/stars/star_02pt01step.png": (250, 220, 0, 255),
        "shapes/stars/star_03pt01step.png": (250, 220, 0, 255),
        "shapes/stars/star_04pt01step.png": (250, 220, 0, 255),
        "shapes/circle_nicu_buculei_01.png": (0, 0, 250, 255),
    }
    for rel, colour in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGBA", (600, 300), colour).save(path)
    (root / "food" / "broken.png").write_bytes(b"not a png")
    return root


def test_build_captions_groups_and_caps(tmp_path: Path) -> None:
    root = _tree(tmp_path / "png")
    authors = openclipart.author_words(sorted(root.rglob("*.png")), root)
    assert {"architetto", "nicu"} <= authors
    out = tmp_path / "out"
    summary = openclipart.build_openclipart(out, progress=False, root=root, per_folder=3)
    lines = [json.loads(x) for x in (out / "documents.jsonl").read_text().splitlines()]
    assert summary.count == len(lines) == 11  # 4 stars capped at 3, the broken file skipped
    by_file = {line["metadata"]["file"]: line for line in lines}
    cigno = by_file["animals/birds/cigno_architetto_frances_01.png"]
    assert cigno["parts"][1]["text"] == "cigno, clip art of birds"
    assert cigno["metadata"]["category"] == "animals/birds"
    assert by_file["tools/hammer_nicu_buculei_01.png"]["metadata"]["category"] == "tools"
    assert all(line["metadata"]["licence"].startswith("public domain") for line in lines)
    with Image.open(out / cigno["parts"][0]["image"]) as img:
        assert img.mode == "RGB" and img.size == (256, 128)  # long side 256
        assert img.getpixel((0, 0)) == (255, 255, 255)  # transparency flattened on white
    again = tmp_path / "again"
    openclipart.build_openclipart(again, progress=False, root=root, per_folder=3)
    assert (again / "documents.jsonl").read_bytes() == (out / "documents.jsonl").read_bytes()


def test_missing_package_names_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="apt-get install openclipart-png"):
        openclipart.build_openclipart(tmp_path / "out", root=tmp_path / "nowhere")
