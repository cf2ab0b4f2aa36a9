"""What a FROMAGe training run is configured by, and the files a run folder holds."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mmrag.config import Config, ConfigError
from mmrag.models.fromage.model import FrozenLMConfig

TRAIN_CONFIG_FILE = "train-config.json"
METRICS_FILE = "metrics.json"
RECIPE_FILE = "RECIPE.md"
STATE_FILE = "train_state.safetensors"
RESUMABLE_CHANGES = frozenset(
    {"steps", "save_every", "eval_every", "head_epochs", "head_batch", "head_lr"}
)


@dataclasses.dataclass(frozen=True)
class FromageTrainConfig(Config):
    preset_prefix: ClassVar[str] = "train-fromage"

    model: FrozenLMConfig = dataclasses.field(default_factory=FrozenLMConfig)
    holdout: float = 0.2  # fraction of groups held out (then the same fraction validates)
    group_key: str = "base"
    seed: int = 0
    steps: int = 400
    batch_size: int = 16  # pairs per global step
    lr: float = 1e-3  # AdamW peak; linear warm-up then cosine decay to 10%
    warmup_steps: int = 20
    weight_decay: float = 0.0
    interleave_prob: float = 0.5  # FROMAGe: two pairs concatenated with probability 0.5
    chat_prob: float = 0.25  # retrieval queries written as a chat request
    caption_weight: float = 1.0
    ret_weight: float = 1.0  # NLL of emitting [RET]
    contrastive_weight: float = 1.0
    gallery_negatives: bool = True  # text -> image over every training image
    save_every: int = 20
    eval_every: int = 100  # validation R@k of [RET] queries (0: never)
    # Stage 2 (retrieval_heads.py): W_t, W_i, temperature on cached [RET] states.
    head_epochs: int = 30  # 0: skip the stage
    head_batch: int = 1024
    head_lr: float = 1e-3

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ConfigError("FromageTrainConfig: steps >= 1, batch_size >= 2, lr > 0")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError("FromageTrainConfig: holdout must be in [0, 1)")
        if not (0 <= self.interleave_prob <= 1 and 0 <= self.chat_prob <= 1):
            raise ConfigError("FromageTrainConfig: probabilities must be in [0, 1]")
