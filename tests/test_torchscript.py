"""`mmrag.torchscript`: script or trace, or None (logged) where TorchScript cannot."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from torch import nn

from mmrag.torchscript import script, trace


def _affine(x: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        x = torch.tanh(x @ w)
    return x


def _unscriptable(x: torch.Tensor) -> torch.Tensor:
    return x * len({id(x): x})  # a dict keyed by an int from id(): TorchScript refuses id()


def test_script_gives_the_function_and_none_when_it_cannot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scripted = script(_affine, "a test function")
    assert scripted is not None
    x, w = torch.randn(3, 8), torch.randn(8, 8) / 4
    assert torch.equal(scripted(x, w, 3), _affine(x, w, 3))
    with caplog.at_level(logging.WARNING, logger="mmrag.torchscript"):
        assert script(_unscriptable, "the unscriptable") is None
    assert "the unscriptable" in caplog.text


def test_trace_gives_the_module_for_any_batch() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()).eval()
    traced = trace(module, torch.zeros(2, 3, 8, 8), "a test module")
    assert traced is not None
    with torch.inference_mode():
        x = torch.randn(5, 3, 8, 8)
        assert torch.equal(traced(x), module(x))


def test_a_scripted_call_releases_the_gil() -> None:
    """During one long scripted call a Python thread keeps running at a good share of its
    speed alone; a call that held the GIL would stop it for the whole call."""
    scripted = script(_affine, "a test function")
    assert scripted is not None
    x, w = torch.randn(4, 64), torch.randn(64, 64) / 8
    counts = [0]
    done = threading.Event()

    def spin() -> None:
        while not done.is_set():
            counts[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        time.sleep(0.1)
        before, start = counts[0], time.perf_counter()
        time.sleep(0.2)
        alone = (counts[0] - before) / (time.perf_counter() - start)  # the spinner's rate
        n = 1000
        while True:  # one call of at least 0.2 s
            before, start = counts[0], time.perf_counter()
            scripted(x, w, n)
            seconds = time.perf_counter() - start
            if seconds >= 0.2:
                break
            n *= 4
        during = (counts[0] - before) / seconds
    finally:
        done.set()
        thread.join()
    assert during > 0.2 * alone, (during, alone)
