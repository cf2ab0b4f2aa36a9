"""Decoding the RA-CM3 generator: batched, KV-cached, with the one sampler (`mmrag.sampling`:
temperature, nucleus, constraints, guidance, copy interpolation), and sequence scores for
reranking.

Classifier-free guidance (Ho & Salimans 2022; on image tokens as in CM3Leon, Yu et al. 2023):
every conditional row has an unconditional twin (its prompt without the caption and the
retrieved documents) decoded in the same batch; the next token is sampled from
`uncond + s * (cond - uncond)` and appended to both rows, so the twins stay aligned.

Copy interpolation (kNN-LM's, Khandelwal et al. 2020, with a retrieved document as the
neighbour): where retrieval suggests the next token (e.g. the code the top retrieved image
holds at the cell being drawn), the next token is drawn from `(1 - w) * p + w * onehot`, p the
guided, constrained model distribution; where it suggests nothing, or the suggestion is not an
allowed token, from p alone. Temperature, top-k and top-p apply to the mixture, so with
top-p < 1 the suggestion is taken outright wherever its mixed mass reaches top-p (for
w = 0.75 and top-p 0.9: wherever the model gives it 60% or more).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch.nn import functional

from mmrag.models.ra_cm3.copy_hints import NO_HINT, TextCopy, pad_hints
from mmrag.models.ra_cm3.generator import Generator, KVCache
from mmrag.sampling import Sampling, guide, mix_in, sample_next


@dataclasses.dataclass
class Decoded:
    """New tokens per row and their mean NLL under the (guided, constrained) model at
    temperature 1: the perplexity used to rerank samples."""

    tokens: list[list[int]]
    mean_nll: list[float]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> ids (B, T) left-padded and attention_mask (B, T)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[r, width - len(p) :] = True
    return ids, mask


@torch.inference_mode()  # no autograd bookkeeping at all (faster than no_grad per token)
def decode(
    model: Generator,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    allowed: torch.Tensor | None = None,
    sampling: Sampling | None = None,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    guidance: float = 1.0,
    stop_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    hints: Sequence[torch.Tensor] | None = None,
    text_copy: Sequence[TextCopy | None] | None = None,
    copy: Sequence[Sequence[int]] | None = None,
    copy_weight: float = 0.0,
) -> Decoded:
    """Continue every prompt by up to `max_new_tokens` tokens drawn from `allowed` (V,) ids.

    With `uncond_prompts` (one per prompt) and `guidance` != 1, classifier-free guidance.
    A row stops after `stop_id` (included in its tokens). `use_cache=False` recomputes the
    whole sequence at every step: the reference the KV cache is benchmarked against.
    `hints`: per prompt, the copy hints (len(prompt) + max_new_tokens, S) of its whole
    sequence (copy_hints.py); unconditional twins get none. `text_copy`: per prompt, the
    retrieved captions whose text copy hints follow the tokens as they are decoded (they
    replace the static hints from the prompt's last token on), and whose `copy_from` caption,
    with its `weight`, is mixed in like `copy` (the text copy interpolation; a model without
    `text_hints` gets the interpolation only). `copy`: per prompt, the token retrieval
    suggests for each new token (max_new_tokens ids, NO_HINT where none), mixed in with
    weight `copy_weight` (see the module docstring; 0 = off).
    """
    sampling = sampling or Sampling()
    if not 0.0 <= copy_weight <= 1.0:
        raise ValueError(f"copy_weight must be in [0, 1], got {copy_weight}")
    guided = uncond_prompts is not None and guidance != 1.0
    rows = list(prompts) + (list(uncond_prompts) if guided and uncond_prompts else [])
    b = len(prompts)
    ids, mask = left_pad(rows, pad_id)
    device = model.device
    ids, mask = ids.to(device), mask.to(device)
    width = ids.shape[1]
    all_hints = _row_hints(hints, prompts, rows, max_new_tokens, width)
    with_captions = _text_copy_rows(model, text_copy, len(prompts))
    followed = [(r, c) for r, c in with_captions if c.copies]  # the text copy interpolation
    copying = with_captions if model.config.text_hints else []  # the text copy hints
    slots = model.config.hint_slots
    if copying and (all_hints is None or all_hints.shape[2] < slots):
        wide = torch.full((len(rows), width + max_new_tokens, slots), NO_HINT, dtype=torch.long)
        if all_hints is not None:
            wide[:, :, : all_hints.shape[2]] = all_hints
        all_hints = wide
    for r, suggester in copying:
        assert all_hints is not None
        all_hints[r, width - 1] = torch.as_tensor(suggester.row([], slots))
    if all_hints is not None:
        all_hints = all_hints.to(device)  # (R, width + max_new_tokens, S)
    cache: KVCache | None = None
    if use_cache:
        cache = model.new_cache(len(rows), width + max_new_tokens)
    first = None if all_hints is None else all_hints[:, :width]
    logits = model(ids, attention_mask=mask, cache=cache, hints=first)[:, -1]  # (R, V)
    out = [[] for _ in range(b)]  # type: list[list[int]]
    nll = torch.zeros(b, dtype=torch.float64)
    text_weights = torch.zeros(b)
    for r, c in followed:
        text_weights[r] = c.weight
    text_weights = text_weights.to(device)
    done = torch.zeros(b, dtype=torch.bool)
    bias = None
    if allowed is not None:
        bias = torch.zeros(allowed.shape[0], device=device).masked_fill(
            ~allowed.to(device), float("-inf")
        )
    targets = _copy_targets(copy, b, max_new_tokens, allowed) if copy_weight else None
    if targets is not None:
        targets = targets.to(device)
    for step in range(max_new_tokens):
        scores = logits[:b]
        if guided:
            scores = guide(logits[:b], logits[b:], guidance)  # (B, V)
        if bias is not None:
            scores = scores + bias
        if targets is not None:
            scores = mix_in(scores, targets[:, step], copy_weight)
        if followed:
            wanted = torch.full((b,), NO_HINT, dtype=torch.long)
            for r, c in followed:
                wanted[r] = c.target(out[r])
            if allowed is not None:  # a suggestion the constraints forbid is no suggestion
                known = (wanted >= 0) & (wanted < allowed.shape[0])
                wanted[known] = torch.where(
                    allowed.cpu()[wanted[known]], wanted[known], torch.tensor(NO_HINT)
                )
            scores = mix_in(scores, wanted.to(device), text_weights)
        token = sample_next(scores.float(), sampling, generator)  # (B,)
        logp = functional.log_softmax(scores.float(), -1).gather(-1, token[:, None]).squeeze(-1)
        for r in range(b):
            if not done[r]:
                out[r].append(int(token[r]))
                nll[r] -= float(logp[r])
        if stop_id is not None:
            done |= (token == stop_id).cpu()
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        step_tokens = torch.cat([token, token[: len(rows) - b]])[:, None]  # (R, 1)
        at = width + step  # the slot step_tokens go to
        for r, suggester in copying:
            assert all_hints is not None
            if not done[r]:
                all_hints[r, at] = torch.as_tensor(suggester.row(out[r], slots), device=device)
        if cache is not None:
            step_hints = None if all_hints is None else all_hints[:, at : at + 1]
            logits = model.step(step_tokens, cache, step_hints)  # (R, V)
        else:
            ids = torch.cat([ids, step_tokens], dim=1)
            mask = torch.cat([mask, torch.ones_like(step_tokens, dtype=torch.bool)], dim=1)
            seen = None if all_hints is None else all_hints[:, : at + 1]
            logits = model(ids, attention_mask=mask, hints=seen)[:, -1]
    mean = [float(nll[r]) / max(1, len(out[r])) for r in range(b)]
    return Decoded(out, mean)


def _copy_targets(
    copy: Sequence[Sequence[int]] | None,
    prompts: int,
    max_new_tokens: int,
    allowed: torch.Tensor | None,
) -> torch.Tensor | None:
    """(B, max_new_tokens) suggested token ids, NO_HINT where none or not allowed."""
    if copy is None:
        return None
    if len(copy) != prompts:
        raise ValueError(f"{len(copy)} copy rows for {prompts} prompts")
    if any(len(c) != max_new_tokens for c in copy):
        raise ValueError("each prompt's copy row must hold max_new_tokens ids")
    targets = torch.as_tensor([list(c) for c in copy], dtype=torch.long).reshape(prompts, -1)
    if allowed is not None:
        known = (targets >= 0) & (targets < allowed.shape[0])
        ok = known.clone()
        ok[known] = allowed.cpu()[targets[known]]
        targets = targets.masked_fill(~ok, NO_HINT)
    return targets


def _text_copy_rows(
    model: Generator, text_copy: Sequence[TextCopy | None] | None, prompts: int
) -> list[tuple[int, TextCopy]]:
    """The rows that get text copy hints, with theirs."""
    if text_copy is None:
        return []
    if len(text_copy) != prompts:
        raise ValueError(f"{len(text_copy)} text copy rows for {prompts} prompts")
    rows = [(r, c) for r, c in enumerate(text_copy) if c is not None and c.sources]
    if any(c.offset != model.config.hint_codes for _, c in rows):
        raise ValueError(f"text copy hints' offset must be hint_codes ({model.config.hint_codes})")
    return rows


def _row_hints(
    hints: Sequence[torch.Tensor] | None,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[Sequence[int]],
    max_new_tokens: int,
    width: int,
) -> torch.Tensor | None:
    """(R, width + max_new_tokens, S): each prompt's hints aligned with its left-padded row;
    the rows beyond the prompts (unconditional twins) hold none."""
    if not hints:
        return None
    if len(hints) != len(prompts):
        raise ValueError(f"{len(hints)} hint rows for {len(prompts)} prompts")
    for p, h in zip(prompts, hints, strict=True):
        if h.dim() != 2 or h.shape[0] != len(p) + max_new_tokens:
            raise ValueError("each prompt's hints must be (len(prompt) + max_new_tokens, S)")
    # each row's hints end where its sequence ends, so left padding aligns them with it
    padded = pad_hints(hints, width + max_new_tokens, left=True)  # (B, width + new, S)
    twins = torch.full((len(rows) - len(prompts), *padded.shape[1:]), NO_HINT, dtype=torch.long)
    return torch.cat([padded, twins])


@torch.no_grad()
def continuation_nll(
    model: Generator,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_id: int = 0,
) -> list[float]:
    """Mean NLL per token of each continuation given its prompt (one batched forward pass)."""
    rows = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
    ids, mask = left_pad(rows, pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    logp = functional.log_softmax(model(ids, attention_mask=mask)[:, :-1].float(), -1)  # (B,T-1,V)
    token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    width = ids.shape[1]
    out = []
    for r, c in enumerate(continuations):
        n = len(c)
        out.append(-float(token_logp[r, width - 1 - n :].sum()) / max(1, n))
    return out
