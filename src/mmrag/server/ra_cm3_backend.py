"""RA-CM3 behind the server's generation Protocols: caption -> image and image -> caption.

The adapter only translates: `GenerationOptions` (k, filters, seed) into `RACM3` arguments
(k = 0 turns retrieval off), and the model's evidence (ids and scores) into the memory's
documents, so the response shows what each output was conditioned on.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from mmrag.memory.memory import Memory
from mmrag.models.ra_cm3.model import RACM3, Evidence
from mmrag.retrieval import Retriever, SearchResult
from mmrag.server.capabilities import (
    Capabilities,
    CapabilitiesFactory,
    Caption,
    GenerationOptions,
    ImageGeneration,
)


class RACM3Backend:
    """`ImageGenerator` and `Captioner` over one `RACM3` model."""

    def __init__(self, model: RACM3) -> None:
        if model.memory is None:
            raise ValueError("the server's RA-CM3 model needs the served memory")
        self.model = model
        self.memory: Memory = model.memory

    def _documents(self, evidence: list[Evidence]) -> list[SearchResult]:
        docs = self.memory.get([e.id for e in evidence])
        return [SearchResult.of(d, e.score) for d, e in zip(docs, evidence, strict=True) if d]

    def generate_image(self, prompt: str, options: GenerationOptions) -> ImageGeneration:
        out = self.model.generate_image(
            prompt,
            retrieval=options.k > 0,
            seed=options.seed or 0,
            k=options.k or None,
            filters=options.filters,
        )
        return ImageGeneration(out.image, self._documents(out.evidence))

    def caption(self, image: Image.Image, options: GenerationOptions) -> Caption:
        out = self.model.generate_caption(
            image,
            retrieval=options.k > 0,
            seed=options.seed or 0,
            k=options.k or None,
            filters=options.filters,
        )
        return Caption(out.text, self._documents(out.evidence))


def ra_cm3_capabilities(
    model_dir: str | Path | None = None, device: str = "cpu"
) -> CapabilitiesFactory:
    """A factory the server calls once its memory is open (default: the shipped model)."""

    def build(memory: Memory, retriever: Retriever) -> Capabilities:
        backend = RACM3Backend(RACM3.from_pretrained(model_dir, memory, device))
        return Capabilities(image_generator=backend, captioner=backend)

    return build
