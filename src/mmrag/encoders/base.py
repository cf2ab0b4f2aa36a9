"""The `Encoder` Protocol, the spec that names an encoder in a manifest, and the registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from mmrag.config import Config, ConfigError
from mmrag.registry import load_object

Vectors = NDArray[np.float32]


@runtime_checkable
class Encoder(Protocol):
    """A dual encoder: both methods return L2-normalised float32 rows of width `dim`."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def fingerprint(self) -> str:
        """Changes whenever the vectors it produces would change (weights, config)."""
        ...

    def encode_text(self, texts: Sequence[str]) -> Vectors: ...

    def encode_image(self, images: Sequence[Image.Image]) -> Vectors: ...


@dataclasses.dataclass(frozen=True)
class EncoderSpec(Config):
    """How to rebuild an encoder: a registry name and an optional local checkpoint path."""

    preset_prefix: ClassVar[str] = "encoder"

    name: str = "lite"
    path: str | None = None
    device: str = "cpu"
    batch_size: int = 64

    def validate(self) -> None:
        if self.name not in ENCODERS:
            raise ConfigError(f"unknown encoder {self.name!r}; choose from {sorted(ENCODERS)}")
        if self.batch_size < 1:
            raise ConfigError("EncoderSpec: batch_size must be >= 1")


def l2_normalize(x: NDArray[Any], eps: float = 1e-12) -> Vectors:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


# Registry: name -> "module:function" building the encoder from its spec. Each backend is
# imported only when asked for, so optional dependencies stay optional.
ENCODERS: dict[str, str] = {
    "lite": "mmrag.encoders.lite:from_encoder_spec",
    "fromage": "mmrag.models.fromage.encoder:from_encoder_spec",
    "hashing": "mmrag.encoders.hashing:from_encoder_spec",
    "hf_clip": "mmrag.encoders.hf_clip:from_encoder_spec",
    "open_clip": "mmrag.encoders.open_clip:from_encoder_spec",
}


def load_encoder(spec: EncoderSpec | str) -> Encoder:
    if isinstance(spec, str):
        spec = EncoderSpec(name=spec)
    build: Callable[[EncoderSpec], Encoder] = load_object(ENCODERS[spec.name])
    return build(spec)
