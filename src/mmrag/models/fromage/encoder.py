"""The `fromage` encoder: FROMAGe's retrieval space as an `Encoder`, so a memory holds FROMAGe
embeddings and a `[RET]` query is one search of it.

`encode_image` is `W_i v` (v: frozen EfficientNet-Lite0 pooled features); `encode_text` is
`W_t h[RET]`, the frozen LM's last hidden state at a `[RET]` fed after the text, which is how
FROMAGe queries at inference. A caption + image document is stored, like every document in
our memories, as RA-CM3's mixed-modal average of its text and image vectors (both live in the
one space that InfoNCE trained), so a `[RET]` from a chat finds documents by what their
images show and what their captions say. FROMAGe's image-only gallery is what `mmrag eval
fromage` scores.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmrag.checkpoints import checkpoint_dir
from mmrag.encoders.base import EncoderSpec, Vectors
from mmrag.models.fromage.model import FrozenLM, TokenRow

CHECKPOINT_NAME = "fromage"
# The parts of the adapters that the vectors depend on.
VECTOR_PARAMETERS = ("ret_token", "text_proj", "image_proj")
FINGERPRINT_VERSION = "fromage-v1"


@functools.cache
def shared_model(path: str, device: str = "cpu") -> FrozenLM:
    """One loaded FROMAGe (or GILL) checkpoint per folder and process: the encoder, the chat
    model and the server share its frozen LM."""
    return FrozenLM.from_pretrained(path, device=device)


def resolve(path: str | Path | None) -> str:
    return str(Path(path).resolve()) if path is not None else str(checkpoint_dir(CHECKPOINT_NAME))


class FromageEncoder:
    """`Encoder` over a FROMAGe checkpoint; vectors are L2-normalised, `retrieval_dim` wide."""

    def __init__(self, model: FrozenLM, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.batch_size = batch_size
        self._fingerprint: str | None = None

    @property
    def name(self) -> str:
        return "fromage"

    @property
    def dim(self) -> int:
        return self.model.config.retrieval_dim

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from mmrag.encoders.efficientnet import packaged_weights_path
            from mmrag.fileio import file_digest

            h = hashlib.sha256(FINGERPRINT_VERSION.encode())
            h.update(self.model.fingerprint(VECTOR_PARAMETERS).encode())
            h.update(file_digest(packaged_weights_path()).encode())
            self._fingerprint = f"fromage-{h.hexdigest()[:32]}"
        return self._fingerprint

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Vectors:
        rows = [TokenRow(self.model.encode_text(t)) for t in texts]
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        states = self.model.special_states(rows, [self.model.ret_id], batch_size=self.batch_size)
        return self.model.adapters.project_text(states[:, 0]).numpy().astype(np.float32)

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image.Image]) -> Vectors:
        from mmrag.models.fromage.conversation import image_features

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        features = image_features(self.model, images)
        return self.model.adapters.project_image(features).numpy().astype(np.float32)

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, device: str = "cpu", batch_size: int = 32
    ) -> FromageEncoder:
        """The shipped `checkpoints/fromage` when `path` is None."""
        return cls(shared_model(resolve(path), device), batch_size=batch_size)


def from_encoder_spec(spec: EncoderSpec) -> FromageEncoder:
    """The registry's builder: `spec.path` is a FROMAGe folder (None: the shipped one)."""
    return FromageEncoder.from_pretrained(spec.path, device=spec.device, batch_size=spec.batch_size)
