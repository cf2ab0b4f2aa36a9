"""What GILL trains and is evaluated on: caption pairs with the generator's own encoding of
each caption (the mapper's targets), and the `[IMG]` states of request contexts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrag.models.fromage.conversation import REQUEST_TEMPLATES
from mmrag.models.fromage.model import FrozenLM
from mmrag.models.fromage.pairs import PairData, load_pair_data, query_row
from mmrag.models.fromage.train_config import FromageTrainConfig
from mmrag.models.gill.model import caption_targets
from mmrag.models.gill.train_config import GillTrainConfig


@dataclasses.dataclass
class GillData:
    pairs: PairData
    targets: torch.Tensor  # (N, Q, D) generator embeddings of each caption
    lengths: torch.Tensor  # (N,)
    target_scale: float  # mean square of the generator's embedding entries


def load_gill_data(
    data: Sequence[Path],
    model: FrozenLM,
    racm3: Any,
    config: GillTrainConfig,
    split: FromageTrainConfig,
    cache_dir: Path | None,
    progress: bool,
) -> GillData:
    pairs = load_pair_data(
        data, model, split.holdout, split.group_key, split.seed, cache_dir, progress
    )
    targets, lengths = caption_targets(racm3, pairs.pairs.texts, config.gill.queries)
    scale = float(racm3.generator.embed.weight.detach().pow(2).mean())
    return GillData(pairs, targets, lengths, scale)


def context_rows(
    model: FrozenLM,
    data: PairData,
    pairs: Sequence[int] | np.ndarray,
    chat: Sequence[bool],
    templates: Sequence[int],
) -> list[Any]:
    return [
        query_row(model, data, int(i), "chat" if c else "plain", int(i), t)
        for i, c, t in zip(pairs, chat, templates, strict=True)
    ]


def cached_states(
    model: FrozenLM, data: PairData, index: np.ndarray, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """[IMG] states (C, r, H) of a plain and a chat context per pair, and each one's pair."""
    rng = np.random.default_rng([seed, 13])
    pairs = np.repeat(index, 2)
    chat = [bool(j % 2) for j in range(len(pairs))]
    templates = [int(t) for t in rng.integers(len(REQUEST_TEMPLATES), size=len(pairs))]
    rows = context_rows(model, data, pairs, chat, templates)
    return model.special_states(rows, list(model.img_ids)), pairs
