"""The batching encoder: concurrent calls share forwards, rows equal unbatched ones, one bad
input fails only its own call."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from mmrag.config import ConfigError
from mmrag.encoders import batching
from mmrag.encoders.base import EncoderSpec, Vectors, load_encoder
from mmrag.encoders.batching import AUTO_MAX_WORKERS, BatchingConfig, BatchingEncoder
from mmrag.encoders.mixed import encode_query, query_vector

TEXTS = [f"a {c} {s}" for c in ("red", "green", "blue", "pale yellow") for s in ("apple", "heart")]


class Gated:
    """The hashing encoder, whose text calls wait for a gate (so calls queue up behind the
    first batch), recording every batch it is given; "boom" fails a whole batch."""

    def __init__(self) -> None:
        self.inner = load_encoder(EncoderSpec(name="hashing"))
        self.name, self.dim = self.inner.name, self.inner.dim
        self.gate = threading.Event()
        self.entered = threading.Event()  # a forward has started
        self.batches: list[list[str]] = []

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def encode_text(self, texts: Sequence[str]) -> Vectors:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(list(texts))
        if "boom" in texts:
            raise ValueError("cannot encode 'boom'")
        return self.inner.encode_text(texts)

    def encode_image(self, images: Sequence[Image.Image]) -> Vectors:
        return self.inner.encode_image(images)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_batch"):
        BatchingConfig(max_batch=0)
    with pytest.raises(ConfigError, match="workers"):
        BatchingConfig(workers=-1)


def test_auto_workers_are_one_per_core_at_most_four(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BatchingConfig(workers=3).workers_to_run() == 3
    for cores, workers in ((1, 1), (2, 2), (16, AUTO_MAX_WORKERS)):
        monkeypatch.setattr(batching, "available_cores", lambda c=cores: c)
        assert BatchingConfig().workers_to_run() == workers
    monkeypatch.setattr(batching, "available_cores", lambda: 2)
    encoder = BatchingEncoder(Gated())
    try:
        assert len(encoder._workers) == 2
    finally:
        encoder.close()


def test_concurrent_calls_share_a_forward_and_get_their_own_rows() -> None:
    inner = Gated()
    encoder = BatchingEncoder(inner, BatchingConfig(max_batch=4, workers=1))
    try:
        futures = [encoder.submit_text(TEXTS[:1])]
        assert inner.entered.wait(10)  # the first call holds the worker ...
        futures += [encoder.submit_text([t]) for t in TEXTS[1:]]  # ... while these queue
        inner.gate.set()
        rows = [f.result(timeout=10) for f in futures]
    finally:
        encoder.close()
    expected = inner.inner.encode_text(TEXTS)
    np.testing.assert_array_equal(np.concatenate(rows), expected)
    # the first call ran alone; the seven queued behind it in batches of at most 4 texts
    assert [len(b) for b in inner.batches] == [1, 4, 3]
    assert encoder.stats.calls == 8 and encoder.stats.batches == 3


def test_a_bad_input_fails_only_its_own_call() -> None:
    inner = Gated()
    encoder = BatchingEncoder(inner, BatchingConfig(workers=1))
    try:
        first = encoder.submit_text(["hold"])
        assert inner.entered.wait(10)
        good, bad, other = (encoder.submit_text([t]) for t in ("red apple", "boom", "heart"))
        inner.gate.set()
        first.result(timeout=10)
        with pytest.raises(ValueError, match="boom"):
            bad.result(timeout=10)
        np.testing.assert_array_equal(
            good.result(timeout=10), inner.inner.encode_text(["red apple"])
        )
        assert other.result(timeout=10).shape == (1, inner.dim)
    finally:
        encoder.close()
    assert encoder.stats.failed_calls == 1


def test_wait_gathers_calls_that_arrive_soon_after() -> None:
    inner = Gated()
    inner.gate.set()
    encoder = BatchingEncoder(inner, BatchingConfig(max_wait_ms=300, workers=1))
    try:
        first = encoder.submit_text(["red apple"])
        second = encoder.submit_text(["green heart"])  # within the first one's wait
        first.result(timeout=10), second.result(timeout=10)
    finally:
        encoder.close()
    assert inner.batches == [["red apple", "green heart"]]


def test_encoder_protocol_threads_and_close() -> None:
    inner = load_encoder(EncoderSpec(name="hashing"))
    encoder = BatchingEncoder(inner, BatchingConfig(workers=2))
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    assert encoder.name == inner.name and encoder.dim == inner.dim
    assert encoder.fingerprint() == inner.fingerprint()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda t: encode_query(encoder, t, [image]), TEXTS * 4))
    for text, vector in zip(TEXTS * 4, got, strict=True):
        np.testing.assert_allclose(vector, encode_query(inner, text, [image]), rtol=0, atol=1e-6)
    assert encoder.encode_text([]).shape == (0, inner.dim)
    encoder.close()
    encoder.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        encoder.encode_text(["late"])


def test_query_vector_is_encode_query() -> None:
    inner = load_encoder(EncoderSpec(name="hashing"))
    image = Image.new("RGB", (16, 16), (20, 30, 200))
    text_rows, image_rows = inner.encode_text(["blue"]), inner.encode_image([image])
    np.testing.assert_array_equal(
        query_vector(text_rows, image_rows), encode_query(inner, "blue", [image])
    )
    np.testing.assert_array_equal(
        query_vector(None, image_rows), encode_query(inner, None, [image])
    )
    with pytest.raises(ValueError, match="text, an image"):
        query_vector(None, None)


@pytest.mark.pretrained
def test_lite_rows_batched_equal_rows_alone(one_thread: None) -> None:
    """The shipped text tower batches texts of one token count without padding: a query's
    row in a shared batch equals its row alone (to float rounding, 1e-6)."""
    inner = load_encoder(EncoderSpec(name="lite"))
    texts = [*TEXTS, "woman surfing: dark skin tone", "a photo of a cat", "cat", "red heart"]
    encoder = BatchingEncoder(inner)
    try:
        with ThreadPoolExecutor(len(texts)) as pool:
            rows = list(pool.map(lambda t: encoder.encode_text([t])[0], texts))
    finally:
        encoder.close()
    alone = np.stack([inner.encode_text([t])[0] for t in texts])
    np.testing.assert_allclose(np.stack(rows), alone, rtol=0, atol=1e-6)


def test_close_finishes_what_is_queued() -> None:
    inner = Gated()
    encoder = BatchingEncoder(inner, BatchingConfig(max_batch=2, workers=2))
    futures = [encoder.submit_text([t]) for t in TEXTS]
    closer = threading.Thread(target=encoder.close)
    closer.start()
    inner.gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert all(f.result(timeout=1).shape == (1, inner.dim) for f in futures)
