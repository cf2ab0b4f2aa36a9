"""`MemoryService`: the server's one open memory."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import HASHING
from mmrag.encoders.hashing import HashingEncoder
from mmrag.memory.memory import Memory, ensure_memory
from mmrag.server.service import MemoryService


def test_open_warms_the_encoder_up_on_its_worker(
    memory_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_memory(memory_path, HASHING).close()
    calls: list[tuple[str, str]] = []
    text, image = HashingEncoder.encode_text, HashingEncoder.encode_image

    def recorded(kind: str, real: Any) -> Any:
        def call(self: HashingEncoder, items: Any) -> Any:
            calls.append((kind, threading.current_thread().name))
            return real(self, items)

        return call

    monkeypatch.setattr(HashingEncoder, "encode_text", recorded("text", text))
    monkeypatch.setattr(HashingEncoder, "encode_image", recorded("image", image))
    service = MemoryService.open(memory_path, writable=False)
    try:  # before any request: one text and one image, on the batching encoder's worker
        assert [kind for kind, _ in calls] == ["text", "image"]
        assert all(name.startswith("mmrag-encode") for _, name in calls)
    finally:
        service.close()


def test_an_encoder_that_fails_its_warm_up_fails_the_start_and_frees_the_memory(
    memory_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_memory(memory_path, HASHING).close()

    def broken(self: HashingEncoder, images: Any) -> Any:
        raise RuntimeError("no image model")

    monkeypatch.setattr(HashingEncoder, "encode_image", broken)
    with pytest.raises(RuntimeError, match="no image model"):
        MemoryService.open(memory_path, writable=True)
    with Memory.open(memory_path, "a"):  # the writer's lock was released
        pass
