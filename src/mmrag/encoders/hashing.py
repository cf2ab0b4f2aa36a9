"""A dependency-light reference encoder: hashed character n-grams and pixel projections.

Not a semantic model. It is exact and deterministic, so tests of the memory, the retriever
and the CLI use it as their oracle without loading any weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mmrag.encoders.base import EncoderSpec, Vectors, l2_normalize

THUMB = 8  # images become 8x8 RGB thumbnails before projection


def _bucket(token: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")
    return h % dim, 1.0 if (h >> 63) & 1 else -1.0


class HashingEncoder:
    """Text: signed feature hashing of words and character trigrams. Image: a fixed random
    projection of a centred 8x8 thumbnail."""

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        self._dim = dim
        self._seed = seed
        rng = np.random.default_rng(seed)
        self._proj = rng.standard_normal((THUMB * THUMB * 3, dim)).astype(np.float32)

    @property
    def name(self) -> str:
        return "hashing"

    @property
    def dim(self) -> int:
        return self._dim

    def fingerprint(self) -> str:
        return f"hashing-v1-d{self._dim}-s{self._seed}"

    def encode_text(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                padded = f" {word} "
                grams = [word] + [padded[i : i + 3] for i in range(len(padded) - 2)]
                for g in grams:
                    col, sign = _bucket(g, self._dim)
                    out[row, col] += sign
        out[np.abs(out).sum(axis=1) == 0, 0] = 1.0  # empty text: a fixed direction
        return l2_normalize(out)

    def encode_image(self, images: Sequence[Image.Image]) -> Vectors:
        if not images:
            return np.zeros((0, self._dim), dtype=np.float32)
        thumbs = np.stack(
            [
                np.asarray(img.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BILINEAR))
                for img in images
            ]
        ).astype(np.float32)  # (N, 8, 8, 3)
        flat = thumbs.reshape(len(images), -1) / 255.0 - 0.5
        return l2_normalize(flat @ self._proj)


def from_encoder_spec(spec: EncoderSpec) -> HashingEncoder:
    """The registry's builder: the hashing encoder takes no checkpoint."""
    return HashingEncoder()
