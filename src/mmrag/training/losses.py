"""Training losses: CLIP's contrastive InfoNCE (FROMAGe's and GILL's retrieval losses) and
GILL's L2 between the mapper's output and the generator's own encoding of a caption."""

from __future__ import annotations

import torch
from torch.nn import functional


def contrastive(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """One direction of InfoNCE: softmax cross-entropy of each L2-normalised query (B, R) over
    the keys (N, R), the positive of query i being key `targets[i]` (default i). `exclude`
    (B, N) bool drops keys that are not negatives (duplicates of the positive) from the
    softmax; a query's own positive is never excluded. `logit_scale` is log(1/T)."""
    logits = logit_scale.exp() * queries @ keys.T  # (B, N)
    rows = torch.arange(len(queries), device=queries.device)
    if targets is None:
        targets = rows
    if exclude is not None:
        exclude = exclude.clone()
        exclude[rows, targets] = False
        logits = logits.masked_fill(exclude, float("-inf"))
    return functional.cross_entropy(logits, targets, reduction=reduction)


def info_nce(
    text: torch.Tensor,
    image: torch.Tensor,
    logit_scale: torch.Tensor,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021, figure 3; FROMAGe section 3.2) between rows of
    `text` (B, R) and `image` (B, R), row i of each a positive pair; `same` (B, B) marks
    off-diagonal pairs that are duplicates rather than negatives."""
    t2i = contrastive(text, image, logit_scale, exclude=same)
    i2t = contrastive(image, text, logit_scale, exclude=None if same is None else same.T)
    return (t2i + i2t) / 2


def masked_l2(
    predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """GILL's generation loss: mean squared error between the mapper's output (B, Q, D) and the
    generator's own encoding of the caption (B, Q, D), over the slots `mask` (B, Q) keeps."""
    err = (predicted - target).pow(2).mean(-1)  # (B, Q)
    if mask is None:
        return err.mean()
    weights = mask.to(err.dtype)
    return (err * weights).sum() / weights.sum().clamp(min=1.0)
