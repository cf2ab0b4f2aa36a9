"""The CLI contract: command names, options and JSON shapes that users and scripts rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import COLORS, png_bytes
from mmrag.cli.main import main
from mmrag.cli.memory import parse_filters


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "pics"
    folder.mkdir()
    for name, rgb in COLORS.items():
        (folder / f"{name}.png").write_bytes(png_bytes(rgb))
        (folder / f"{name}.txt").write_text(f"a {name} square\n", encoding="utf-8")
    return folder


@pytest.fixture
def memory(tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "mem"
    assert main(["ingest", str(path), str(source), "--encoder", "hashing", "--no-progress"]) == 0
    capsys.readouterr()
    return path


def test_parse_filters() -> None:
    assert parse_filters(["color=red"]) == {"color": "red"}
    assert parse_filters(["color=red", "color=blue", "n=3"]) == {"color": ["red", "blue"], "n": 3}
    assert parse_filters(["label=[1, 2]", "ok=true"]) == {"label": [1, 2], "ok": True}
    assert parse_filters(["name=flag: Japan"]) == {"name": "flag: Japan"}


def test_ingest_reports_and_is_idempotent(
    memory: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ingest", str(memory), str(source), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["added"] == 0
        and report["existing"] == len(COLORS)
        and report["count"] == len(COLORS)
    )


def test_search_text_image_mixed_and_filters(
    memory: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["search", str(memory), "--text", "a green square", "-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == 2
    first = out["results"][0]
    assert set(first) == {"id", "score", "text", "image", "metadata"}
    assert first["text"] == "a green square" and Path(first["image"]).exists()
    assert first["metadata"]["source_path"] == "green.png"
    assert (
        main(["search", str(memory), "--image", str(source / "blue.png"), "-k", "1", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["results"][0]["text"] == "a blue square"
    assert (
        main(
            [
                "search",
                str(memory),
                "--image",
                str(source / "red.png"),
                "--text",
                "a red square",
                "-k",
                "1",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["results"][0]["score"] == pytest.approx(
        1.0, abs=1e-4
    )
    assert (
        main(
            [
                "search",
                str(memory),
                "--text",
                "square",
                "--filter",
                "source_path=black.png",
                "--filter",
                "source_path=white.png",
                "--json",
            ]
        )
        == 0
    )
    texts = {r["text"] for r in json.loads(capsys.readouterr().out)["results"]}
    assert texts == {"a black square", "a white square"}
    assert main(["search", str(memory), "--text", "a red square"]) == 0
    assert "a red square" in capsys.readouterr().out


def test_search_many_queries_as_json_lines(
    memory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queries = tmp_path / "q.txt"
    queries.write_text("a red square\n\na yellow square\n", encoding="utf-8")
    assert main(["search", str(memory), "--queries", str(queries), "-k", "3", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["query"] for x in lines] == ["a red square", "a yellow square"]
    assert all(len(x["results"]) == 3 for x in lines)
    assert lines[1]["results"][0]["text"] == "a yellow square"


def test_delete_and_info(memory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["search", str(memory), "--text", "a red square", "-k", "1", "--json"])
    red = json.loads(capsys.readouterr().out)["results"][0]["id"]
    assert main(["delete", str(memory), red]) == 0
    capsys.readouterr()
    assert main(["info", str(memory), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == len(COLORS) - 1 and info["encoder"]["name"] == "hashing"
    assert main(["delete", str(memory), red]) == 1  # already gone: reported, not silent
    assert "deleted 0 of 1" in capsys.readouterr().out
    main(["search", str(memory), "--text", "a red square", "-k", "10", "--json"])
    assert red not in {r["id"] for r in json.loads(capsys.readouterr().out)["results"]}


def test_errors_are_one_clear_line(
    tmp_path: Path, memory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["search", str(tmp_path / "nope"), "--text", "x"]) == 1
    assert "not an mmrag memory" in capsys.readouterr().err
    assert main(["search", str(memory)]) == 1
    assert "give --text, --image" in capsys.readouterr().err
    assert main(["search", str(memory), "--text", "x", "--filter", "novalue"]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["search", str(memory), "--image", str(tmp_path / "missing.png")]) == 1
    assert "missing.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("data", "ingest", "search", "delete", "info", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: mmrag " + command in capsys.readouterr().out


def test_ingest_table_with_custom_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes((200, 0, 0)))
    (tmp_path / "t.csv").write_text(
        "picture,label,shop\na.png,a red thing,north\n", encoding="utf-8"
    )
    mem = tmp_path / "mem"
    args = [
        "ingest",
        str(mem),
        str(tmp_path / "t.csv"),
        "--encoder",
        "hashing",
        "--json",
        "--image-column",
        "picture",
        "--text-column",
        "label",
        "--no-progress",
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 1
    assert main(["search", str(mem), "--text", "a red thing", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["text"] == "a red thing" and result["metadata"]["shop"] == "north"
    assert result["image"] is not None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "ra-cm3", "--help"], ["usage: mmrag train ra-cm3", "--tokens-per-step INT"]),
        (["train", "encoder", "--help"], ["usage: mmrag train encoder", "--holdout F"]),
        (["eval", "vq", "--help"], ["usage: mmrag eval vq", "--holdout HOLDOUT"]),
        (["train", "--help"], ["encoder", "vq", "ra-cm3", "fromage", "gill"]),
        (["generate", "caption", "--help"], ["usage: mmrag generate caption", "--image"]),
        (["chat", "--help"], ["usage: mmrag chat", "--message"]),
    ],
)
def test_every_subcommand_lists_its_options(
    argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(text in out for text in expected), out


def test_delegated_options_are_checked_by_the_subcommand(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "vq", "--steps", "many"])
    assert info.value.code == 2
    assert "mmrag train vq: error: argument --steps: invalid int value" in capsys.readouterr().err


@pytest.mark.pretrained
def test_ingest_reencode_switches_the_encoder_in_place(
    memory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A memory built with one encoder is re-encoded with another, keeping every document;
    searching it then uses the new encoder (the manifest names it)."""
    main(["info", str(memory), "--json"])
    before = json.loads(capsys.readouterr().out)
    assert main(["ingest", str(memory), "--reencode", "--encoder", "lite", "--no-progress"]) == 0
    assert "re-encoded" in capsys.readouterr().out
    assert main(["info", str(memory), "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["count"] == before["count"]
    assert (after["encoder"]["name"], after["encoder"]["dim"]) == ("lite", 384)
    assert main(["search", str(memory), "--text", "a red square", "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]
    assert main(["ingest", str(memory), "--reencode", "--no-progress"]) == 0
    assert "already uses this encoder" in capsys.readouterr().out
    assert main(["ingest", str(memory)]) == 1  # nothing to ingest and no --reencode
