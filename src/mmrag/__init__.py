"""mmrag: retrieval-augmented multimodal generation over a persistent multimodal memory.

The public API, imported lazily: `import mmrag` loads no model code and no torch; each name
below imports its module on first use.

    import mmrag

    with mmrag.ensure_memory("mem") as memory:
        mmrag.ingest(memory, mmrag.read_source("photos/"))
        hits = mmrag.Retriever(memory).search(text="a red apple")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Document": "mmrag.documents",
    "Part": "mmrag.documents",
    "DocumentError": "mmrag.documents",
    "IndexConfig": "mmrag.config",
    "RetrieverConfig": "mmrag.config",
    "EncoderSpec": "mmrag.encoders.base",
    "load_encoder": "mmrag.encoders.base",
    "read_source": "mmrag.data.readers",
    "build_dataset": "mmrag.data.datasets",
    "Memory": "mmrag.memory.memory",
    "open_memory": "mmrag.memory.memory",
    "ensure_memory": "mmrag.memory.memory",
    "ingest": "mmrag.memory.ingest",
    "IngestReport": "mmrag.memory.ingest",
    "Retriever": "mmrag.retrieval",
    "SearchResult": "mmrag.retrieval",
    "RACM3": "mmrag.models.ra_cm3.model",
    "Chat": "mmrag.chat",
    "ChatOptions": "mmrag.chat",
    "Message": "mmrag.chat",
    "Reply": "mmrag.chat",
    "load_chat": "mmrag.chat",
}

__all__ = [
    "RACM3",
    "Chat",
    "ChatOptions",
    "Document",
    "DocumentError",
    "EncoderSpec",
    "IndexConfig",
    "IngestReport",
    "Memory",
    "Message",
    "Part",
    "Reply",
    "Retriever",
    "RetrieverConfig",
    "SearchResult",
    "__version__",
    "build_dataset",
    "ensure_memory",
    "ingest",
    "load_chat",
    "load_encoder",
    "open_memory",
    "read_source",
]

if TYPE_CHECKING:
    from mmrag.chat import Chat, ChatOptions, Message, Reply, load_chat
    from mmrag.config import IndexConfig, RetrieverConfig
    from mmrag.data.datasets import build_dataset
    from mmrag.data.readers import read_source
    from mmrag.documents import Document, DocumentError, Part
    from mmrag.encoders.base import EncoderSpec, load_encoder
    from mmrag.memory.ingest import IngestReport, ingest
    from mmrag.memory.memory import Memory, ensure_memory, open_memory
    from mmrag.models.ra_cm3.model import RACM3
    from mmrag.retrieval import Retriever, SearchResult


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mmrag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
