"""A BERT encoder's forward over packed texts as one TorchScript call, run without the GIL.

The `lite` text tower is Hugging Face's `BertModel` (all-MiniLM-L6-v2). Through the module
forward a batch is ~150 small operator calls, each of which takes Python's GIL back when its
kernel returns. In a server the event loop and the search threads hold the GIL much of the
time, so the encoder thread spent a large share of each forward waiting for it
(docs/benchmarks.md, "Serving"). A TorchScript function runs its whole body in C++ with the
GIL released (`mmrag.torchscript`): the same ATen kernels, one acquisition per batch instead
of one per operator.

Texts are packed, not padded (as text-embeddings-inference does): the tokens of all texts of a
batch go through the per-token operators as one (L, H) matrix, and attention runs per group of
texts of one token count. Batching by token count alone splits a batch of varied queries into
forwards of a few rows each (docs/benchmarks.md, "Serving"). Packed, a row is what the
module forward gives for its text alone to the float rounding of a matrix product with more
rows (most rows bit for bit; tests hold 1e-6).

Only what `TextTower` uses is written out: absolute positions, token type 0, GELU (erf), mean
pooling, L2.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

from mmrag.torchscript import script


def _pooled(
    ids: Tensor,
    positions: Tensor,
    counts: list[int],
    lengths: list[int],
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    layers: list[Tensor],
    heads: int,
    eps: float,
) -> Tensor:
    """Packed texts -> (N, H) L2-normalised means of their last hidden states.

    `ids` and `positions` (L,) hold the tokens of all texts end to end: first counts[0] texts
    of lengths[0] tokens, then counts[1] of lengths[1], ... Every per-token operator (the
    embeddings, linears, norms: nearly all the arithmetic) runs once over all L tokens;
    attention and pooling run per group of one length, as a (count, length) batch."""
    hidden = norm_weight.shape[0]
    head_dim = hidden // heads
    scale = float(head_dim) ** -0.5
    # BertEmbeddings: (word + token type 0) + position, then LayerNorm (dropout is off).
    x = functional.embedding(ids, word) + token_type[0]
    x = x + functional.embedding(positions, position)
    x = functional.layer_norm(x, [hidden], norm_weight, norm_bias, eps)
    # Per layer, `layers` holds in this order: q, k, v, attention out, intermediate, output
    # (weight, bias each), then the two LayerNorms (weight, bias each).
    per_layer = 16
    for i in range(len(layers) // per_layer):
        w = layers[i * per_layer : (i + 1) * per_layer]
        q = functional.linear(x, w[0], w[1])
        k = functional.linear(x, w[2], w[3])
        v = functional.linear(x, w[4], w[5])
        parts: list[Tensor] = []
        start = 0
        for g in range(len(counts)):
            b, t = counts[g], lengths[g]
            end = start + b * t
            qg = q[start:end].view(b, t, heads, head_dim).transpose(1, 2)
            kg = k[start:end].view(b, t, heads, head_dim).transpose(1, 2)
            vg = v[start:end].view(b, t, heads, head_dim).transpose(1, 2)
            ag = functional.scaled_dot_product_attention(qg, kg, vg, None, 0.0, False, scale=scale)
            parts.append(ag.transpose(1, 2).contiguous().reshape(b * t, hidden))
            start = end
        a = functional.linear(torch.cat(parts), w[6], w[7])
        x = functional.layer_norm(a + x, [hidden], w[12], w[13], eps)
        h = functional.gelu(functional.linear(x, w[8], w[9]))
        h = functional.linear(h, w[10], w[11])
        x = functional.layer_norm(h + x, [hidden], w[14], w[15], eps)
    means: list[Tensor] = []
    start = 0
    for g in range(len(counts)):
        b, t = counts[g], lengths[g]
        end = start + b * t
        means.append(x[start:end].view(b, t, hidden).mean(dim=1))
        start = end
    return functional.normalize(torch.cat(means), dim=-1)


@functools.cache
def _script() -> Any:
    """`_pooled` compiled by TorchScript (`mmrag.torchscript`), or None."""
    return script(_pooled, "the BERT forward")


def supports(model: Any) -> bool:
    """Whether `model` is a plain BERT encoder this forward reproduces, and torch can script it."""
    config = getattr(model, "config", None)
    return (
        config is not None
        and getattr(config, "model_type", None) == "bert"
        and getattr(config, "hidden_act", None) == "gelu"
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and not getattr(config, "is_decoder", False)
        and not getattr(config, "add_cross_attention", False)
        and _script() is not None
    )


class ScriptedBert:
    """`BertModel`'s weights (shared, not copied) and its pooled forward as one script call."""

    def __init__(self, model: Any) -> None:
        if not supports(model):
            raise ValueError("ScriptedBert: not a plain BERT encoder, or no TorchScript here")
        emb = model.embeddings
        self.word = emb.word_embeddings.weight
        self.position = emb.position_embeddings.weight
        self.token_type = emb.token_type_embeddings.weight
        self.norm_weight, self.norm_bias = emb.LayerNorm.weight, emb.LayerNorm.bias
        self.eps = float(model.config.layer_norm_eps)
        self.heads = int(model.config.num_attention_heads)
        self.layers: list[Tensor] = []
        for layer in model.encoder.layer:
            att, out = layer.attention, layer.output
            linears = [
                att.self.query,
                att.self.key,
                att.self.value,
                att.output.dense,
                layer.intermediate.dense,
                out.dense,
            ]
            for linear in linears:
                self.layers += [linear.weight, linear.bias]
            for norm in (att.output.LayerNorm, out.LayerNorm):
                self.layers += [norm.weight, norm.bias]
        self._fn = _script()

    def __call__(self, token_ids: Sequence[Sequence[int]]) -> Tensor:
        """Texts' token ids (unpadded, any lengths) -> (N, H) L2-normalised mean-pooled
        states, in the order given."""
        if not token_ids:
            return torch.zeros((0, self.word.shape[1]), dtype=self.word.dtype)
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        counts: list[int] = []
        lengths: list[int] = []
        for i in order:
            if lengths and lengths[-1] == len(token_ids[i]):
                counts[-1] += 1
            else:
                counts.append(1)
                lengths.append(len(token_ids[i]))
        device = self.word.device
        ids = torch.tensor([t for i in order for t in token_ids[i]], device=device)
        positions = torch.cat(
            [torch.arange(t, device=device).repeat(b) for b, t in zip(counts, lengths, strict=True)]
        )
        rows: Tensor = self._fn(
            ids,
            positions,
            counts,
            lengths,
            self.word,
            self.position,
            self.token_type,
            self.norm_weight,
            self.norm_bias,
            self.layers,
            self.heads,
            self.eps,
        )
        out = torch.empty_like(rows)
        out[torch.tensor(order, device=device)] = rows
        return out
