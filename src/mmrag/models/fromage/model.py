"""FROMAGe (Koh et al. 2023) on a frozen causal LM: the visual prefix, the `[RET]` token and the
retrieval heads, plus GILL's `[IMG0..r-1]` tokens; batched, KV-cached forward and generation.

The LM is never modified: new tokens are extra rows beside it, looked up for ids >= V and
tied as output embeddings (`h @ [E; new rows]^T`, as SmolLM2 ties its own). Only these train
(docs/method.md §2-3): `visual_prefix` (W_c: pooled 1280-d EfficientNet-Lite0 feature -> k input
embeddings where the image occurs); `ret_token` (`[RET]`) and `img_tokens` (GILL's rows),
rescaled to the frozen rows' mean norm after every step (`rescale_new_tokens`); `text_proj`
(W_t: hidden state at `[RET]` -> retrieval space), `image_proj` (W_i) and `logit_scale`.

A token row is a list of ids in which `IMAGE_SLOT` marks an image (`assemble` expands it into
k prefix vectors). Rows are left-padded and positions count real tokens only, so a padded row
computes what it computes alone (RoPE is relative).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional

from mmrag.config import Config, ConfigError
from mmrag.fileio import save_weights
from mmrag.models.fromage.language_model import LanguageModel, load_smollm2, tiny_language_model
from mmrag.sampling import Sampling, sample_next

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "adapters.safetensors"
IMAGE_SLOT = -1  # in a token row: an image's k prefix vectors go here
PAD_SLOT = -2  # in an assembled id grid: left padding
SHARED_MIN = 8  # a common beginning this long is computed once per batch
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")  # "3.5" is not an end
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100
RET, IMG = "[RET]", "[IMG{}]"


@dataclasses.dataclass(frozen=True)
class FrozenLMConfig(Config):
    """The frozen LM and the sizes of the parts trained around it."""

    preset_prefix: ClassVar[str] = "frozen-lm"

    lm: Literal["smollm2", "tiny"] = "smollm2"  # tiny: a random 2-layer Llama (tests)
    image_feature_dim: int = 1280  # EfficientNet-Lite0 pooled features
    image_size: int = 128  # the image tower's input side (as the lite encoder)
    prefix_tokens: int = 4  # k: LM input embeddings per image (the paper tried 1 and 4)
    retrieval_dim: int = 256  # the shared [RET] / image space (the paper's 256)
    img_tokens: int = 8  # GILL's r
    temperature_init: float = 0.07

    def validate(self) -> None:
        if min(self.image_feature_dim, self.prefix_tokens, self.retrieval_dim) < 1:
            raise ConfigError("FrozenLMConfig: feature dim, prefix_tokens, retrieval_dim >= 1")
        if self.img_tokens < 1 or self.temperature_init <= 0 or self.image_size < 32:
            raise ConfigError("FrozenLMConfig: img_tokens >= 1, temperature > 0, image_size >= 32")


def load_language_model(config: FrozenLMConfig, device: str = "cpu") -> LanguageModel:
    return load_smollm2(device=device) if config.lm == "smollm2" else tiny_language_model()


# --- batches of token rows ------------------------------------------------------------------


@dataclasses.dataclass
class TokenRow:
    """Token ids with `IMAGE_SLOT` markers; `images[i]` is the feature row of the i-th marker;
    `targets[j]` marks ids that are prediction targets (a loss on predicting them)."""

    ids: list[int]
    images: list[int] = dataclasses.field(default_factory=list)
    targets: list[bool] | None = None

    def __post_init__(self) -> None:
        if self.ids.count(IMAGE_SLOT) != len(self.images):
            raise ValueError("a TokenRow needs one feature index per IMAGE_SLOT")
        if self.targets is not None and len(self.targets) != len(self.ids):
            raise ValueError("targets must be as long as ids")

    def __add__(self, other: TokenRow) -> TokenRow:
        mine = self.targets or [False] * len(self.ids)
        theirs = other.targets or [False] * len(other.ids)
        return TokenRow(self.ids + other.ids, self.images + other.images, mine + theirs)


@dataclasses.dataclass
class Batch:
    embeds: torch.Tensor  # (B, T, H)
    mask: torch.Tensor  # (B, T) bool, False = left padding
    ids: torch.Tensor  # (B, T) long: token ids, IMAGE_SLOT for prefix vectors, PAD_SLOT
    targets: torch.Tensor  # (B, T) bool: the id at this position is a prediction target


@dataclasses.dataclass
class LMState:
    """The KV cache of the rows seen so far, which of its slots are real, next positions."""

    cache: Any  # transformers DynamicCache
    mask: torch.Tensor  # (B, S) bool
    next_position: torch.Tensor  # (B,) long

    def repeat(self, n: int) -> LMState:
        """Each row repeated n times (rows i*n .. i*n+n-1 continue row i): a copy."""
        from transformers import DynamicCache

        layers = [(lay.keys, lay.values) for lay in self.cache.layers]
        data = [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in layers]
        return LMState(
            DynamicCache(ddp_cache_data=data),
            self.mask.repeat_interleave(n, 0),
            self.next_position.repeat_interleave(n, 0),
        )


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """Decoding settings. `ret_bias` / `img_bias`: added to the `[RET]` / `[IMG0]` logits (an
    additive log-prior for FROMAGe's / GILL's multiplicative scale factors, whatever the sign)."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    ret_bias: float = 0.0
    img_bias: float = 0.0
    allow_ret: bool = True
    allow_img: bool = True
    stop_ids: tuple[int, ...] | None = None  # default: the tokenizer's eos
    seed: int | None = None
    max_sentences: int | None = None  # end a row after this many sentences
    max_repeats: int | None = None  # end a row when one token comes this many times in a row


