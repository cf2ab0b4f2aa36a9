"""Does the user ask to be shown an image, and how many? The chat's image decision.

A logistic read-out of the frozen LM's hidden state at the start of the assistant's turn
(the state the LM's own `[RET]` / `[IMG0]` logits read), trained on held-out-template
requests and questions and temperature-scaled on validation prompts, so its probability is
calibrated (`chat/train.py`). A plain question, or a question about an attached image, reads
as "no image"; "Show me ...", "Draw ...", "Now a dog." after an image request read as "yes".
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file
from torch import nn

from mmrag.config import Config, ConfigError
from mmrag.fileio import save_weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "request.safetensors"
MAX_IMAGES = 4
NUMBERS = {"two": 2, "three": 3, "four": 4, "a couple of": 2, "some": 2, "several": 3}
_COUNT = re.compile(
    r"\b(\d+|two|three|four|a couple of|some|several)\s+"
    r"(?:\w+\s+){0,2}?(?:pictures|images|photos|drawings|emojis|ones)\b",
    re.IGNORECASE,
)


def requested_count(text: str) -> int:
    """How many images a request names ("two pictures of cats" -> 2); one by default, at most
    MAX_IMAGES."""
    found = _COUNT.search(text)
    if found is None:
        return 1
    word = found.group(1).lower()
    count = int(word) if word.isdigit() else NUMBERS[word]
    return max(1, min(MAX_IMAGES, count))


@dataclasses.dataclass(frozen=True)
class RequestConfig(Config):
    """The decision's identity: the LM whose states it reads, and its threshold."""

    preset_prefix: ClassVar[str] = "request"

    hidden: int = 576
    lm_identity: str = ""  # FrozenLM's language_model.identity the head was fitted on
    threshold: float = 0.5  # show an image when p >= threshold

    def validate(self) -> None:
        if self.hidden < 1 or not 0 < self.threshold < 1:
            raise ConfigError("RequestConfig: hidden >= 1, threshold in (0, 1)")


class RequestDecision(nn.Module):
    """p(the user asks for an image | LM state) = sigmoid((w . h + b) / temperature)."""

    def __init__(self, config: RequestConfig) -> None:
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.hidden, 1)
        self.temperature: torch.Tensor
        self.register_buffer("temperature", torch.ones(()))

    def logit(self, states: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N,) uncalibrated logits."""
        return self.linear(states.float())[:, 0]

    @torch.no_grad()
    def probability(self, states: torch.Tensor, bias: float = 0.0) -> torch.Tensor:
        """(N, H) -> (N,) calibrated probabilities; `bias` shifts the logit (> 0: more images)."""
        return torch.sigmoid(self.logit(states) / self.temperature + bias)

    def save_pretrained(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save(out / CONFIG_FILE)
        save_weights(self, out / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path, lm_identity: str | None = None) -> Any:
        """Load strictly; with `lm_identity`, refuse a head fitted on another LM."""
        src = Path(directory)
        config = RequestConfig.load(src / CONFIG_FILE)
        if lm_identity is not None and config.lm_identity != lm_identity:
            raise ValueError(
                f"{src}: this image decision was fitted on another language model "
                f"({config.lm_identity[:24]}...); retrain it with `mmrag train chat`"
            )
        head = cls(config)
        head.load_state_dict(load_file(str(src / WEIGHTS_FILE)), strict=True)
        return head.eval()
