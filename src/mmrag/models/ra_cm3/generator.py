"""The RA-CM3 generator: a decoder-only transformer over the joint token space, with a KV cache.

Pre-norm blocks (RMSNorm), rotary position embeddings (RoPE, Su et al. 2021) on queries and
keys, fused attention (`scaled_dot_product_attention`), SwiGLU MLPs (Shazeer 2020), untied
output head. The whole forward pass is in this file.

Batches of prompts with different lengths are left-padded and passed with `attention_mask`
(True = real token): each row's positions count its real tokens only, and no real token
attends to a pad, so a padded row computes what it would compute alone. The KV cache keeps
which of its slots hold real tokens, so decoding after a padded prefill stays exact.

Sizing the `small` preset (presets/generator-small.json) to train in about an hour on 2 CPU
cores:
- Tokens per sequence. One emoji document is `<img alt="` + caption (~6-12 BPE tokens) +
  `" src="` + 256 image codes + `">` ~ 265 tokens; with K = 2 retrieved documents prepended
  (RA-CM3 section 3.3) plus `<bos>`, two `<sep>`, `<eos>` and up to 4 sentinels that is ~800
  tokens (K sampled in {0, 1, 2} averages ~530). max_seq_len = 1024 leaves room.
- Cost per trained token ~ 6 N (N: parameters touched per token) + 12 L T d (attention at
  T ~ 800), so at this length attention costs as much as the MLPs once d <= ~200: width is
  the expensive knob, depth the cheap one.
- Step times per width and depth on these CPUs are in docs/benchmarks.md ("Measurements behind
  defaults"); on shared cores train with `torch.set_num_threads(1)`.
- An hour of CPU training is a few passes over the emoji set (3.3k training documents x ~800
  tokens with K = 2), whose main
  documents hold only ~0.9M distinct tokens. Compute-optimal scaling (Hoffmann et al. 2022,
  ~20 tokens per parameter) would ask for ~0.6M parameters, but that is the data-unlimited
  regime; with ~1M distinct target tokens repeated a few times, a few million parameters
  is where the loss keeps falling without memorising in an hour.
- Chosen: d = 192, 6 layers, 6 heads of 32, SwiGLU hidden 512 (~8/3 d), vocab 1600 (13
  specials and sentinels + 1024 BPE + 512 codes = 1549, rounded up to a multiple of 64):
  2.66M parameters in the blocks + 0.61M in the embedding and head.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn import functional

from mmrag.config import Config, ConfigError
from mmrag.torchscript import script

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class GeneratorConfig(Config):
    """Decoder-only transformer sizes. `vocab_size` >= the tokenizer's vocab_size."""

    preset_prefix: ClassVar[str] = "generator"

    vocab_size: int = 1600
    dim: int = 192
    n_layers: int = 6
    n_heads: int = 6
    mlp_hidden: int = 512  # SwiGLU inner width (~ 8/3 * dim, rounded)
    max_seq_len: int = 1024
    rope_theta: float = 10_000.0
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Image grid position embeddings (DALL-E's row and column embeddings): token ids in
    # [image_first, image_first + image_count) are image codes; the i-th code of a run of
    # consecutive codes sits at row (i mod g^2) // g, column i mod g of a g x g grid
    # (g = image_grid; 0 = off). Attention can then align a retrieved image with the one being
    # written by grid cell, whatever the captions' lengths between them.
    image_grid: int = 0
    image_first: int = 0
    image_count: int = 0
    # Copy hints (0 = off): for each token that predicts a cell of the image being written,
    # the codes that up to `hint_slots` retrieved images hold at that cell (of `hint_codes`
    # codes), in rank order, each added through its slot's embedding table. A direct path
    # from a retrieved image to the cell being drawn (see `Generator.forward`).
    hint_slots: int = 0
    hint_codes: int = 0
    # Text copy hints (needs hint slots): for each token that predicts a token of the caption
    # being written, the token each retrieved caption suggests next (copy_hints.suggest),
    # stored in the hints as hint_codes + token id and added as its input embedding through
    # the slot's D x D map (zero at initialisation).
    text_hints: bool = False

    def validate(self) -> None:
        if min(self.vocab_size, self.dim, self.n_layers, self.n_heads, self.mlp_hidden) < 1:
            raise ConfigError("GeneratorConfig: sizes must be positive")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ConfigError("GeneratorConfig: dim / n_heads must be an even integer (RoPE)")
        if self.max_seq_len < 1 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("GeneratorConfig: max_seq_len >= 1, dropout in [0, 1)")
        if self.image_grid < 0 or (
            self.image_grid
            and not (
                self.image_count > 0
                and self.image_first >= 0
                and self.image_first + self.image_count <= self.vocab_size
            )
        ):
            raise ConfigError(
                "GeneratorConfig: image_grid >= 0; with a grid, image_first + image_count "
                "(> 0) must fit in vocab_size"
            )
        if self.hint_slots < 0 or (self.hint_slots > 0) != (self.hint_codes > 0):
            raise ConfigError("GeneratorConfig: hint_slots >= 0, and hint_codes > 0 with them")
        if self.text_hints and not self.hint_slots:
            raise ConfigError("GeneratorConfig: text_hints needs hint_slots")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# --- KV cache -----------------------------------------------------------------------------


@dataclasses.dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per layer, in preallocated slots."""

    keys: list[torch.Tensor]  # per layer (B, H, S_max, Dh)
    values: list[torch.Tensor]  # per layer (B, H, S_max, Dh)
    valid: torch.Tensor  # (B, S_max) bool: the slot holds a real token (not padding)
    next_position: torch.Tensor  # (B,) int64: RoPE position of each row's next real token
    image_run: torch.Tensor  # (B,) int64: image codes at the end of each row (grid positions)
    length: int = 0  # slots filled
    # The first `unpadded_prefix` slots are known to hold real tokens (no padding to mask).
    unpadded_prefix: int = 0

    def unpadded(self, slots: int) -> bool:
        """Whether the first `slots` slots all hold real tokens (checked once, then known)."""
        if slots > self.unpadded_prefix and bool(self.valid[:, :slots].all()):
            self.unpadded_prefix = slots
        return slots <= self.unpadded_prefix

    @classmethod
    def empty(
        cls,
        config: GeneratorConfig,
        batch: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> KVCache:
        shape = (batch, config.n_heads, max_len, config.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
            next_position=torch.zeros(batch, dtype=torch.long, device=device),
            image_run=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


# --- building blocks --------------------------------------------------------------------------


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_len, head_dim / 2), for rotating pairs (x_i, x_{i + Dh/2})."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (S, Dh/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh); cos, sin (B, 1, T, Dh/2): rotate the two halves of each head."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, Dh/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None,
        start: int,
        causal: bool = True,
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).unbind(2)  # (B,T,H,Dh)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, Dh)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, H, T, Dh)
        v = v.transpose(1, 2)  # (B, H, T, Dh)
        if kv is not None:
            k_cache, v_cache = kv
            k_cache[:, :, start : start + t] = k
            v_cache[:, :, start : start + t] = v
            k, v = k_cache[:, :, : start + t], v_cache[:, :, : start + t]  # (B, H, S, Dh)
        y = functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,  # (B, 1, T, S) bool, True = may attend; None = plain causal
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and causal,  # not causal: one query that sees every key
        )  # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class SwiGLU(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.dim, config.mlp_hidden, bias=False)
        self.up = nn.Linear(config.dim, config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(functional.silu(self.gate(x)) * self.up(x))  # (B, T, D)


class Block(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = SwiGLU(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None,
        start: int,
        causal: bool = True,
    ) -> torch.Tensor:
        attn = self.attn(self.attn_norm(x), cos, sin, mask, kv, start, causal)  # (B, T, D)
        x = x + self.drop(attn)
        return x + self.drop(self.mlp(self.mlp_norm(x)))  # (B, T, D)


def _rms_norm(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return functional.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


def _blocks_step(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    weights: list[torch.Tensor],
    eps: list[float],
    start: int,
    heads: int,
    head_dim: int,
) -> torch.Tensor:
    """Every block's forward in evaluation for one new token that sees every cached slot
    (writing its key and value into the cache), as one function TorchScript can run without
    Python between operators: the same operations on the same weights as `Block.forward`.
    Per block, `weights` holds: attention norm, qkv, out, MLP norm, gate, up, down; `eps` the
    two norms' epsilons."""
    b, dim = x.shape[0], x.shape[-1]
    for i in range(len(keys)):
        w = weights[7 * i : 7 * i + 7]
        k_cache, v_cache = keys[i], values[i]
        h = functional.rms_norm(x, [dim], w[0], eps[2 * i])
        qkv = functional.linear(h, w[1]).view(b, 3 * heads, head_dim)  # (B, 3H, Dh)
        qk = apply_rope(qkv[:, None, : 2 * heads], cos, sin)  # (B, 1, 2H, Dh)
        q = qk[:, :, :heads].transpose(1, 2)  # (B, H, 1, Dh)
        k_cache[:, :, start : start + 1] = qk[:, :, heads:].transpose(1, 2)
        v_cache[:, :, start : start + 1] = qkv[:, None, 2 * heads :].transpose(1, 2)
        y = functional.scaled_dot_product_attention(
            q, k_cache[:, :, : start + 1], v_cache[:, :, : start + 1]
        )  # (B, H, 1, Dh)
        x = x + functional.linear(y.transpose(1, 2).reshape(b, 1, -1), w[2])
        h = functional.rms_norm(x, [dim], w[3], eps[2 * i + 1])
        hidden = functional.silu(functional.linear(h, w[4])) * functional.linear(h, w[5])
        x = x + functional.linear(hidden, w[6])
    return x


@functools.cache
def _blocks_step_fn() -> Any:
    """`_blocks_step` compiled by TorchScript (one call per token instead of ~30 operator
    dispatches from Python per block), or the function itself where torch cannot script it."""
    return script(_blocks_step, "the decoding step") or _blocks_step


# --- the model --------------------------------------------------------------------------------


class Generator(nn.Module):
    """ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.image_rows: nn.Embedding | None = None
        self.image_cols: nn.Embedding | None = None
        if config.image_grid:
            self.image_rows = nn.Embedding(config.image_grid, config.dim)
            self.image_cols = nn.Embedding(config.image_grid, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        # GPT-2: scale the residual projections by 1/sqrt(2 * layers) so the sum stays O(1).
        for name, param in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(param, std=config.init_std / math.sqrt(2 * config.n_layers))
        # Built last, so that the other weights are initialised exactly as without hints: a
        # model that never gets hints is the plain model, whatever hint_slots says.
        self.hints: nn.Embedding | None = None
        if config.hint_slots:
            self.hints = nn.Embedding(config.hint_slots * config.hint_codes, config.dim)
            self._init(self.hints)
        # Zero maps: a model with text hints starts as the model without them.
        self.text_hint_maps: nn.Parameter | None = None
        if config.text_hints:
            self.text_hint_maps = nn.Parameter(
                torch.zeros(config.hint_slots, config.dim, config.dim)
            )

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.init_std)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def num_parameters(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel() - self.head.weight.numel()

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch` rows and up to `max_len` (default max_seq_len) slots."""
        return KVCache.empty(
            self.config,
            batch,
            max_len or self.config.max_seq_len,
            self.device,
            self.embed.weight.dtype,
        )

    def forward(
        self,
        ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        embeds: torch.Tensor | None = None,
        hints: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids (B, T) int64; attention_mask (B, T) bool (True = real token, False = padding);
        with `cache`, the T tokens continue the cached ones and are appended to the cache.
        `embeds` (B, T, D) replaces `ids` with input vectors (soft prompts, e.g. GILL's mapper
        output); exactly one of the two is given. `hints` (B, T, S) int64, S <= hint_slots:
        at each token, the code (0-based) that retrieved image s holds at the image cell the
        token predicts, with `text_hints` hint_codes + the token that retrieved caption s
        suggests next, or -1 (copy_hints.py builds them); None = no hints anywhere."""
        if (ids is None) == (embeds is None):
            raise ValueError("pass exactly one of ids and embeds")
        x = self.embed(ids) if ids is not None else embeds  # (B, T, D)
        assert x is not None
        if hints is not None:
            x = x + self._hint_vectors(hints, x.shape[:2])  # (B, T, D)
        b, t = x.shape[:2]
        device = x.device
        start = cache.length if cache is not None else 0
        if start + t > (cache.capacity if cache is not None else self.config.max_seq_len):
            raise ValueError(f"sequence of {start + t} tokens exceeds the cache / max_seq_len")
        real = (
            attention_mask.to(torch.bool)
            if attention_mask is not None
            else torch.ones(b, t, dtype=torch.bool, device=device)
        )  # (B, T)
        image_run = None
        if self.image_rows is not None:
            x, image_run = self._add_image_positions(x, ids, real, cache)
        first = (
            cache.next_position
            if cache is not None
            else torch.zeros(b, dtype=torch.long, device=device)
        )
        positions = (first[:, None] + real.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} >= max_seq_len")
        cos = self.rope_cos[positions][:, None]  # (B, 1, T, Dh/2)
        sin = self.rope_sin[positions][:, None]  # (B, 1, T, Dh/2)
        mask, causal = None, True
        if t == 1 and bool(real.all()) and (cache is None or bool(cache.valid[:, :start].all())):
            causal = False  # one new token and no padding: it sees every slot (fast path)
        elif cache is not None or attention_mask is not None:
            mask = self._mask(real, cache, start)  # (B, 1, T, S)
        for i, block in enumerate(self.blocks):
            kv = (cache.keys[i], cache.values[i]) if cache is not None else None
            x = block(x, cos, sin, mask, kv, start, causal)  # (B, T, D)
        if cache is not None:
            cache.valid[:, start : start + t] = real
            cache.next_position = first + real.long().sum(1)
            cache.length = start + t
            if image_run is not None:
                cache.image_run = image_run
        return self.head(self.norm(x))  # (B, T, V)

    @torch.inference_mode()
    def step(
        self, ids: torch.Tensor, cache: KVCache, hints: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits (B, V) after one new token per row: `forward(ids, cache=cache,
        hints=hints)[:, -1]`, bit for bit, in evaluation. Where every cached slot holds a real
        token (no left padding) it takes a path without module calls, masks or checks of the
        cache's padding, its blocks one TorchScript call (`_blocks_step`); otherwise it is
        `forward`."""
        if self.training or ids.shape[1] != 1 or not cache.unpadded(cache.length):
            return self(ids, cache=cache, hints=hints)[:, -1]
        start = cache.length
        if start + 1 > cache.capacity:
            raise ValueError(f"sequence of {start + 1} tokens exceeds the cache")
        x = functional.embedding(ids, self.embed.weight)  # (B, 1, D)
        if hints is not None:
            x = x + self._hint_vectors(hints, x.shape[:2])
        image_run = None
        if self.image_rows is not None:
            real = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            x, image_run = self._add_image_positions(x, ids, real, cache)
        positions = cache.next_position  # (B,)
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} >= max_seq_len")
        cos = self.rope_cos[positions][:, None, None]  # (B, 1, 1, Dh/2)
        sin = self.rope_sin[positions][:, None, None]
        weights, eps = self._step_weights()
        cfg = self.config
        x = _blocks_step_fn()(
            x, cos, sin, cache.keys, cache.values, weights, eps, start, cfg.n_heads, cfg.head_dim
        )
        cache.valid[:, start] = True
        cache.next_position = positions + 1
        cache.length = cache.unpadded_prefix = start + 1  # a real token after real ones
        if image_run is not None:
            cache.image_run = image_run
        return functional.linear(_rms_norm(self.norm, x), self.head.weight)[:, -1]  # (B, V)

    def _apply(self, fn: Any, recurse: bool = True) -> Generator:
        self.__dict__.pop("_step_weights_cache", None)  # .to(), .float(): tensors may change
        return super()._apply(fn, recurse)

    def _step_weights(self) -> tuple[list[torch.Tensor], list[float]]:
        """The blocks' weights in `_blocks_step`'s order, and their norms' epsilons; kept
        between steps (building it per token was a visible share of decoding) and rebuilt
        after a conversion (`_apply`: `.to()`, `.float()`) or when the first block's qkv weight is
        another object. Loading weights copies into the same tensors, so the list holds."""
        cached = self.__dict__.get("_step_weights_cache")
        first = self.blocks[0]
        assert isinstance(first, Block)
        if cached is not None and cached[0][1] is first.attn.qkv.weight:
            return cached
        weights: list[torch.Tensor] = []
        eps: list[float] = []
        for block in self.blocks:
            assert isinstance(block, Block)
            attn, mlp = block.attn, block.mlp
            weights += [block.attn_norm.weight, attn.qkv.weight, attn.out.weight]
            weights += [block.mlp_norm.weight, mlp.gate.weight, mlp.up.weight, mlp.down.weight]
            for norm in (block.attn_norm, block.mlp_norm):
                eps.append(norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps)
        self.__dict__["_step_weights_cache"] = (weights, eps)
        return weights, eps

    def _hint_vectors(self, hints: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(B, T, D): the sum over slots of each slot's embedding of its hinted code, and of
        its map of the hinted token's embedding."""
        cfg = self.config
        if hints.dim() != 3 or tuple(hints.shape[:2]) != tuple(shape):
            raise ValueError(f"hints must be (B, T, S) with (B, T) = {tuple(shape)}")
        if self.hints is None or hints.shape[2] > cfg.hint_slots:
            raise ValueError(f"the model takes {cfg.hint_slots} hint slots; got {hints.shape[2]}")
        top = cfg.hint_codes + (cfg.vocab_size if cfg.text_hints else 0)
        if bool(((hints >= top) | (hints < -1)).any()):  # one device sync, not two
            raise ValueError(f"hints must be in [0, {top}) or -1")
        image = (hints >= 0) & (hints < cfg.hint_codes)  # (B, T, S)
        slot = torch.arange(hints.shape[2], device=hints.device) * cfg.hint_codes  # (S,)
        vectors = self.hints(torch.where(image, hints + slot, 0))  # (B, T, S, D)
        vectors = vectors * image[..., None].to(vectors.dtype)
        if self.text_hint_maps is not None:
            text = hints >= cfg.hint_codes  # (B, T, S)
            words = self.embed(torch.where(text, hints - cfg.hint_codes, 0))  # (B, T, S, D)
            maps = self.text_hint_maps[: hints.shape[2]]  # (S, D, D)
            mapped = torch.einsum("btsd,sde->btse", words, maps)  # (B, T, S, D)
            vectors = vectors + mapped * text[..., None].to(vectors.dtype)
        return vectors.sum(2)  # (B, T, D)

    def _add_image_positions(
        self,
        x: torch.Tensor,
        ids: torch.Tensor | None,
        real: torch.Tensor,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x plus the row and column embeddings of its image codes; returns the run of image
        codes at the end of each row (for the cache). Input vectors (`embeds`) are not codes."""
        assert self.image_rows is not None and self.image_cols is not None
        cfg = self.config
        b, t = real.shape
        if ids is None:
            return x, torch.zeros(b, dtype=torch.long, device=x.device)
        is_code = (ids >= cfg.image_first) & (ids < cfg.image_first + cfg.image_count) & real
        slots = torch.arange(t, device=x.device).expand(b, t)  # (B, T)
        last_other = torch.where(is_code, -1, slots).cummax(dim=1).values  # (B, T)
        index = slots - last_other - 1  # (B, T): index of each code in its run
        if cache is not None:  # a run that started before this chunk continues
            index = index + torch.where(last_other < 0, cache.image_run[:, None], 0)
        cell = index.clamp(min=0) % (cfg.image_grid * cfg.image_grid)
        grid = self.image_rows(cell // cfg.image_grid) + self.image_cols(cell % cfg.image_grid)
        x = x + grid * is_code[..., None].to(x.dtype)  # (B, T, D)
        return x, torch.where(is_code[:, -1], index[:, -1] + 1, 0)  # t >= 1

    @staticmethod
    def _mask(real: torch.Tensor, cache: KVCache | None, start: int) -> torch.Tensor:
        """(B, 1, T, S) bool: query i (slot start + i) may see slot j <= start + i that holds a
        real token. Every query also sees itself, so pad rows stay finite (their outputs are
        never used; real tokens never see pads)."""
        t = real.shape[1]
        earlier = cache.valid[:, :start] if cache is not None else real[:, :0]
        keys = torch.cat([earlier, real], dim=1)  # (B, S)
        slots = torch.arange(start + t, device=real.device)  # (S,)
        query_slots = slots[start:, None]  # (T, 1)
        causal = slots[None, :] <= query_slots  # (T, S)
        own = slots[None, :] == query_slots  # (T, S)
        return ((causal[None] & keys[:, None, :]) | own[None])[:, None]  # (B, 1, T, S)

    @torch.no_grad()
    def generate_greedy(
        self, ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Greedy continuation with the KV cache: (B, T) -> (B, T + max_new_tokens). The
        reference that `decoding.py`'s samplers build on; prompts may be left-padded."""
        cache = self.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
        logits = self(ids, attention_mask=attention_mask, cache=cache)  # (B, T, V)
        out = [ids]
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(token)
            if step + 1 < max_new_tokens:
                logits = self(token, cache=cache)  # (B, 1, V)
        return torch.cat(out, dim=1)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` and `model.safetensors`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save(out / CONFIG_FILE)
        save_model(self, str(out / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: torch.device | str = "cpu"
    ) -> Generator:
        """Build from `config.json`, load `model.safetensors` strictly, eval mode."""
        src = Path(directory)
        model = cls(GeneratorConfig.load(src / CONFIG_FILE))
        load_model(model, str(src / WEIGHTS_FILE), strict=True)
        return model.to(device).eval()