@dataclasses.dataclass
class Generation:
    """Generated ids; per new token fed back, (its index in `tokens`, its hidden state (H,))."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    hidden: list[tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)


def shared_prefix(rows: Sequence[TokenRow]) -> int:
    """The longest image-free beginning all rows share, leaving each a token of its own."""
    first, n = rows[0].ids, 0
    limit = min(len(r.ids) for r in rows) - 1
    while n < limit and first[n] != IMAGE_SLOT and all(r.ids[n] == first[n] for r in rows):
        n += 1
    return n


# --- the trained parts ----------------------------------------------------------------------


class Adapters(nn.Module):
    """Everything FROMAGe trains, plus GILL's token rows (trained by GILL's trainer)."""

    def __init__(self, config: FrozenLMConfig, hidden: int, init_rows: torch.Tensor) -> None:
        super().__init__()
        f, r = config.image_feature_dim, config.retrieval_dim
        self.prefix_tokens = config.prefix_tokens
        self.visual_prefix = nn.Linear(f, config.prefix_tokens * hidden)
        self.ret_token = nn.Parameter(init_rows[:1].clone())  # (1, H)
        self.img_tokens = nn.Parameter(init_rows[1 : 1 + config.img_tokens].clone())  # (r, H)
        self.text_proj = nn.Linear(hidden, r)
        self.image_proj = nn.Linear(f, r)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature_init)))

    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) image features -> (N, k, H) input embeddings."""
        return self.visual_prefix(features).view(len(features), self.prefix_tokens, -1)

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        return functional.normalize(self.image_proj(features), dim=-1)  # (N, R)

    def project_text(self, hidden: torch.Tensor) -> torch.Tensor:
        return functional.normalize(self.text_proj(hidden), dim=-1)  # (N, R)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


