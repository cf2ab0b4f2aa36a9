"""The images a VQ tokenizer trains and is evaluated on: loading, the held-out split, scaling."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mmrag.data.writer import documents_files
from mmrag.documents import DocumentError, iter_jsonl
from mmrag.models.vq.model import (
    square_resize,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ImageSet:
    """Decoded, resized images as uint8 (N, 3, S, S) with their holdout group (None: always
    trains)."""

    pixels: torch.Tensor
    groups: list[str | None]

    def __len__(self) -> int:
        return len(self.pixels)


def load_images(paths: Sequence[Path], size: int, group_key: str) -> ImageSet:
    """Every distinct image (by SHA-256) of the documents, resized to `size`; bad lines and
    unreadable images are skipped and counted."""
    arrays: list[np.ndarray] = []
    groups: list[str | None] = []
    seen: set[str] = set()
    skipped = 0
    for file in documents_files(paths):
        for doc in iter_jsonl(file):
            if isinstance(doc, DocumentError):
                skipped += 1
                continue
            value = doc.metadata.get(group_key)
            group = None if value is None else json.dumps(value, sort_keys=True)
            for part in doc.images:
                if part.sha256 in seen:
                    continue
                seen.add(part.sha256 or "")
                try:
                    image = part.open_image()
                except DocumentError as e:
                    logger.warning("skipping an image: %s", e)
                    skipped += 1
                    continue
                arrays.append(np.asarray(square_resize(image, size), dtype=np.uint8))
                groups.append(group)
    if not arrays:
        raise ValueError(f"no readable images in {[str(p) for p in paths]}")
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    logger.info("images: %d distinct, %d skipped", len(arrays), skipped)
    return ImageSet(pixels, groups)


def split_holdout(
    groups: Sequence[str | None], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): a seeded `fraction` of the named groups is held out whole."""
    names = sorted({g for g in groups if g is not None})
    n_out = 0 if fraction <= 0 or not names else max(1, round(fraction * len(names)))
    n_out = min(n_out, max(0, len(names) - 1))
    order = np.random.default_rng(seed).permutation(len(names))
    out = {names[i] for i in order[:n_out]}
    held = np.array([g in out for g in groups], dtype=bool)
    return np.flatnonzero(~held), np.flatnonzero(held)


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0
