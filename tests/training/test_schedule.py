"""The one learning-rate schedule."""

from __future__ import annotations

import itertools
import math

import pytest

from mmrag.training.schedule import warmup_cosine


def test_warm_up_then_cosine_to_the_floor() -> None:
    assert warmup_cosine(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 1.0, 10, 100) == pytest.approx(1.0)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert warmup_cosine(55, 1.0, 10, 100) == pytest.approx(mid)
    assert warmup_cosine(100, 2.0, 10, 100, floor=0.0) == pytest.approx(0.0)
    assert warmup_cosine(500, 1.0, 10, 100) == pytest.approx(0.1)  # held after the end
    rates = [warmup_cosine(s, 1.0, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(rates))
