"""Registries name their implementations as "module:attribute" strings."""

from __future__ import annotations

import pytest

from mmrag.data.datasets import DATASETS
from mmrag.encoders.base import ENCODERS
from mmrag.memory.memory import BACKENDS
from mmrag.registry import load_object


def test_load_object_imports_on_use() -> None:
    assert load_object("mmrag.registry:load_object") is load_object


@pytest.mark.parametrize("bad", ["mmrag.registry", ":load_object", "mmrag.registry:"])
def test_a_target_needs_module_and_attribute(bad: str) -> None:
    with pytest.raises(ValueError, match="module:attribute"):
        load_object(bad)


def test_a_missing_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        load_object("mmrag.registry:nope")


@pytest.mark.parametrize("registry", [ENCODERS, BACKENDS, DATASETS])
def test_every_registered_target_exists(registry: dict[str, str]) -> None:
    for name, target in registry.items():
        module = target.partition(":")[0]
        assert module.startswith("mmrag."), name
        if name == "open_clip":  # importable only with torchvision; its module is light
            continue
        assert callable(load_object(target)), name
