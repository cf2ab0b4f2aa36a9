"""GILL's stage-1 objective (train.py): the `[IMG]` contexts, the retrieval and mapper
losses, and the module DDP wraps. Under torchrun each rank takes a slice of the global batch;
image -> text InfoNCE scores its images against every rank's queries (gathered with
gradients), so the sum over ranks is the one-process loss."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from mmrag.models.fromage.model import FrozenLM
from mmrag.models.gill.data import GillData, context_rows
from mmrag.models.gill.model import GillHeads
from mmrag.models.gill.train_config import GillTrainConfig
from mmrag.training import distributed
from mmrag.training.losses import contrastive, masked_l2


def head_losses(
    model: FrozenLM,
    heads: GillHeads,
    data: GillData,
    states: torch.Tensor,
    pairs: torch.Tensor,
    positions: torch.Tensor,
    batch: tuple[torch.Tensor, int, distributed.DistEnv] | None = None,
) -> dict[str, torch.Tensor]:
    """Retrieval and mapper losses (summed over rows) from [IMG] states (B, r, H). `batch`:
    the global batch's positions, this rank's first row in it and the job (under torchrun
    image -> text scores this rank's images against every rank's queries)."""
    pd = data.pairs
    query = heads.query(states[:, 0])  # (B, R)
    with torch.no_grad():
        gallery = model.adapters.project_image(pd.features[pd.train])  # FROMAGe's W_i, frozen
    scale = model.adapters.logit_scale.detach()
    exclude = pd.duplicates[positions]
    t2i = contrastive(query, gallery, scale, positions, exclude, reduction="sum")
    everyone, start, env = batch or (positions, 0, distributed.DistEnv())
    targets = torch.arange(start, start + len(query))
    keys = distributed.gather_rows(query, env)  # (B_global, R)
    i2t = contrastive(gallery[positions], keys, scale, targets, exclude[:, everyone], "sum")
    embeds = model.adapters.img_tokens[None].expand(len(states), -1, -1)
    vectors, length_logits = heads.mapper(states, embeds)
    lengths = data.lengths[pairs]
    mask = torch.arange(vectors.shape[1])[None] < lengths[:, None]  # (B, Q)
    l2 = masked_l2(vectors, data.targets[pairs], mask) / data.target_scale * len(states)
    length = functional.cross_entropy(length_logits, lengths - 1, reduction="sum")
    return {"contrastive": (t2i + i2t) / 2, "l2": l2, "length": length}


class GillObjective(nn.Module):
    def __init__(
        self,
        model: FrozenLM,
        heads: GillHeads,
        data: GillData,
        config: GillTrainConfig,
        env: distributed.DistEnv,
    ) -> None:
        super().__init__()
        self.model, self.heads, self.data, self.config = model, heads, data, config
        self.env = env

    def forward(
        self, everyone: np.ndarray, local: slice, chat: list[bool], templates: list[int]
    ) -> dict[str, torch.Tensor]:
        model, cfg, pd, total = self.model, self.config, self.data.pairs, len(everyone)
        positions = everyone[local]
        pairs = pd.train[positions]
        rows = context_rows(model, pd, pairs, chat, templates)
        with torch.no_grad():
            last, state = model.prefill(rows)
        target = torch.full((len(rows),), model.img_ids[0], dtype=torch.long)
        nll = functional.cross_entropy(model.logits(last), target, reduction="sum")
        states = model.special_hidden(state, list(model.img_ids))  # (b, r, H)
        batch = (torch.as_tensor(everyone), local.start, self.env)
        parts = head_losses(
            model,
            self.heads,
            self.data,
            states,
            torch.as_tensor(pairs),
            torch.as_tensor(positions),
            batch,
        )
        parts = {k: v / total for k, v in parts.items()} | {"nll": nll / total}
        parts["loss"] = (
            cfg.nll_weight * parts["nll"]
            + cfg.contrastive_weight * parts["contrastive"]
            + cfg.l2_weight * parts["l2"]
            + cfg.length_weight * parts["length"]
        )
        return parts
