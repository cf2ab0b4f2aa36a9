"""The one sampler every model draws tokens with.

Temperature, top-k and nucleus (top-p) sampling over a row of logits, the modality
constraints that restrict a row to allowed ids, classifier-free guidance (Ho & Salimans 2022;
on image tokens as in CM3Leon, Yu et al. 2023: `uncond + s * (cond - uncond)`), and the copy
interpolation of kNN-LM (Khandelwal et al. 2020) that mixes a suggested token's one-hot into
the model's distribution. RA-CM3's decoder, FROMAGe's text generation and GILL's image
drawing all call these functions, so a change to sampling changes all of them alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. temperature 0 = greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("Sampling: temperature >= 0 and top_p in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("Sampling: top_k >= 1")


def allowed_mask(
    vocab_size: int, ranges: Sequence[tuple[int, int]], extra: Sequence[int] = ()
) -> torch.Tensor:
    """(V,) bool: True for ids in any [start, end) range or in `extra`."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for start, end in ranges:
        mask[start:end] = True
    mask[list(extra)] = True
    return mask


def sample_next(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): greedy, or temperature + top-k + nucleus sampling."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest nucleus
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: `uncond + scale * (cond - uncond)` (scale 1 is `cond`)."""
    return uncond + scale * (cond - uncond)


def mix_in(
    scores: torch.Tensor, targets: torch.Tensor, weight: float | torch.Tensor
) -> torch.Tensor:
    """Logits (B, V) of `(1 - weight) * softmax(scores) + weight * onehot(targets)` in the rows
    whose target (B,) is a token id; rows with NO_HINT (or an id beyond V) keep their scores.
    `weight`: one for every row, or (B,) one per row."""
    has = (targets >= 0) & (targets < scores.shape[-1])
    if not bool(has.any()):
        return scores
    w = torch.as_tensor(weight, dtype=torch.float32, device=scores.device).expand(len(scores))
    probs = scores.float().softmax(-1) * (1.0 - w)[:, None]
    probs[has, targets[has]] += w[has]
    mixed = probs.clamp(min=torch.finfo(probs.dtype).tiny).log()
    mixed = mixed.masked_fill(scores.float() == float("-inf"), float("-inf"))
    return torch.where(has[:, None], mixed, scores.float())
