"""Named implementations as "module:attribute" strings, imported only when first asked for.

A registry maps a user-facing name (an encoder, a memory backend) to where its implementation
lives. Keeping the target a string means the module that owns a registry never imports its
implementations, so optional dependencies stay optional and imports point one way only.
"""

from __future__ import annotations

import importlib
from typing import Any


def load_object(target: str) -> Any:
    """The attribute named by `"package.module:attribute"`."""
    module, sep, attribute = target.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"a registry target is 'module:attribute', got {target!r}")
    return getattr(importlib.import_module(module), attribute)
