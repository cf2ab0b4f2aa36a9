"""FROMAGe's `W_t` for the memory's own space: the `[RET]` state -> a query vector there.

The shipped FROMAGe maps `[RET]` into its own 256-d retrieval space, which only a memory
built with the `fromage` encoder shares. This head maps the same state into the space of
the memory's encoder instead, trained (InfoNCE) against the frozen vectors that encoder
gives the images (`chat/train.py`), so the chat's image requests query any memory. The
encoder is named and fingerprinted in the config: a memory built with another encoder (or
other weights) is refused with a clear error. `blend` (chosen on validation families) mixes
the head's query with the encoder's own encoding of the request text.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional

from mmrag.config import Config, ConfigError
from mmrag.fileio import save_weights

CONFIG_FILE = "query.json"
WEIGHTS_FILE = "query.safetensors"


class EncoderMismatchError(ValueError):
    """The memory's vectors come from another encoder than the head was trained for."""


@dataclasses.dataclass(frozen=True)
class QueryHeadConfig(Config):
    preset_prefix: ClassVar[str] = "query-head"

    hidden: int = 576
    dim: int = 256
    encoder: str = "lite"  # the memory encoder whose image vectors the head was fitted to
    fingerprint: str = ""  # that encoder's fingerprint
    lm_identity: str = ""
    blend: float = 1.0  # query = blend * head + (1 - blend) * text encoding, renormalised

    def validate(self) -> None:
        if min(self.hidden, self.dim) < 1 or not 0.0 <= self.blend <= 1.0:
            raise ConfigError("QueryHeadConfig: hidden, dim >= 1; blend in [0, 1]")


class QueryHead(nn.Module):
    """`[RET]` state (N, H) -> L2-normalised query (N, D) in the memory's space."""

    def __init__(self, config: QueryHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.hidden, config.dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07), CLIP's init

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return functional.normalize(self.proj(states.float()), dim=-1)

    def check(self, encoder_name: str, fingerprint: str) -> None:
        if (encoder_name, fingerprint) != (self.config.encoder, self.config.fingerprint):
            raise EncoderMismatchError(
                f"the chat's [RET] head was trained for the {self.config.encoder!r} encoder "
                f"({self.config.fingerprint[:16]}...), this memory uses {encoder_name!r} "
                f"({fingerprint[:16]}...); retrain it with `mmrag train chat` against this "
                "memory's encoder, or chat without it"
            )

    def save_pretrained(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save(out / CONFIG_FILE)
        save_weights(self, out / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Any:
        src = Path(directory)
        head = cls(QueryHeadConfig.load(src / CONFIG_FILE))
        head.load_state_dict(load_file(str(src / WEIGHTS_FILE)), strict=True)
        return head.eval()
