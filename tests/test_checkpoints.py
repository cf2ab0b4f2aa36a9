"""Locating shipped checkpoints: `$MMRAG_CHECKPOINTS` first, then the packaged ones (from a
source checkout and from an installed wheel)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmrag import checkpoints
from mmrag.checkpoints import CheckpointNotFoundError, checkpoint_dir


def _make(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}", encoding="utf-8")
    return folder


def test_env_var_roots_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second, repo = tmp_path / "a", tmp_path / "b", tmp_path / "repo"
    _make(second, "thing")
    expected_repo = _make(repo, "thing")
    monkeypatch.setattr(checkpoints, "PACKAGED_CHECKPOINTS", repo)
    monkeypatch.setenv("MMRAG_CHECKPOINTS", f"{first}{checkpoints.os.pathsep}{second}")
    assert checkpoint_dir("thing") == second / "thing"
    monkeypatch.delenv("MMRAG_CHECKPOINTS")
    assert checkpoint_dir("thing") == expected_repo


def test_a_folder_without_config_is_not_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "env" / "lite-encoder").mkdir(parents=True)
    monkeypatch.setattr(checkpoints, "PACKAGED_CHECKPOINTS", tmp_path / "repo")
    monkeypatch.setenv("MMRAG_CHECKPOINTS", str(tmp_path / "env"))
    with pytest.raises(CheckpointNotFoundError, match="mmrag train encoder") as info:
        checkpoint_dir("lite-encoder")
    assert str(tmp_path / "env" / "lite-encoder") in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_unknown_name_has_no_producer_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoints, "PACKAGED_CHECKPOINTS", tmp_path)
    monkeypatch.delenv("MMRAG_CHECKPOINTS", raising=False)
    with pytest.raises(CheckpointNotFoundError, match="'nope' not found") as info:
        checkpoint_dir("nope")
    assert "Produce it" not in str(info.value)


@pytest.mark.parametrize("bad", ["", "../x", "a/b"])
def test_names_are_plain_folder_names(bad: str) -> None:
    with pytest.raises(ValueError, match="plain folder name"):
        checkpoint_dir(bad)


def test_in_a_checkout_the_packaged_checkpoints_are_the_repository_folder() -> None:
    repo = Path(__file__).resolve().parents[1]
    assert checkpoints.PACKAGED_CHECKPOINTS.resolve() == repo / "checkpoints"
    assert checkpoint_dir("lite-encoder").resolve() == repo / "checkpoints" / "lite-encoder"


@pytest.mark.slow
@pytest.mark.pretrained
def test_an_installed_wheel_finds_its_checkpoints(tmp_path: Path) -> None:
    """`pip install .` (a wheel, not editable), then `mmrag ingest` and `mmrag search` from
    the installed copy: the shipped lite heads come from inside the installed package."""
    repo = Path(__file__).resolve().parents[1]
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", str(repo), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("mmrag-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    assert (site / "mmrag" / "_checkpoints" / "lite-encoder" / "model.safetensors").is_file()
    (tmp_path / "docs.jsonl").write_text(
        '{"text": "a red apple"}\n{"text": "a blue car"}\n', encoding="utf-8"
    )
    env = {k: v for k, v in os.environ.items() if k != "MMRAG_CHECKPOINTS"}
    env["PYTHONPATH"] = str(site)
    script = (
        "import sys, mmrag, mmrag.checkpoints as c; from mmrag.cli import main; "
        "print(mmrag.__file__); print(c.checkpoint_dir('lite-encoder')); "
        "main(['ingest', 'mem', 'docs.jsonl', '--no-progress']); "
        "sys.exit(main(['search', 'mem', '--text', 'an apple', '-k', '1']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith(str(site)), out
    assert out[1] == str(site / "mmrag" / "_checkpoints" / "lite-encoder"), out
    assert "a red apple" in out[-1], out


def test_the_shipped_checkpoints_stay_under_60_mb() -> None:
    root = Path(__file__).resolve().parents[1] / "checkpoints"
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert 0 < total < 60_000_000, f"checkpoints/ holds {total / 1e6:.2f} MB"
