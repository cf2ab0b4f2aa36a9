"""`ServerConfig`: defaults that depend on the machine, and their bounds."""

from __future__ import annotations

import pytest

from mmrag.config import ConfigError
from mmrag.server import config as server_config
from mmrag.server.config import ServerConfig


def test_worker_threads_default_to_two_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_config, "available_cores", lambda: 2)
    assert ServerConfig().threads_to_run() == 4
    monkeypatch.setattr(server_config, "available_cores", lambda: 48)
    assert ServerConfig().threads_to_run() == 64
    assert ServerConfig(worker_threads=8).threads_to_run() == 8
    with pytest.raises(ConfigError, match="worker_threads"):
        ServerConfig(worker_threads=-1)


def test_encoder_workers_default_to_one_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmrag.encoders import batching

    monkeypatch.setattr(batching, "available_cores", lambda: 2)
    assert ServerConfig().batching().workers_to_run() == 2
    assert ServerConfig(encode_workers=1).batching().workers_to_run() == 1
