"""`mmrag generate image|caption|infill-*` from the command line, on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import build_tiny_racm3, png_bytes
from mmrag.cli.main import main
from mmrag.memory.memory import Memory


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    build_tiny_racm3().save_pretrained(folder)
    return folder


@pytest.fixture
def memory(color_memory: Memory, memory_path: Path) -> Path:
    color_memory.close()
    return memory_path


def test_generate_image_json(
    model_dir: Path, memory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "drawn.png"
    argv = [
        "generate",
        "image",
        str(memory),
        "--caption",
        "a red square",
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--samples",
        "2",
        "--guidance",
        "2",
        "--json",
    ]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["output"] == str(out)
    with Image.open(out) as drawn:
        assert drawn.size == (16, 16)
    assert len(payload["evidence"]) == 2
    assert set(payload["evidence"][0]) == {"id", "score", "source"}
    assert main([*argv[:-1], "--no-retrieval", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["evidence"] == []
    pinned = payload["evidence"][1]["id"]
    assert main([*argv[:-1], "--demo", pinned, "--json"]) == 0
    assert [e["id"] for e in json.loads(capsys.readouterr().out)["evidence"]] == [pinned]

    def drawn_with(*flags: str) -> bytes:
        assert main([*argv[:-1], *flags]) == 0
        return out.read_bytes()

    copied = drawn_with("--copy-weight", "1", "--seed", "1")
    assert drawn_with("--copy-weight", "1", "--seed", "2") == copied  # every cell copied
    assert drawn_with("--copy-weight", "0", "--seed", "1") != copied


def test_generate_caption_and_infill(
    model_dir: Path, memory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "q.png"
    image.write_bytes(png_bytes((230, 20, 20)))
    common = [str(memory), "--image", str(image), "--model", str(model_dir), "--json"]
    assert main(["generate", "caption", *common]) == 0
    payload = json.loads(capsys.readouterr().out)
    # the image is stored: its caption is copied, even by a random model
    assert payload["output"] == "a red square" and payload["evidence"]
    assert payload["copied"] == payload["evidence"][0]["id"]
    free = ["--copy-weight", "0", "--no-compose"]
    assert main(["generate", "caption", *common, *free]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert "copied" not in payload and "ranked" not in payload
    assert main(["generate", "infill-caption", *common, "--caption", "a <mask> square"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == "a red square"
    assert main(["generate", "infill-caption", *common, "--caption", "a <mask>", *free]) == 0
    assert json.loads(capsys.readouterr().out)["output"].startswith("a ")
    out = tmp_path / "filled.png"
    assert main(["generate", "infill-image", *common, "--rows", "2:5", "--out", str(out)]) == 0
    with Image.open(out) as filled:
        assert filled.size == (16, 16)
