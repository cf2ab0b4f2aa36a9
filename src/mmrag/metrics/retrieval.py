"""Retrieval metrics: dual-encoder image-caption scores and recall at k."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from mmrag.encoders.base import Encoder, l2_normalize


def dual_encoder_scores(
    encoder: Encoder, images: Sequence[Image.Image], captions: Sequence[str]
) -> NDArray[np.float32]:
    """Cosine of each image with its caption under a dual encoder (the CLIP-score recipe,
    with our `lite` encoder in place of CLIP; not multiplied by 100 or clipped)."""
    img = l2_normalize(encoder.encode_image(list(images)))
    txt = l2_normalize(encoder.encode_text(list(captions)))
    return (img * txt).sum(-1)


def recall_at_k(ranks: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> Mapping[str, float]:
    """ranks: 0-based rank of the right answer per query (-1: not retrieved)."""
    arr = np.asarray(ranks)
    return {f"R@{k}": float(((arr >= 0) & (arr < k)).mean()) for k in ks}


def nearest_is_right(
    generated: NDArray[np.float64], candidates: NDArray[np.float64], right: Sequence[int]
) -> NDArray[np.bool_]:
    """Whether each generated feature's nearest candidate (cosine) is `right[i]`."""
    g = l2_normalize(generated.astype(np.float32))
    c = l2_normalize(candidates.astype(np.float32))
    return (g @ c.T).argmax(-1) == np.asarray(right)


def recall(
    scores: torch.Tensor, matches: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Fraction of query rows (Q, G) with a matching gallery column among their top k."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    hits = matches.gather(1, order)
    return {f"r{k}": float(hits[:, :k].any(1).float().mean()) for k in ks}
