"""The `Encoder` Protocol, the spec that names an encoder in a manifest, and the registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from mmrag.config import Config, ConfigError

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


# Registry: explicit, lazily importing each backend so optional dependencies stay optional.
def _load_lite(spec: EncoderSpec) -> Encoder:
    from mmrag.encoders.lite import LiteEncoder

    return LiteEncoder.from_pretrained(spec.path, device=spec.device, batch_size=spec.batch_size)


def _load_hashing(spec: EncoderSpec) -> Encoder:
    from mmrag.encoders.hashing import HashingEncoder

    return HashingEncoder()


def _load_hf_clip(spec: EncoderSpec) -> Encoder:
    from mmrag.encoders.hf_clip import HFClipEncoder

    if spec.path is None:
        raise ConfigError(
            "the hf_clip encoder needs --encoder-path: a local CLIP checkpoint folder"
        )
    return HFClipEncoder.from_pretrained(spec.path, device=spec.device, batch_size=spec.batch_size)


def _load_open_clip(spec: EncoderSpec) -> Encoder:
    from mmrag.encoders.open_clip import OpenClipEncoder

    if spec.path is None:
        raise ConfigError("the open_clip encoder needs --encoder-path MODEL_NAME:CHECKPOINT_FILE")
    return OpenClipEncoder.from_spec(spec.path, device=spec.device, batch_size=spec.batch_size)


def _load_fromage(spec: EncoderSpec) -> Encoder:
    from mmrag.encoders.fromage import FromageEncoder

    return FromageEncoder.from_pretrained(spec.path, device=spec.device, batch_size=spec.batch_size)


ENCODERS: dict[str, Callable[[EncoderSpec], Encoder]] = {
    "lite": _load_lite,
    "fromage": _load_fromage,
    "hashing": _load_hashing,
    "hf_clip": _load_hf_clip,
    "open_clip": _load_open_clip,
}


def load_encoder(spec: EncoderSpec | str) -> Encoder:
    if isinstance(spec, str):
        spec = EncoderSpec(name=spec)
    return ENCODERS[spec.name](spec)
