"""The `fashion-mnist` data set, read from Debian's `dataset-fashion-mnist` IDX files."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mmrag.data.writer import DatasetError, DatasetSummary, DatasetWriter, require_file

logger = logging.getLogger(__name__)

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
SPLITS = ("train", "t10k")  # written in this order
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_NOUNS = (
    "a T-shirt or top",
    "a pair of trousers",
    "a pullover",
    "a dress",
    "a coat",
    "a sandal",
    "a shirt",
    "a sneaker",
    "a bag",
    "an ankle boot",
)
_IDX_DTYPES = {0x08: np.uint8}  # the only element type Fashion-MNIST uses


def caption(label: int) -> str:
    """'a grayscale photo of a pullover' for label 2."""
    return f"a grayscale photo of {_NOUNS[label]}"


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (big-endian header: 0, 0, dtype code, ndim; then the dims)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: {len(raw) - header} bytes of data, header says {expected}")
    return np.frombuffer(raw[header:], dtype=np.uint8).reshape(dims)


def load_split(split: str, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) for 'train' or 't10k'."""
    images = read_idx(require_file(data_dir / f"{split}-images-idx3-ubyte.gz", DEBIAN_PACKAGE))
    labels = read_idx(require_file(data_dir / f"{split}-labels-idx1-ubyte.gz", DEBIAN_PACKAGE))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"fashion-mnist {split}: images {images.shape} vs labels {labels.shape}")
    if labels.max(initial=0) >= len(CLASSES):
        raise DatasetError(f"fashion-mnist {split}: label {labels.max()} out of range")
    return images, labels


def balanced_order(labels: np.ndarray) -> np.ndarray:
    """Indices that cycle through the classes: the first of each class, then the second...

    Any prefix of length 10k holds exactly k of each class (while every class lasts).
    """
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    return np.lexsort((labels, rank))  # primary key: rank; ties by label


def build_fashion_mnist(
    out: str | Path, limit: int | None = None, progress: bool = True, data_dir: Path = DATA_DIR
) -> DatasetSummary:
    """Write Fashion-MNIST (train, then t10k, each in class-balanced order) into `out`."""
    splits = {split: load_split(split, data_dir) for split in SPLITS}  # fail before writing
    total = sum(len(labels) for _, labels in splits.values())
    writer = DatasetWriter(out, "fashion-mnist")
    bar = tqdm(total=min(total, limit or total), desc="fashion-mnist", disable=not progress)
    for split, (images, labels) in splits.items():
        for index in balanced_order(labels):
            if limit is not None and len(writer) >= limit:
                break
            label = int(labels[index])
            meta = {
                "label": label,
                "class": CLASSES[label],
                "split": split,
                "index": int(index),
                "dataset": "fashion-mnist",
            }
            image = Image.fromarray(images[index])  # (28, 28) uint8 -> mode L
            writer.add(image, f"{split}-{int(index):05d}", caption(label), meta)
            bar.update()
    bar.close()
    return writer.close()
