from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mmrag.config import (
    ConfigError,
    EncoderTrainConfig,
    IndexConfig,
    LiteEncoderConfig,
    RetrieverConfig,
)
from mmrag.encoders.base import EncoderSpec


@pytest.mark.parametrize(
    "config",
    [
        IndexConfig(kind="hnsw"),
        RetrieverConfig(relevance_cap=0.9),
        LiteEncoderConfig(dim=32),
        EncoderTrainConfig(encoder=LiteEncoderConfig(dim=16), epochs=3),
        EncoderSpec(name="hashing"),
    ],
)
def test_json_round_trip(config: object, tmp_path: Path) -> None:
    cls = type(config)
    assert cls.from_json(config.to_json()) == config  # type: ignore[attr-defined]
    config.save(tmp_path / "c.json")  # type: ignore[attr-defined]
    assert cls.load(tmp_path / "c.json") == config  # type: ignore[attr-defined]


def test_unknown_keys_wrong_types_and_ranges_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        RetrieverConfig.from_dict({"k": 3, "kk": 4})
    with pytest.raises(ConfigError, match="expected an integer"):
        RetrieverConfig.from_dict({"k": "3"})
    with pytest.raises(ConfigError, match="k must be"):
        RetrieverConfig(k=0)
    with pytest.raises(ConfigError, match="not one of"):
        IndexConfig(kind="annoy")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mmr_lambda"):
        RetrieverConfig(mmr_lambda=1.5)
    with pytest.raises(ConfigError, match="unknown encoder"):
        EncoderSpec(name="clip-from-the-internet")
    with pytest.raises(ConfigError, match="invalid JSON"):
        IndexConfig.from_json("{")
    with pytest.raises(dataclasses.FrozenInstanceError):
        RetrieverConfig().k = 3  # type: ignore[misc]


def test_nested_configs_are_built_from_dicts() -> None:
    c = EncoderTrainConfig.from_dict({"encoder": {"dim": 8}, "lr": 1})
    assert c.encoder == LiteEncoderConfig(dim=8) and c.lr == 1.0


def test_presets() -> None:
    training = RetrieverConfig.preset("training")
    assert training.relevance_cap == 0.9 and training.query_dropout == 0.2  # RA-CM3 section 3.2
    assert RetrieverConfig.preset("default") == RetrieverConfig()
    assert RetrieverConfig.preset("tiny").k == 2
    with pytest.raises(ConfigError, match="no preset"):
        RetrieverConfig.preset("huge")
