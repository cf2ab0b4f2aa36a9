"""The RA-CM3 model: a memory's retriever + the VQ image tokenizer + the generator.

caption -> image, image -> caption, infilling of images and captions, and pinned in-context
demonstrations in place of retrieval; every output carries its evidence (the ids and scores
of the documents it was conditioned on).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mmrag.config import Config, ConfigError, RetrieverConfig

CONFIG_FILE = "ra_cm3.json"


def _inference_retriever() -> RetrieverConfig:
    # At inference the query is a caption or an image the user gives: no relevance cap (a
    # near copy in memory is exactly what should be used), redundancy skipping kept.
    return RetrieverConfig(k=2, redundancy_threshold=0.95, candidate_factor=8)


@dataclasses.dataclass(frozen=True)
class RACM3Config(Config):
    """How a trained model generates: retrieval strategy and decoding defaults."""

    preset_prefix: ClassVar[str] = "ra-cm3"

    trained_with_retrieval: bool = True
    retriever: RetrieverConfig = dataclasses.field(default_factory=_inference_retriever)
    samples: int = 4  # caption -> image: N samples reranked by the dual encoder
    guidance: float = 3.0  # classifier-free guidance scale on image tokens (1 = off)
    temperature: float = 1.0
    top_p: float = 0.9
    caption_samples: int = 4  # image -> caption: samples reranked by perplexity
    caption_temperature: float = 0.7
    max_caption_tokens: int = 48

    def validate(self) -> None:
        if self.samples < 1 or self.caption_samples < 1 or self.max_caption_tokens < 1:
            raise ConfigError("RACM3Config: samples, caption_samples, max_caption_tokens >= 1")
        if self.guidance < 0 or self.temperature <= 0 or self.caption_temperature <= 0:
            raise ConfigError("RACM3Config: guidance >= 0, temperatures > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("RACM3Config: top_p in (0, 1]")