class FrozenLM(nn.Module):
    """A frozen LM with FROMAGe's adapters. The LM is held outside the module tree, so
    `state_dict()` (and every checkpoint) holds the adapters only."""

    def __init__(self, config: FrozenLMConfig, lm: LanguageModel) -> None:
        super().__init__()
        self.config = config
        self.language_model = lm  # a plain dataclass: not registered as a submodule
        self.vocab = lm.vocab_size
        table = self.table
        norms = table.norm(dim=1)
        self.target_norm = float(norms.mean())
        generator = torch.Generator().manual_seed(0)
        init = table.mean(0) + table.std(0) * torch.randn(
            1 + config.img_tokens, table.shape[1], generator=generator
        )  # (1 + r, H): frozen-row statistics
        init = functional.normalize(init, dim=-1) * self.target_norm
        self.adapters = Adapters(config, lm.hidden_size, init)
        self.ret_id = self.vocab
        self.img_ids = tuple(range(self.vocab + 1, self.vocab + 1 + config.img_tokens))

    @property
    def table(self) -> torch.Tensor:
        """The frozen input (= output) embedding table (V, H)."""
        return self.language_model.model.get_input_embeddings().weight

    @property
    def tokenizer(self) -> Any:
        return self.language_model.tokenizer

    @property
    def new_rows(self) -> torch.Tensor:
        return torch.cat([self.adapters.ret_token, self.adapters.img_tokens])  # (1 + r, H)

    def token_name(self, token: int) -> str:
        if token == self.ret_id:
            return RET
        if token in self.img_ids:
            return IMG.format(token - self.img_ids[0])
        return str(self.tokenizer.decode([token]))

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode_text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode([t for t in ids if 0 <= t < self.vocab]))

    # --- embeddings and logits ------------------------------------------------------------

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(…) ids, frozen or new -> (…, H) input embeddings."""
        base = functional.embedding(ids.clamp(0, self.vocab - 1), self.table)
        new = self.new_rows[(ids - self.vocab).clamp(0, len(self.new_rows) - 1)]
        return torch.where((ids >= self.vocab)[..., None], new, base)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, H) -> (…, V + 1 + r) next-token logits over the frozen and the new tokens."""
        return torch.cat([hidden @ self.table.T, hidden @ self.new_rows.T], dim=-1)

    @torch.no_grad()
    def rescale_new_tokens(self, names: Sequence[str] = ("ret_token", "img_tokens")) -> None:
        """FROMAGe: after each step, the new rows get the mean norm of the frozen rows."""
        for rows in (getattr(self.adapters, name) for name in names):
            rows.copy_(functional.normalize(rows, dim=-1) * self.target_norm)

    @torch.no_grad()
    def calibrate_prefix(self, features: torch.Tensor) -> None:
        """Scale the fresh W_c so prefix vectors start at the frozen rows' mean norm (with the
        default init, pooled EfficientNet features of norm ~32 give vectors ~4x the norm of a
        token embedding)."""
        norm = self.adapters.prefix(features).norm(dim=-1).mean()
        self.adapters.visual_prefix.weight.mul_(self.target_norm / float(norm))
        self.adapters.visual_prefix.bias.zero_()

    def assemble(self, rows: Sequence[TokenRow], features: torch.Tensor | None = None) -> Batch:
        """Left-padded input embeddings of `rows`; `features` (N, F) are indexed by the rows'
        `images`. Each IMAGE_SLOT becomes k prefix positions (never targets)."""
        k = self.config.prefix_tokens
        grids: list[list[int]] = []
        flags: list[list[bool]] = []
        order: list[int] = []  # feature row of each image occurrence, in reading order
        for row in rows:
            grid: list[int] = []
            flag: list[bool] = []
            wanted = row.targets or [False] * len(row.ids)
            for token, target in zip(row.ids, wanted, strict=True):
                if token == IMAGE_SLOT:
                    grid += [IMAGE_SLOT] * k
                    flag += [False] * k
                else:
                    grid.append(token)
                    flag.append(target)
            grids.append(grid)
            flags.append(flag)
            order += row.images
        width = max(len(g) for g in grids)
        ids = torch.full((len(rows), width), PAD_SLOT, dtype=torch.long)
        targets = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (grid, flag) in enumerate(zip(grids, flags, strict=True)):
            ids[i, width - len(grid) :] = torch.tensor(grid, dtype=torch.long)
            targets[i, width - len(flag) :] = torch.tensor(flag, dtype=torch.bool)
        device = self.table.device
        ids, targets = ids.to(device), targets.to(device)
        embeds = self.embed_ids(ids.clamp(min=0))  # (B, T, H); slots filled below
        if order:
            if features is None:
                raise ValueError("rows hold images but no features were given")
            prefix = self.adapters.prefix(features[torch.tensor(order, device=device)])
            slots = ids == IMAGE_SLOT  # (B, T), k per image, in reading order
            embeds = embeds.masked_scatter(slots[..., None], prefix.reshape(-1, prefix.shape[-1]))
        return Batch(embeds, ids != PAD_SLOT, ids, targets)

    # --- running the LM -------------------------------------------------------------------

    def run(
        self, embeds: torch.Tensor, mask: torch.Tensor, state: LMState | None = None
    ) -> tuple[torch.Tensor, LMState]:
        """Feed (B, T, H) embeddings (after `state`'s tokens, if any): last-layer hidden
        states (B, T, H) and the extended state (the cache is extended in place)."""
        from transformers import DynamicCache

        if state is None:
            state = LMState(
                DynamicCache(),
                mask[:, :0],
                torch.zeros(len(mask), dtype=torch.long, device=mask.device),
            )
        positions = state.next_position[:, None] + mask.long().cumsum(1) - 1  # (B, T)
        full_mask = torch.cat([state.mask, mask], dim=1)  # (B, S + T)
        out = self.language_model.model.model(
            inputs_embeds=embeds,
            attention_mask=full_mask.long(),
            position_ids=positions.clamp(min=0),
            past_key_values=state.cache,
            use_cache=True,
        )
        next_position = state.next_position + mask.long().sum(1)  # (B,)
        return out.last_hidden_state, LMState(out.past_key_values, full_mask, next_position)

    def target_loss(self, batch: Batch, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed next-token NLL over the batch's target positions, and their count."""
        follows = batch.targets[:, 1:]  # (B, T-1): position t predicts the id at t + 1
        if not bool(follows.any()):
            return hidden.sum() * 0.0, 0
        logits = self.logits(hidden[:, :-1][follows])  # (N, V + 1 + r)
        return functional.cross_entropy(logits, batch.ids[:, 1:][follows], reduction="sum"), int(
            follows.sum()
        )

    def special_hidden(self, state: LMState, tokens: Sequence[int]) -> torch.Tensor:
        """Feed the same new tokens after every row of `state`: their hidden states (B, n, H)."""
        ids = torch.tensor(tokens, device=state.mask.device).expand(len(state.mask), -1)
        hidden, _ = self.run(self.embed_ids(ids), torch.ones_like(ids, dtype=torch.bool), state)
        return hidden

    @torch.no_grad()
    def special_states(
        self,
        rows: Sequence[TokenRow],
        tokens: Sequence[int],
        features: torch.Tensor | None = None,
        batch_size: int = 32,
    ) -> torch.Tensor:
        """(N, n, H) hidden states of the new `tokens` fed after each row (e.g. `[RET]`, or
        GILL's `[IMG0..r-1]`). Rows are batched by their beginning and length, and a beginning
        a whole batch shares (a chat template's system turn) runs once."""
        order = sorted(range(len(rows)), key=lambda i: (rows[i].ids[:4], len(rows[i].ids)))
        out = torch.zeros(len(rows), len(tokens), self.language_model.hidden_size)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            _, state = self.prefill([rows[i] for i in chunk], features)
            out[chunk] = self.special_hidden(state, tokens).float().cpu()
        return out

    def prefill(
        self, rows: Sequence[TokenRow], features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LMState]:
        """The last hidden state (B, H) and the KV state after `rows`; their longest common
        image-free beginning (when at least SHARED_MIN tokens) is computed once."""
        shared = shared_prefix(rows)
        state = None
        if shared >= SHARED_MIN and len(rows) > 1:
            head = self.assemble([TokenRow(rows[0].ids[:shared])])
            _, state = self.run(head.embeds, head.mask)
            state = state.repeat(len(rows))
            rows = [TokenRow(r.ids[shared:], r.images) for r in rows]
        batch = self.assemble(rows, features)
        hidden, state = self.run(batch.embeds, batch.mask, state)
        return hidden[:, -1], state

    # --- generation ---------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        rows: Sequence[TokenRow],
        features: torch.Tensor | None = None,
        options: GenerateOptions | None = None,
    ) -> list[Generation]:
        """Batched, KV-cached decoding after each row. Only `[IMG0]` is ever predicted; the
        other `[IMG]` tokens are forced right after it (GILL). The hidden state of every new
        token fed back is kept (FROMAGe's [RET] query, GILL's mapper input)."""
        opts = options or GenerateOptions()
        batch = self.assemble(rows, features)
        hidden, state = self.run(batch.embeds, batch.mask)
        last = hidden[:, -1]  # (B, H)
        out = [Generation() for _ in rows]
        forced: list[list[int]] = [[] for _ in rows]
        done = torch.zeros(len(rows), dtype=torch.bool, device=last.device)
        stops = set(opts.stop_ids or [self.tokenizer.eos_token_id])
        rng = torch.Generator(device=last.device)
        rng.manual_seed(opts.seed if opts.seed is not None else 0)
        for _ in range(opts.max_new_tokens):
            chosen = self._next_tokens(self.logits(last), out, opts, rng)  # (B,)
            for i in range(len(rows)):
                if forced[i]:
                    chosen[i] = forced[i].pop(0)
                elif int(chosen[i]) == self.img_ids[0]:
                    forced[i] = list(self.img_ids[1:])
            live = ~done
            for i in torch.nonzero(live).flatten().tolist():
                out[i].tokens.append(int(chosen[i]))
                if not forced[i] and (int(chosen[i]) in stops or self._ends(out[i], opts)):
                    done[i] = True
            feed = live & ~done
            if not bool(feed.any()):
                break
            hidden, state = self.run(self.embed_ids(chosen[:, None]), feed[:, None], state)
            last = hidden[:, 0]
            for i in torch.nonzero(feed).flatten().tolist():
                if int(chosen[i]) >= self.vocab:
                    out[i].hidden.append((len(out[i].tokens) - 1, last[i].clone()))
        return out

    def _ends(self, gen: Generation, opts: GenerateOptions) -> bool:
        """Guards: a run of one repeated token, or the sentence count reached."""
        tokens = gen.tokens
        if tokens[-1] >= self.vocab:  # special tokens: the caller caps them
            return False
        run = opts.max_repeats
        if run is not None and len(tokens) >= run and len(set(tokens[-run:])) == 1:
            del tokens[-(run - 1) :]  # keep one of the run
            return True
        if opts.max_sentences is None:
            return False
        if not self.decode_text(tokens[-1:]).rstrip().endswith((".", "!", "?")):
            return False
        text = self.decode_text([t for t in tokens if t < self.vocab])
        return len(SENTENCE_END.findall(text)) >= opts.max_sentences

    def _next_tokens(
        self,
        logits: torch.Tensor,
        out: Sequence[Generation],
        opts: GenerateOptions,
        rng: torch.Generator,
    ) -> torch.Tensor:
        """(B, V') logits -> (B,) ids: the biases on [RET] and [IMG0], repetition
        penalty, then greedy or temperature / top-p sampling."""
        logits = logits.clone()
        logits[:, self.ret_id] += opts.ret_bias if opts.allow_ret else -math.inf
        logits[:, self.img_ids[0]] += opts.img_bias if opts.allow_img else -math.inf
        logits[:, list(self.img_ids[1:])] = -math.inf  # never predicted, only forced
        if opts.repetition_penalty != 1.0:
            for i, gen in enumerate(out):
                seen = torch.tensor(sorted(set(gen.tokens)), dtype=torch.long)
                if len(seen):
                    values = logits[i, seen]
                    logits[i, seen] = torch.where(
                        values > 0,
                        values / opts.repetition_penalty,
                        values * opts.repetition_penalty,
                    )
        return sample_next(logits, Sampling(max(opts.temperature, 0.0), opts.top_p), rng)

    # --- persistence ----------------------------------------------------------------------

    def fingerprint(self, names: Sequence[str] | None = None) -> str:
        """SHA-256 over the config, the LM's identity and the adapter tensors (`names` only)."""
        h = hashlib.sha256(self.config.to_json().encode())
        h.update(self.language_model.identity.encode())
        for key, tensor in sorted(self.adapters.state_dict().items()):
            if names is None or key.split(".")[0] in names:
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        """`config.json` and `adapters.safetensors` (with the LM identity in its metadata)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save(out / CONFIG_FILE)
        meta = {"format": "pt", "lm_identity": self.language_model.identity}
        meta |= {k: json.dumps(v) for k, v in (extra or {}).items()}
        save_weights(self.adapters, out / WEIGHTS_FILE, meta)

    def load_adapters(self, directory: str | Path) -> None:
        """Load `adapters.safetensors` strictly; the LM must be the one it was trained on."""
        from safetensors import safe_open

        path = Path(directory) / WEIGHTS_FILE
        with safe_open(str(path), framework="pt") as f:
            trained_on = (f.metadata() or {}).get("lm_identity")
        if trained_on != self.language_model.identity:
            raise ValueError(
                f"{path} was trained on the LM {trained_on!r}, not {self.language_model.identity!r}"
            )
        self.adapters.load_state_dict(load_file(str(path)), strict=True)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, lm: LanguageModel | None = None, device: str = "cpu"
    ) -> FrozenLM:
        config = FrozenLMConfig.load(Path(directory) / CONFIG_FILE)
        model = cls(config, lm or load_language_model(config, device))
        model.load_adapters(directory)
        model.adapters.requires_grad_(False)  # inference; trainers enable what they train
        return model.to(device).eval()
