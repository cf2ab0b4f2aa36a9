"""The offline data set registry: a name -> the builder that writes it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mmrag.data.writer import DatasetError, DatasetSummary
from mmrag.registry import load_object

# Builders import on use, so listing data sets does not import scikit-image or the emoji data.
DATASETS: dict[str, str] = {
    "emoji": "mmrag.data.emoji:build_emoji",
    "twemoji": "mmrag.data.emoji_styles:build_twemoji",
    "openmoji": "mmrag.data.emoji_styles:build_openmoji",
    "openclipart": "mmrag.data.openclipart:build_openclipart",
    "gcompris": "mmrag.data.gcompris:build_gcompris",
    "photos": "mmrag.data.photos:build_photos",
    "fashion-mnist": "mmrag.data.fashion_mnist:build_fashion_mnist",
}


def build_dataset(
    name: str, out: str | Path, limit: int | None = None, progress: bool = True
) -> DatasetSummary:
    """Build the offline data set `name` into `out` (`images/*.png` + `documents.jsonl`).

    Deterministic: building twice gives byte-identical files. `limit` keeps the first N
    documents of the builder's fixed order.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be >= 1, got {limit}")
    build: Callable[..., DatasetSummary] = load_object(DATASETS[name])
    return build(Path(out), limit=limit, progress=progress)
