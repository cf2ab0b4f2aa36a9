"""Trainer flags come from the config dataclass: types, defaults and overrides."""

from __future__ import annotations

import argparse
import dataclasses
from typing import ClassVar

import pytest

from mmrag.config import Config
from mmrag.training.flags import add_config_flags, apply_flags, config_changes


@dataclasses.dataclass(frozen=True)
class Toy(Config):
    preset_prefix: ClassVar[str] = "toy"

    steps: int = 10
    lr: float = 0.5
    name: str = "a"
    init: str | None = None
    flag: bool = False


HELPS = {"steps": "steps in all", "lr": "rate, decayed to 10%", "name": "a name", "init": "x"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    add_config_flags(p, Toy(), HELPS, {"steps": "N"})
    return p


def test_flags_are_typed_from_the_dataclass() -> None:
    args = _parser().parse_args(["--steps", "3", "--lr", "0.25", "--init", "dir"])
    assert (args.steps, args.lr, args.name, args.init) == (3, 0.25, None, "dir")
    assert config_changes(args, HELPS) == {"steps": 3, "lr": 0.25, "init": "dir"}
    assert apply_flags(Toy(), args, HELPS) == Toy(steps=3, lr=0.25, init="dir")
    assert apply_flags(Toy(), _parser().parse_args([]), HELPS) == Toy()


def test_help_shows_defaults_metavars_and_percent_signs() -> None:
    text = _parser().format_help()
    assert "--steps N" in text
    assert "--lr FLOAT" in text
    assert "(default 10)" in text
    assert "10%" in text
    with pytest.raises(SystemExit):
        _parser().parse_args(["--steps", "x"])


def test_unknown_or_non_scalar_fields_are_refused() -> None:
    with pytest.raises(TypeError, match="no field 'nope'"):
        add_config_flags(argparse.ArgumentParser(), Toy(), {"nope": "?"})
    with pytest.raises(TypeError, match="int, float or str"):
        add_config_flags(argparse.ArgumentParser(), Toy(), {"flag": "?"})
