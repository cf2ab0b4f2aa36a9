"""`mmrag.server.run`: what `mmrag serve` does around the app."""

from __future__ import annotations

import gc

from mmrag.server.run import is_loopback, settle_heap


def test_loopback_hosts() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_settle_heap_freezes_what_is_alive() -> None:
    gc.unfreeze()
    kept = [[i] for i in range(10)]  # container objects: tracked by the collector
    assert any(o is kept[0] for o in gc.get_objects())
    try:
        settle_heap()
        assert gc.get_freeze_count() >= len(kept)
        assert not any(o is kept[0] for o in gc.get_objects())  # out of every generation
    finally:
        gc.unfreeze()
