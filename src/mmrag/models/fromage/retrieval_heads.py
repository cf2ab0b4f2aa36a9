"""FROMAGe's retrieval heads refitted on cached `[RET]` states, and the recall that scores them.

Why a second stage: in the joint stage each step sees 16 queries, each costing a forward pass
of the frozen LM, so 300 steps show the contrastive loss each pair only ~2 times, where the
`lite` encoder's heads (same image features) needed ~30 epochs. Once the `[RET]` row is
trained, the hidden state at `[RET]` after a context no longer changes, so it is computed
once per context (plain caption, chat request, interleaved pair + caption) and W_t, W_i and
the temperature are fitted on these states for many epochs in large batches, in seconds,
keeping the epoch with the best validation recall (block-coordinate descent on the same
symmetric InfoNCE; the frozen LM and the `[RET]` row are untouched by this stage).
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from mmrag.metrics.retrieval import recall
from mmrag.models.fromage.model import FrozenLM, TokenRow
from mmrag.models.fromage.pairs import split_matches
from mmrag.training.losses import info_nce

if TYPE_CHECKING:
    from mmrag.models.fromage.pairs import PairData
    from mmrag.models.fromage.train_config import FromageTrainConfig

logger = logging.getLogger(__name__)

HEAD_PARAMETERS = ("text_proj", "image_proj", "logit_scale")


def plain_states(model: FrozenLM, data: PairData, index: np.ndarray) -> torch.Tensor:
    """(N, H) states at `[RET]` after each caption of the split."""
    rows = [TokenRow(list(data.captions[int(i)])) for i in index]
    return model.special_states(rows, [model.ret_id])[:, 0]


@torch.no_grad()
def states_recall(
    model: FrozenLM, states: torch.Tensor, data: PairData, index: np.ndarray
) -> dict[str, float]:
    """Caption -> image R@k of `[RET]` states over the split's images."""
    query = model.adapters.project_text(states)
    gallery = model.adapters.project_image(data.features[index])
    return recall(query @ gallery.T, split_matches(data, index))


def validation_recall(model: FrozenLM, data: PairData, index: np.ndarray) -> dict[str, float]:
    if len(index) < 2:
        return {}
    return states_recall(model, plain_states(model, data, index), data, index)


def training_contexts(
    model: FrozenLM, data: PairData, config: FromageTrainConfig
) -> tuple[list[TokenRow], np.ndarray]:
    """Each training pair's query as a plain caption, plus one of the joint stage's other
    forms (a chat request, or the caption after another pair; seeded), and the train
    position each context belongs to."""
    from mmrag.models.fromage.conversation import REQUEST_TEMPLATES
    from mmrag.models.fromage.pairs import query_row

    rng = np.random.default_rng([config.seed, 7])
    n = len(data.train)
    rows, owner = [], []
    for pos, i in enumerate(data.train):
        partner = int(data.train[(pos + 1 + rng.integers(n - 1)) % n])
        template = int(rng.integers(len(REQUEST_TEMPLATES)))
        other = "chat" if rng.random() < 0.5 else "interleaved"
        for kind in ("plain", other):
            rows.append(query_row(model, data, int(i), kind, partner, template))
            owner.append(pos)
    return rows, np.asarray(owner)


def refit_heads(
    model: FrozenLM, data: PairData, config: FromageTrainConfig, progress: bool = True
) -> list[dict[str, float]]:
    """Stage 2: fit W_t, W_i and the temperature on cached `[RET]` states (see the module
    docstring); the heads end at the best validation epoch. Returns the per-epoch history."""
    rows, owner = training_contexts(model, data, config)
    logger.info("caching [RET] states of %d training contexts", len(rows))
    states = model.special_states(rows, [model.ret_id], data.features)[:, 0]  # (C, H)
    val_states = plain_states(model, data, data.validation) if len(data.validation) > 1 else None
    params = [p for n, p in model.adapters.named_parameters() if n.split(".")[0] in HEAD_PARAMETERS]
    optimizer = torch.optim.AdamW(params, lr=config.head_lr, weight_decay=1e-4)
    owners = torch.from_numpy(owner)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    for epoch in tqdm(range(1, config.head_epochs + 1), desc="heads", disable=not progress):
        perm = torch.randperm(len(states), generator=generator)
        total = 0.0
        for start in range(0, len(perm), config.head_batch):
            b = perm[start : start + config.head_batch]
            pos = owners[b]
            query = model.adapters.project_text(states[b])
            images = model.adapters.project_image(data.features[data.train[pos.numpy()]])
            loss = info_nce(query, images, model.adapters.logit_scale, data.duplicates[pos][:, pos])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.adapters.clamp_()
            total += float(loss.detach()) * len(b)
        row = {"head_epoch": float(epoch), "head_loss": total / len(states)}
        if val_states is not None:
            scores = states_recall(model, val_states, data, data.validation)
            row |= {f"val_{k}": v for k, v in scores.items()}
            mean = float(np.mean(list(scores.values())))
            if best is None or mean > best[0]:
                best = (mean, copy.deepcopy(model.adapters.state_dict()))
        history.append(row)
    if best is not None:
        model.adapters.load_state_dict(best[1])
        logger.info("heads: best validation mean recall %.4f", best[0])
    return history
