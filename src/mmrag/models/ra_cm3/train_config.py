"""What an RA-CM3 training run is configured by, and the files a run folder holds."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mmrag.config import Config, ConfigError, RetrieverConfig
from mmrag.models.ra_cm3.data import ModeRates
from mmrag.models.ra_cm3.generator import GeneratorConfig
from mmrag.models.ra_cm3.tokenizer import TokenizerConfig

STATE_FILE = "train_state.safetensors"
TRAIN_CONFIG_FILE = "train-config.json"
METRICS_FILE = "metrics.json"
RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "save_every"})


@dataclasses.dataclass(frozen=True)
class RACM3TrainConfig(Config):
    """What `mmrag train ra-cm3` does; `retrieval=False` is the vanilla baseline."""

    preset_prefix: ClassVar[str] = "train-ra-cm3"

    generator: GeneratorConfig = dataclasses.field(
        default_factory=lambda: GeneratorConfig.preset("small")
    )
    # Text BPE size and sentinels; image_codes / image_tokens are taken from the VQ.
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    retrieval: bool = True
    # Row and column embeddings for image codes (GeneratorConfig.image_grid), sized from the
    # tokenizer and the VQ grid when the run is prepared.
    image_positions: bool = False
    # Copy hints (copy_hints.py): each retrieved image's code at the cell being predicted,
    # one embedding table per retrieval rank (GeneratorConfig.hint_slots = max(k_choices)).
    copy_hints: bool = False
    # Text copy hints (needs copy_hints): at each token of the caption being written, the
    # token each retrieved caption suggests next (copy_hints.suggest; GeneratorConfig.text_hints).
    text_hints: bool = False
    # The same-document slot (needs copy_hints; GeneratorConfig.hint_slots one more): in this
    # share of the plain and caption-infilling examples that retrieve (K >= 1), the document
    # itself is retrieved first, in place of the K-th retrieved one, and gives its hints
    # through a slot of its own (copy_hints.in_slots). The relevance cap and self-exclusion
    # teach the model that retrieved documents are other documents, so it never learns to
    # copy one that *is* the document asked about (an image the memory holds, a caption it
    # holds); inference routes such a document to this slot.
    same_document: float = 0.0
    k_choices: tuple[int, ...] = (0, 1, 2)
    retriever: RetrieverConfig = dataclasses.field(
        default_factory=lambda: RetrieverConfig.preset("training")
    )
    query_variants: int = 4  # precomputed queries per document: text, image, text, image
    alpha: float = 0.1  # weight of L_retr
    uncond_rate: float = 0.1
    caption_rate: float = 0.2
    span_rate: float = 0.2
    tokens_per_step: int = 3200
    steps: int = 1500
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    holdout: float = 0.3  # fraction of multi-variant groups that give up one variant
    validation: float = 0.0  # the same, from other groups, for choosing decoding settings
    group_key: str = "base"
    seed: int = 0
    eval_every: int = 100
    save_every: int = 100
    val_docs: int = 64

    def validate(self) -> None:
        if self.steps < 1 or self.tokens_per_step < 1 or self.lr <= 0:
            raise ConfigError("RACM3TrainConfig: steps, tokens_per_step >= 1; lr > 0")
        if not self.k_choices or min(self.k_choices) < 0:
            raise ConfigError("RACM3TrainConfig: k_choices must be non-empty and >= 0")
        if max(self.k_choices) > self.retriever.k:
            raise ConfigError("RACM3TrainConfig: max(k_choices) exceeds retriever.k")
        rates = (self.uncond_rate, self.caption_rate, self.span_rate)
        if min(rates) < 0 or sum(rates) > 1:
            raise ConfigError("RACM3TrainConfig: mode rates must be >= 0 and sum to <= 1")
        if not 0.0 <= self.holdout < 1.0 or self.query_variants < 1 or self.alpha < 0:
            raise ConfigError("RACM3TrainConfig: holdout in [0, 1), query_variants >= 1")
        if self.validation < 0 or self.holdout + self.validation > 1:
            raise ConfigError("RACM3TrainConfig: validation >= 0 and holdout + validation <= 1")
        if min(self.eval_every, self.save_every, self.val_docs) < 1:
            raise ConfigError("RACM3TrainConfig: eval_every, save_every, val_docs >= 1")
        if self.text_hints and not self.copy_hints:
            raise ConfigError("RACM3TrainConfig: text_hints needs copy_hints")
        if not 0.0 <= self.same_document <= 1.0:
            raise ConfigError("RACM3TrainConfig: same_document in [0, 1]")
        if self.same_document and not (self.copy_hints and self.retrieval):
            raise ConfigError("RACM3TrainConfig: same_document needs copy_hints and retrieval")

    @property
    def modes(self) -> ModeRates:
        return ModeRates(self.uncond_rate, self.caption_rate, self.span_rate)
