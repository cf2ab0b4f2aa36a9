"""What a GILL training run is configured by, and the files a run folder holds."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mmrag.config import Config, ConfigError
from mmrag.models.gill.model import GillConfig

STATE_FILE = "train_state.safetensors"
TRAIN_CONFIG_FILE = "train-config.json"
METRICS_FILE = "metrics.json"
RECIPE_FILE = "RECIPE.md"
RESUMABLE_CHANGES = frozenset({"steps", "save_every"})


@dataclasses.dataclass(frozen=True)
class GillTrainConfig(Config):
    preset_prefix: ClassVar[str] = "train-gill"

    gill: GillConfig = dataclasses.field(default_factory=GillConfig)
    fromage: str = ""  # the FROMAGe folder ("" = the shipped checkpoints/fromage)
    seed: int = 0
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    chat_prob: float = 0.5  # contexts written as a user's chat request
    nll_weight: float = 1.0
    contrastive_weight: float = 1.0
    l2_weight: float = 1.0
    length_weight: float = 0.1
    save_every: int = 10
    head_epochs: int = 40  # stage 2 (0: skip)
    head_batch: int = 256
    head_lr: float = 1e-3
    present_fraction: float = 0.5  # decision: families of a split kept in its memory

    def validate(self) -> None:
        if self.steps < 0 or self.batch_size < 2 or self.lr <= 0:
            raise ConfigError("GillTrainConfig: steps >= 0, batch_size >= 2, lr > 0")
        if not 0 < self.present_fraction < 1 or not 0 <= self.chat_prob <= 1:
            raise ConfigError("GillTrainConfig: present_fraction in (0, 1), chat_prob in [0, 1]")
