"""Caption-image pairs for the frozen-LM adapters: frozen EfficientNet-Lite0 features (cached
by document id, shared with the `lite` encoder's trainer), caption token ids, the split by
group (the encoder pairs' `three_way_split`, so held-out families are unseen in every
variant), and the token rows FROMAGe and GILL train and evaluate on."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mmrag.config import LiteEncoderConfig
from mmrag.encoders.pairs import (
    Pairs,
    extract_features,
    load_pairs,
    match_matrix,
    three_way_split,
)
from mmrag.models.fromage.conversation import REQUEST_TEMPLATES, Message, chat_row
from mmrag.models.fromage.model import IMAGE_SLOT, FrozenLM, TokenRow


@dataclasses.dataclass
class PairData:
    """Caption-image pairs with their frozen image features, token ids and split."""

    pairs: Pairs
    features: torch.Tensor  # (N, F)
    captions: list[list[int]]  # caption token ids
    train: np.ndarray
    validation: np.ndarray
    heldout: np.ndarray
    duplicates: torch.Tensor  # (N_train, N_train) bool: same caption or same image

    def texts(self, index: Sequence[int] | np.ndarray) -> list[str]:
        return [self.pairs.texts[i] for i in index]


def load_pair_data(
    data: Sequence[Path],
    model: FrozenLM,
    holdout: float,
    group_key: str,
    seed: int,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> PairData:
    """Read the documents, extract (or reuse cached) EfficientNet-Lite0 features, tokenize the
    captions, and split by group exactly as the encoder trainer does."""
    from mmrag.encoders.lite import LiteEncoder
    from mmrag.encoders.pairs import default_cache_dir

    pairs = load_pairs(data, group_key)
    if len(pairs) < 4:
        raise ValueError(f"need at least 4 documents with text and an image, found {len(pairs)}")
    lite = LiteEncoder(LiteEncoderConfig(image_size=model.config.image_size), batch_size=64)
    image_feats, _ = extract_features(pairs, lite, cache_dir or default_cache_dir(), progress)
    train, validation, heldout = three_way_split(pairs.groups, holdout, seed)
    hashes = [pairs.images[i].sha256 or "" for i in train]
    dup = match_matrix([pairs.texts[i] for i in train], hashes)
    return PairData(
        pairs,
        torch.from_numpy(image_feats),
        [model.encode_text(t) for t in pairs.texts],
        train,
        validation,
        heldout,
        torch.from_numpy(dup),
    )


def pair_row(model: FrozenLM, data: PairData, i: int, targets: bool = True) -> TokenRow:
    """`[prefix(v_i)] caption_i <eos>`, the caption and <eos> as targets."""
    eos = model.tokenizer.eos_token_id
    ids = [IMAGE_SLOT, *data.captions[i], eos]
    return TokenRow(ids, [i], [False] + [targets] * (len(ids) - 1))


def query_row(
    model: FrozenLM, data: PairData, i: int, kind: str, j: int, template: int
) -> TokenRow:
    """The context after which `[RET]` must retrieve image i: plain, interleaved or chat."""
    if kind == "interleaved":
        return pair_row(model, data, j, targets=False) + TokenRow(list(data.captions[i]))
    if kind == "chat":
        request = REQUEST_TEMPLATES[template].format(data.pairs.texts[i])
        return chat_row(model, [Message("user", [request])])
    return TokenRow(list(data.captions[i]))


def split_matches(data: PairData, index: np.ndarray) -> torch.Tensor:
    """(N, N) bool: pairs of the split sharing a caption or an image (both count as hits)."""
    hashes = [data.pairs.images[int(i)].sha256 or "" for i in index]
    return torch.from_numpy(match_matrix(data.texts(index), hashes))
