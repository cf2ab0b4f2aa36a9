"""Locating shipped checkpoints: `$MMRAG_CHECKPOINTS` first, then the repository folder."""

from __future__ import annotations

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
    monkeypatch.setattr(checkpoints, "REPO_CHECKPOINTS", repo)
    monkeypatch.setenv("MMRAG_CHECKPOINTS", f"{first}{checkpoints.os.pathsep}{second}")
    assert checkpoint_dir("thing") == second / "thing"
    monkeypatch.delenv("MMRAG_CHECKPOINTS")
    assert checkpoint_dir("thing") == expected_repo


def test_a_folder_without_config_is_not_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "env" / "lite-encoder").mkdir(parents=True)
    monkeypatch.setattr(checkpoints, "REPO_CHECKPOINTS", tmp_path / "repo")
    monkeypatch.setenv("MMRAG_CHECKPOINTS", str(tmp_path / "env"))
    with pytest.raises(CheckpointNotFoundError, match="mmrag train encoder") as info:
        checkpoint_dir("lite-encoder")
    assert str(tmp_path / "env" / "lite-encoder") in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_unknown_name_has_no_producer_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoints, "REPO_CHECKPOINTS", tmp_path)
    monkeypatch.delenv("MMRAG_CHECKPOINTS", raising=False)
    with pytest.raises(CheckpointNotFoundError, match="'nope' not found") as info:
        checkpoint_dir("nope")
    assert "Produce it" not in str(info.value)


@pytest.mark.parametrize("bad", ["", "../x", "a/b"])
def test_names_are_plain_folder_names(bad: str) -> None:
    with pytest.raises(ValueError, match="plain folder name"):
        checkpoint_dir(bad)


def test_repo_root_is_three_levels_above_the_module() -> None:
    assert (
        Path(checkpoints.__file__).resolve().parents[2] / "checkpoints"
        == checkpoints.REPO_CHECKPOINTS
    )
    assert (checkpoints.REPO_CHECKPOINTS.parent / "pyproject.toml").is_file()


def test_the_shipped_checkpoints_stay_under_60_mb() -> None:
    root = Path(__file__).resolve().parents[1] / "checkpoints"
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert 0 < total < 60_000_000, f"checkpoints/ holds {total / 1e6:.2f} MB"
