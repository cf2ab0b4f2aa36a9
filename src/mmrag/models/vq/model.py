"""VQ image tokenizer: pixels -> a grid of discrete codes -> pixels (VQGAN-style, EMA codebook).

The architecture is the taming-transformers VQGAN autoencoder (Esser et al. 2021; repo
CompVis/taming-transformers, `taming/modules/diffusionmodules/model.py`): ResNet blocks with
GroupNorm and swish, optional self-attention at chosen resolutions, a mid block (ResNet,
attention, ResNet), 1x1 `quant_conv` / `post_quant_conv` around the quantiser. Keeping that
layout lets `load_taming_vqgan` convert a real VQGAN checkpoint into a `VQModel`.

The quantiser differs from taming's (which learns the codebook by gradient): codes are
updated by exponential moving averages (van den Oord et al. 2017, appendix A.1; VQ-VAE-2),
and codes whose usage falls below a threshold are restarted on random encoder outputs
(Jukebox, Dhariwal et al. 2020, section 2.2 "random restarts"), which keeps most of the
codebook alive on small data.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn import functional

from mmrag.config import Config, ConfigError
from mmrag.documents import to_rgb

if TYPE_CHECKING:
    from mmrag.encoders.efficientnet import EfficientNetLite0

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class VQConfig(Config):
    """The VQ autoencoder and its EMA codebook. Field names follow taming's `ddconfig`."""

    preset_prefix: ClassVar[str] = "vq"

    image_size: int = 64  # square input side ("resolution" in taming)
    in_channels: int = 3
    # Pixel-unshuffle the input into patch x patch cells before the first convolution (and
    # pixel-shuffle the output): the network then never runs at full resolution, which is
    # where most of a CPU's time goes. 1 is taming's architecture.
    patch_size: int = 1
    channels: int = 32  # base width ("ch")
    # One level per entry; every level but the last halves the resolution, so the code grid
    # side is image_size / patch_size / 2**(len - 1): (1, 2, 4) maps 64 px to 16 x 16 codes.
    channel_mult: tuple[int, ...] = (1, 2, 4)
    res_blocks: int = 1  # per encoder level; the decoder has res_blocks + 1 ("num_res_blocks")
    attn_resolutions: tuple[int, ...] = ()  # feature-map sides with self-attention
    z_channels: int = 64  # encoder output / decoder input width
    code_dim: int = 32  # codebook vector width ("embed_dim")
    codebook_size: int = 512  # "n_embed"
    norm_groups: int = 8  # GroupNorm groups (taming: 32)
    norm_eps: float = 1e-6
    # EMA codebook (VQ-VAE appendix A.1): decay of the running counts and sums.
    ema_decay: float = 0.99
    # A code whose running count (assignments per step) falls below this is restarted on a
    # random encoder output of the current batch (Jukebox). 0 disables restarts.
    dead_code_threshold: float = 0.05
    commitment: float = 0.25  # beta in ||z - sg(e)||^2

    def validate(self) -> None:
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ConfigError("VQConfig: channel_mult needs at least one positive entry")
        if self.patch_size < 1:
            raise ConfigError("VQConfig: patch_size must be >= 1")
        factor = self.patch_size * 2 ** (len(self.channel_mult) - 1)
        if self.image_size < 1 or self.image_size % factor:
            raise ConfigError(f"VQConfig: image_size must be a multiple of {factor}")
        widths = [self.channels * m for m in self.channel_mult] + [self.channels]
        if self.norm_groups < 1 or any(w % self.norm_groups for w in widths):
            raise ConfigError("VQConfig: every level's width must be divisible by norm_groups")
        if min(self.z_channels, self.code_dim, self.codebook_size, self.in_channels) < 1:
            raise ConfigError("VQConfig: widths and codebook_size must be positive")
        if self.res_blocks < 1:
            raise ConfigError("VQConfig: res_blocks must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("VQConfig: ema_decay must be in [0, 1)")
        if self.dead_code_threshold < 0 or self.commitment < 0:
            raise ConfigError("VQConfig: dead_code_threshold and commitment must be >= 0")

    @property
    def grid_size(self) -> int:
        """Side of the code grid: image_size / patch_size / 2**(levels - 1)."""
        return self.image_size // self.patch_size // 2 ** (len(self.channel_mult) - 1)

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size**2


# --- building blocks (taming's Encoder/Decoder, same structure and padding) --------------------


def _norm(config: VQConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=config.norm_eps, affine=True)


class ResnetBlock(nn.Module):
    """norm, swish, conv3x3, norm, swish, conv3x3; plus a 1x1 shortcut if the widths differ."""

    def __init__(self, config: VQConfig, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = _norm(config, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(config, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(functional.silu(self.norm1(x)))  # (B, Cout, H, W)
        h = self.conv2(functional.silu(self.norm2(h)))  # (B, Cout, H, W)
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 q/k/v/out projections."""

    def __init__(self, config: VQConfig, channels: int) -> None:
        super().__init__()
        self.norm = _norm(config, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = functional.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution with taming's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(functional.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResNet blocks (each maybe followed by attention), then resampling."""

    def __init__(
        self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.attns:
                x = self.attns[i](x)
        return self.resample(x)


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution."""

    def __init__(self, config: VQConfig, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(config, channels, channels)
        self.attn_1 = AttnBlock(config, channels)
        self.block_2 = ResnetBlock(config, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (B, z_channels, S/f, S/f), f = patch_size * 2**(levels - 1)."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        ch, mult, p = config.channels, config.channel_mult, config.patch_size
        self.patch_size = p
        self.conv_in = nn.Conv2d(config.in_channels * p * p, ch, 3, padding=1)
        levels: list[nn.Module] = []
        res, cin = config.image_size // p, ch
        for i, m in enumerate(mult):
            blocks: list[nn.Module] = []
            attns: list[nn.Module] = []
            for _ in range(config.res_blocks):
                blocks.append(ResnetBlock(config, cin, ch * m))
                cin = ch * m
                if res in config.attn_resolutions:
                    attns.append(AttnBlock(config, cin))
            last = i == len(mult) - 1
            levels.append(Level(blocks, attns, nn.Identity() if last else Downsample(cin)))
            res = res if last else res // 2
        self.levels = nn.ModuleList(levels)
        self.mid = MidBlock(config, cin)
        self.norm_out = _norm(config, cin)
        self.conv_out = nn.Conv2d(cin, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_size > 1:
            x = functional.pixel_unshuffle(x, self.patch_size)  # (B, 3*p*p, S/p, S/p)
        h = self.conv_in(x)  # (B, ch, S/p, S/p)
        for level in self.levels:
            h = level(h)  # ends at (B, ch * mult[-1], S/f, S/f)
        h = self.mid(h)
        return self.conv_out(functional.silu(self.norm_out(h)))  # (B, z, S/f, S/f)


class Decoder(nn.Module):
    """(B, z_channels, S/f, S/f) -> (B, 3, S, S). `levels[i]` works at encoder level i's size."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        ch, mult = config.channels, config.channel_mult
        cin = ch * mult[-1]
        res = config.grid_size
        self.conv_in = nn.Conv2d(config.z_channels, cin, 3, padding=1)
        self.mid = MidBlock(config, cin)
        levels: list[nn.Module] = [nn.Identity()] * len(mult)
        for i in reversed(range(len(mult))):
            blocks: list[nn.Module] = []
            attns: list[nn.Module] = []
            for _ in range(config.res_blocks + 1):
                blocks.append(ResnetBlock(config, cin, ch * mult[i]))
                cin = ch * mult[i]
                if res in config.attn_resolutions:
                    attns.append(AttnBlock(config, cin))
            levels[i] = Level(blocks, attns, Upsample(cin) if i else nn.Identity())
            res = res * 2 if i else res
        self.levels = nn.ModuleList(levels)
        self.norm_out = _norm(config, cin)
        self.patch_size = p = config.patch_size
        self.conv_out = nn.Conv2d(cin, config.in_channels * p * p, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * mult[-1], S/f, S/f)
        for level in reversed(self.levels):
            h = level(h)  # up to (B, ch, S/p, S/p)
        out = self.conv_out(functional.silu(self.norm_out(h)))  # (B, 3*p*p, S/p, S/p)
        if self.patch_size > 1:
            out = functional.pixel_shuffle(out, self.patch_size)
        return out  # (B, 3, S, S)


# --- the EMA quantiser ----------------------------------------------------------------------


@dataclasses.dataclass
class Quantized:
    """What the quantiser returns for a (B, D, h, w) input."""

    z_q: torch.Tensor  # (B, D, h, w) straight-through: forward = codes, gradient -> encoder
    codes: torch.Tensor  # (B, h, w) int64
    commitment_loss: torch.Tensor  # scalar, beta * ||z - sg(e)||^2
    perplexity: torch.Tensor  # scalar, exp(entropy of the batch's code histogram)


def code_perplexity(counts: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: `counts` (K,) assignments out of `total`."""
    probs = counts / total
    return torch.exp(-(probs * torch.log(probs + 1e-10)).sum())


class RankSync(Protocol):
    """How a data-parallel trainer combines batch statistics over its ranks
    (`mmrag.training.distributed.Collectives`)."""

    def sum(self, value: torch.Tensor) -> torch.Tensor: ...

    def gather(self, rows: torch.Tensor) -> torch.Tensor: ...


class EMAQuantizer(nn.Module):
    """Nearest-code lookup; in training mode also the EMA codebook update and dead-code restarts.

    Buffers: `codebook` (K, D); `ema_count` (K) running assignments per step; `ema_sum` (K, D)
    running sum of the assigned encoder outputs. `codebook = ema_sum / smoothed ema_count`.
    With `sync` set (data-parallel training) the counts and sums are summed over ranks and
    restarts draw from every rank's rows, so each rank's codebook equals a one-process run's.
    """

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        self.sync: RankSync | None = None
        k, d = config.codebook_size, config.code_dim
        codebook = torch.randn(k, d) / math.sqrt(d)
        self.codebook: torch.Tensor
        self.ema_count: torch.Tensor
        self.ema_sum: torch.Tensor
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.ones(k))
        self.register_buffer("ema_sum", codebook.clone())

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) index of the nearest code in squared Euclidean distance."""
        dist = (
            flat.pow(2).sum(1, keepdim=True)
            - 2 * flat @ self.codebook.T
            + self.codebook.pow(2).sum(1)[None, :]
        )  # (N, K)
        return dist.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, D, h, w) code vectors."""
        return self.codebook[codes].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> Quantized:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        codes = self.nearest(flat.detach())  # (B*h*w,)
        one_hot = functional.one_hot(codes, self.config.codebook_size).to(flat.dtype)  # (N, K)
        counts = one_hot.sum(0)  # (K,)
        total = torch.tensor(float(len(flat)), device=flat.device)
        if self.training:
            sums = one_hot.T @ flat.detach()  # (K, D)
            rows = flat.detach()
            if self.sync is not None:
                counts, sums, total = map(self.sync.sum, (counts, sums, total))
                rows = self.sync.gather(rows)  # (N over all ranks, D)
            self._ema_update(counts, sums)
            self.restart_dead_codes(rows)
        z_q = self.codebook[codes].view(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)
        commitment = self.config.commitment * functional.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return Quantized(z_q, codes.view(b, h, w), commitment, code_perplexity(counts, total))

    @torch.no_grad()
    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """Fold this step's assignment counts (K,) and summed encoder outputs (K, D) in."""
        decay, k = self.config.ema_decay, self.config.codebook_size
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        # Laplace smoothing keeps codes with a tiny count finite (Sonnet VectorQuantizerEMA).
        total = self.ema_count.sum()
        eps = 1e-5
        smoothed = (self.ema_count + eps) / (total + k * eps) * total
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Move codes used less than `dead_code_threshold` onto rows of `flat` (N, D).

        Rows are drawn with probability proportional to their squared distance from their
        nearest live code, so restarts go where the codebook serves the data worst (on emoji
        most rows are white background, already well served: uniform draws would mostly
        duplicate the background code). A restarted code gets the average running count,
        a grace period of about log(count / threshold) / (1 - decay) steps to attract
        assignments. Returns how many codes were restarted. Uses the global torch RNG.
        """
        threshold = self.config.dead_code_threshold
        if threshold <= 0:
            return 0
        alive = self.ema_count >= threshold
        dead = torch.nonzero(~alive).flatten()
        if len(dead) == 0:
            return 0
        if alive.any():
            live = self.codebook[alive]  # (A, D)
            error = torch.cdist(flat, live).amin(dim=1).pow(2)  # (N,)
        else:
            error = torch.ones(len(flat), device=flat.device)
        picks = torch.multinomial(error + 1e-12, len(dead), replacement=True)
        grace = self.ema_count.mean().clamp(min=2 * threshold)
        self.codebook[dead] = flat[picks]
        self.ema_sum[dead] = flat[picks] * grace
        self.ema_count[dead] = grace
        return len(dead)

    def usage(self) -> float:
        """Fraction of codes whose running count is at or above the restart threshold."""
        threshold = max(self.config.dead_code_threshold, 1e-8)
        return float((self.ema_count >= threshold).float().mean())


# --- the model --------------------------------------------------------------------------------


@dataclasses.dataclass
class VQOutput:
    """A training forward pass: reconstruction, codes and the quantiser's losses/stats."""

    recon: torch.Tensor  # (B, 3, S, S), unclamped
    codes: torch.Tensor  # (B, h, w)
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor


# The parameters that turn codes into pixels; the rest decide the codes.
DECODING_PREFIXES = ("post_quant_conv.", "decoder.")


class VQModel(nn.Module):
    """Encoder -> quant_conv -> EMA quantiser -> post_quant_conv -> decoder.

    Pixels are (B, 3, S, S) floats in [-1, 1]; codes are (B, h, w) int64 in [0, codebook_size).
    """

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.code_dim, 1)
        self.quantize = EMAQuantizer(config)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, code_dim, h, w) continuous latents before quantisation."""
        return self.quant_conv(self.encoder(x))

    def forward(self, x: torch.Tensor) -> VQOutput:
        q = self.quantize(self.encode_latents(x))
        recon = self.decoder(self.post_quant_conv(q.z_q))  # (B, 3, S, S)
        return VQOutput(recon, q.codes, q.commitment_loss, q.perplexity)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, h, w) codes (no codebook update)."""
        z = self.encode_latents(x)  # (B, D, h, w)
        b, d, h, w = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, 3, S, S) pixels clamped to [-1, 1]."""
        if codes.min() < 0 or codes.max() >= self.config.codebook_size:
            raise ValueError(f"codes must be in [0, {self.config.codebook_size})")
        z_q = self.quantize.lookup(codes)  # (B, D, h, w)
        return self.decoder(self.post_quant_conv(z_q)).clamp(-1.0, 1.0)

    @property
    def device(self) -> torch.device:
        return self.quantize.codebook.device

    def same_codes(self, other: VQModel) -> bool:
        """Whether `other` turns every image into the same codes: same architecture, encoder,
        quant_conv and codebook (its decoder may differ, e.g. after `--decoder-only`)."""
        if other.config != self.config:
            return False
        mine, theirs = self.state_dict(), other.state_dict()
        coding = [k for k in mine if not k.startswith(DECODING_PREFIXES)]
        return all(torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in coding)

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any size, RGBA flattened onto white) -> (B, h, w) codes on CPU."""
        x = images_to_tensor(images, self.config.image_size).to(self.device)
        was_training = self.training
        self.eval()
        codes = self.encode(x).cpu()
        self.train(was_training)
        return codes

    def decode_images(self, codes: torch.Tensor) -> list[Image.Image]:
        """(B, h, w) codes -> RGB PIL images of image_size pixels."""
        was_training = self.training
        self.eval()
        x = self.decode(codes.to(self.device)).cpu()
        self.train(was_training)
        return tensor_to_images(x)

    def save_pretrained(
        self, directory: str | Path, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Write `config.json` and `model.safetensors` (weights and codebook buffers)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save(out / CONFIG_FILE)
        save_model(self, str(out / WEIGHTS_FILE), metadata=dict(metadata or {}))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> VQModel:
        """Build from `config.json`, load `model.safetensors` strictly, eval mode."""
        src = Path(directory)
        model = cls(VQConfig.load(src / CONFIG_FILE))
        missing, unexpected = load_model(model, str(src / WEIGHTS_FILE), strict=True)
        if missing or unexpected:  # load_model raises in strict mode; belt and braces
            raise RuntimeError(f"weights do not match: missing {missing}, unexpected {unexpected}")
        return model.to(device).eval()


# --- pixels <-> tensors -----------------------------------------------------------------------


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Flatten transparency onto white, centre-crop to a square, resize with antialiasing."""
    image = to_rgb(image)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        resample = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
        image = image.resize((size, size), resample=resample)
    return image


def images_to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) float32 in [-1, 1]."""
    arrays = [np.asarray(square_resize(im, size), dtype=np.uint8) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()  # (B, 3, S, S)
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, S, S) in [-1, 1] -> RGB PIL images."""
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return [Image.fromarray(p.numpy(), mode="RGB") for p in pixels]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, 3, S, S) tensors in [-1, 1], measured on the [0, 1] scale."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


# --- perceptual loss on frozen EfficientNet-Lite0 features --------------------------------------


class PerceptualLoss(nn.Module):
    """LPIPS-like distance without learned weights: unit-normalise each position's channel vector
    at a few early EfficientNet-Lite0 stages, average the squared differences, sum the stages.

    Only the stem and the first `blocks` MBConv blocks run (at 64 px the later stages are 2x2
    or 1x1 maps and cost depthwise convolutions for little signal). The network stays frozen
    and in eval mode (batch-norm running statistics), whatever `train()` is called with.
    """

    def __init__(self, network: EfficientNetLite0 | None = None, blocks: int = 5) -> None:
        super().__init__()
        if network is None:
            # Imported here: only this optional loss needs the EfficientNet module and the
            # packaged ImageNet weights (`mmrag[lite]`; it raises an install hint without them).
            from mmrag.encoders.efficientnet import load_efficientnet_lite0

            network = load_efficientnet_lite0()
        self.net = network
        self.blocks = blocks
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.net.eval()
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        h = functional.relu6(net._bn0(net._conv_stem(x)))  # (B, 32, S/2, S/2)
        feats = [h]
        for block in net._blocks[: self.blocks]:
            h = block(h)
            feats.append(h)
        return feats

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Both (B, 3, S, S) in [-1, 1] (EfficientNet-Lite0's own input scale) -> scalar."""
        total = recon.new_zeros(())
        for a, b in zip(self._features(recon), self._features(target), strict=True):
            a = functional.normalize(a, dim=1, eps=1e-8)
            b = functional.normalize(b, dim=1, eps=1e-8)
            total = total + (a - b).pow(2).sum(1).mean()
        return total


# --- taming-transformers VQGAN checkpoints ------------------------------------------------------

# The key layout of a taming-transformers `VQModel` state dict (taming/models/vqgan.py with
# Encoder/Decoder from taming/modules/diffusionmodules/model.py and VectorQuantizer(2) from
# taming/modules/vqvae/quantize.py), with the `ddconfig` values that determine the shapes:
#
#   encoder.conv_in.{weight,bias}                          (ch, in_channels, 3, 3)
#   encoder.down.{i}.block.{j}.norm1.{weight,bias}         GroupNorm(32) of the block input
#   encoder.down.{i}.block.{j}.conv1.{weight,bias}         (ch*mult[i], cin, 3, 3)
#   encoder.down.{i}.block.{j}.norm2.{weight,bias}
#   encoder.down.{i}.block.{j}.conv2.{weight,bias}         (ch*mult[i], ch*mult[i], 3, 3)
#   encoder.down.{i}.block.{j}.nin_shortcut.{weight,bias}  (cout, cin, 1, 1), only if cin != cout
#   encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}.*      at resolutions in attn_resolutions
#   encoder.down.{i}.downsample.conv.{weight,bias}         (c, c, 3, 3), every level but the last
#   encoder.mid.{block_1,attn_1,block_2}.*
#   encoder.norm_out.*, encoder.conv_out.*                 (z_channels [x2 if double_z], c, 3, 3)
#   quant_conv.{weight,bias}                               (embed_dim, z_channels, 1, 1)
#   quantize.embedding.weight                              (n_embed, embed_dim)
#   post_quant_conv.{weight,bias}                          (z_channels, embed_dim, 1, 1)
#   decoder.conv_in.*                                      (ch*mult[-1], z_channels, 3, 3)
#   decoder.mid.{block_1,attn_1,block_2}.*
#   decoder.up.{i}.block.{j}.*  (j < num_res_blocks + 1)   up[i] works at encoder level i's size
#   decoder.up.{i}.attn.{j}.*
#   decoder.up.{i}.upsample.conv.{weight,bias}             every level but i = 0
#   decoder.norm_out.*, decoder.conv_out.*                 (out_ch, ch*mult[0], 3, 3)
#   loss.*                                                 discriminator / LPIPS: not converted
#
# Our names differ in: down/up -> levels, block -> blocks, attn -> attns,
# downsample/upsample -> resample, nin_shortcut -> shortcut, quantize.embedding.weight ->
# quantize.codebook (plus EMA buffers, which a gradient-trained codebook lacks).

_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^(encoder)\.down\.", r"\1.levels."),
    (r"^(decoder)\.up\.", r"\1.levels."),
    (r"\.block\.(\d+)\.", r".blocks.\1."),
    (r"\.attn\.(\d+)\.", r".attns.\1."),
    (r"\.(downsample|upsample)\.conv\.", r".resample.conv."),
    (r"\.nin_shortcut\.", r".shortcut."),
)
TAMING_CODEBOOK_KEY = "quantize.embedding.weight"


def convert_taming_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a taming VQModel state dict to `VQModel` keys; drop `loss.*`; add EMA buffers."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("loss."):
            continue
        if key == TAMING_CODEBOOK_KEY:
            out["quantize.codebook"] = value.clone()
            out["quantize.ema_sum"] = value.clone()
            out["quantize.ema_count"] = torch.ones(value.shape[0], dtype=value.dtype)
            continue
        new = key
        for pattern, replacement in _RENAMES:
            new = re.sub(pattern, replacement, new)
        out[new] = value
    return out


def taming_config(ddconfig: Mapping[str, Any], n_embed: int, embed_dim: int) -> VQConfig:
    """A VQConfig from taming's `model.params` (`ddconfig`, `n_embed`, `embed_dim`)."""
    if ddconfig.get("double_z", False):
        raise ConfigError("taming VQGAN with double_z=True is a KL autoencoder, not a VQ model")
    if ddconfig.get("in_channels", 3) != ddconfig.get("out_ch", 3):
        raise ConfigError("taming ddconfig: in_channels must equal out_ch")
    return VQConfig(
        image_size=ddconfig["resolution"],
        in_channels=ddconfig.get("in_channels", 3),
        channels=ddconfig["ch"],
        channel_mult=tuple(ddconfig["ch_mult"]),
        res_blocks=ddconfig["num_res_blocks"],
        attn_resolutions=tuple(ddconfig.get("attn_resolutions", ())),
        z_channels=ddconfig["z_channels"],
        code_dim=embed_dim,
        codebook_size=n_embed,
        norm_groups=32,
        norm_eps=1e-6,
        dead_code_threshold=0.0,  # a gradient-trained codebook: no restarts unless asked
    )


def load_taming_vqgan(
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    config: VQConfig | Mapping[str, Any],
    device: torch.device | str = "cpu",
) -> VQModel:
    """Load a taming-transformers VQGAN (`.ckpt` with a `state_dict`, or a state dict) strictly.

    `config` is a VQConfig, or taming's `model.params` mapping (with `ddconfig`, `n_embed` and
    `embed_dim`, as in the checkpoint's YAML). The file is read with `weights_only=True`:
    a Lightning checkpoint holding arbitrary pickled objects is refused rather than executed.
    """
    if not isinstance(config, VQConfig):
        ddconfig = config["ddconfig"]
        if not isinstance(ddconfig, Mapping):
            raise ConfigError("taming params: 'ddconfig' must be a mapping")
        config = taming_config(ddconfig, int(config["n_embed"]), int(config["embed_dim"]))
    if isinstance(checkpoint, Mapping):
        state = checkpoint
    else:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    model = VQModel(config)
    model.load_state_dict(convert_taming_state_dict(state), strict=True)
    logger.info("loaded a taming VQGAN: %s", json.dumps(config.to_dict()))
    return model.to(device).eval()
