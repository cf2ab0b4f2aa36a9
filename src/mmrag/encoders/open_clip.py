"""`open_clip`: an OpenCLIP model with a local checkpoint file behind the `Encoder` Protocol.

`open_clip` is imported lazily: it needs torchvision, which has no CPU build for our torch
(FINDINGS.md), so on such machines this backend reports why it cannot load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmrag.config import ConfigError
from mmrag.documents import to_rgb
from mmrag.encoders.base import EncoderSpec, Vectors, l2_normalize
from mmrag.fileio import file_digest

INSTALL_HINT = (
    "the open_clip encoder needs `open_clip_torch` and a torchvision build matching your "
    "torch: pip install open_clip_torch torchvision (use the `lite` or `hf_clip` encoder "
    "where torchvision cannot be installed)"
)


def import_open_clip() -> Any:
    """`import open_clip`, or an ImportError that says how to install it."""
    try:
        import open_clip
    except (
        Exception
    ) as e:  # a broken torchvision raises RuntimeError/AttributeError, not only ImportError
        raise ImportError(f"{INSTALL_HINT} (import failed: {type(e).__name__}: {e})") from e
    return open_clip


def parse_spec(spec: str) -> tuple[str, Path]:
    """`"MODEL_NAME:CHECKPOINT_FILE"` -> (model name, checkpoint path)."""
    model_name, sep, checkpoint = spec.partition(":")
    if not sep or not model_name or not checkpoint:
        raise ValueError(
            f"expected MODEL_NAME:CHECKPOINT_FILE (e.g. ViT-B-32:/ckpt/model.bin), got {spec!r}"
        )
    return model_name, Path(checkpoint)


class OpenClipEncoder:
    """An OpenCLIP architecture by name, weights from a local file (never downloaded)."""

    def __init__(
        self,
        model: Any,
        preprocess: Any,
        tokenizer: Any,
        fingerprint: str,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._fingerprint = fingerprint
        with torch.inference_mode():
            self._dim = int(self.model.encode_text(tokenizer(["probe"]).to(self.device)).shape[-1])

    @classmethod
    def from_spec(cls, spec: str, device: str = "cpu", batch_size: int = 64) -> OpenClipEncoder:
        model_name, checkpoint = parse_spec(spec)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"open_clip checkpoint file not found: {checkpoint}")
        open_clip = import_open_clip()
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(checkpoint), device=device
        )
        tokenizer = open_clip.get_tokenizer(model_name)
        h = hashlib.sha256(f"{model_name}:{file_digest(checkpoint)}".encode())
        fingerprint = f"open_clip-{h.hexdigest()[:32]}"
        return cls(model, preprocess, tokenizer, fingerprint, device=device, batch_size=batch_size)

    @property
    def name(self) -> str:
        return "open_clip"

    @property
    def dim(self) -> int:
        return self._dim

    def fingerprint(self) -> str:
        return self._fingerprint

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> Vectors:
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu().numpy())  # (B, D)
        return l2_normalize(np.concatenate(out))

    @torch.inference_mode()
    def encode_image(self, images: Sequence[Image.Image]) -> Vectors:
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(to_rgb(img)) for img in chunk])  # (B, 3, H, W)
            out.append(self.model.encode_image(pixels.to(self.device)).float().cpu().numpy())
        return l2_normalize(np.concatenate(out))


def from_encoder_spec(spec: EncoderSpec) -> OpenClipEncoder:
    """The registry's builder: `spec.path` is MODEL_NAME:CHECKPOINT_FILE."""
    if spec.path is None:
        raise ConfigError("the open_clip encoder needs --encoder-path MODEL_NAME:CHECKPOINT_FILE")
    return OpenClipEncoder.from_spec(spec.path, device=spec.device, batch_size=spec.batch_size)
