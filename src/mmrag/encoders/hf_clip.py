"""`hf_clip`: a user's local Hugging Face CLIP checkpoint folder behind the `Encoder` Protocol.

Needs `transformers` only. Image preprocessing uses the PIL backend of the CLIP image
processor, which works without torchvision (transformers 5 otherwise prefers torchvision).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmrag.config import ConfigError
from mmrag.documents import to_rgb
from mmrag.encoders.base import EncoderSpec, Vectors, l2_normalize
from mmrag.fileio import files_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin")
CONFIG_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json")


def _image_processor(path: str) -> Any:
    """The PIL-backed CLIP image processor (no torchvision), on transformers 4.x and 5.x."""
    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    return AutoImageProcessor.from_pretrained(path, use_fast=False)


def _pooled(output: Any) -> torch.Tensor:
    """`get_*_features` returns a tensor in transformers 4 and a model output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def checkpoint_digest(directory: Path) -> str:
    """SHA-256 over the folder's configs and weight files (names and bytes)."""
    files = [directory / n for n in CONFIG_FILES if (directory / n).is_file()]
    files += sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return files_sha256(files)


class HFClipEncoder:
    """CLIP from a local folder (`CLIPModel.save_pretrained` + tokenizer + image processor)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        processor: Any,
        digest: str,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model.to(torch.device(device)).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._digest = digest
        self._max_tokens = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str = "cpu", batch_size: int = 64
    ) -> HFClipEncoder:
        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"{directory} is not a Hugging Face CLIP checkpoint folder (no config.json)"
            )
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(str(directory))
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        processor = _image_processor(str(directory))
        digest = checkpoint_digest(directory)
        return cls(model, tokenizer, processor, digest, device=device, batch_size=batch_size)

    @property
    def name(self) -> str:
        return "hf_clip"

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def fingerprint(self) -> str:
        return f"hf_clip-{self._digest[:32]}"

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> Vectors:
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self._max_tokens,
                return_tensors="pt",
            ).to(self.device)
            feats = _pooled(
                self.model.get_text_features(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                )
            )  # (B, projection_dim)
            out.append(feats.float().cpu().numpy())
        return l2_normalize(np.concatenate(out))

    @torch.inference_mode()
    def encode_image(self, images: Sequence[Image.Image]) -> Vectors:
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), self.batch_size):
            rgb = [to_rgb(img) for img in images[start : start + self.batch_size]]
            pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"]
            feats = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device)))
            out.append(feats.float().cpu().numpy())  # (B, projection_dim)
        return l2_normalize(np.concatenate(out))


def from_encoder_spec(spec: EncoderSpec) -> HFClipEncoder:
    """The registry's builder: `spec.path` is a local CLIP checkpoint folder."""
    if spec.path is None:
        raise ConfigError(
            "the hf_clip encoder needs --encoder-path: a local CLIP checkpoint folder"
        )
    return HFClipEncoder.from_pretrained(spec.path, device=spec.device, batch_size=spec.batch_size)
