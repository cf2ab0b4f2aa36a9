"""Training the VQ image tokenizer: resumable, deterministic given a seed, held-out PSNR.

Images come from document collections (JSONL files or folders holding `documents.jsonl`).
Whole groups (metadata `base`: an emoji and all its skin-tone / gender variants) are held
out, so the held-out PSNR measures reconstruction of emoji the tokenizer never saw in any
variant. Documents without the group key (photos) always train.

Files in `--out`: `config.json` + `model.safetensors` (the tokenizer, loadable with
`VQModel.from_pretrained`), `train_state.safetensors` (optimizer moments, RNG state, step,
history and a copy of the weights, so a run resumes from this one file even if it died
between two writes), `train-config.json` and `metrics.json`.

Under `torchrun` every rank builds the same global batch and trains on its shard (DDP); each
rank's loss is its shard's share of the global mean, and the codebook's EMA statistics and
restart candidates are combined over ranks, so N processes end with the one-process weights
(with the adversarial term, close to them: each rank takes the adaptive weight of its shard).

`--init DIR --decoder-only` refines a trained VQ's decoder (optionally with the perceptual and
adversarial losses, `adversarial.py`) with the encoder and codebook frozen: every
image keeps its codes, so the generators trained on them keep working.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional
from tqdm import tqdm

from mmrag.config import Config, ConfigError
from mmrag.models.vq.adversarial import (
    PatchDiscriminator,
    adaptive_weight,
    hinge_discriminator_loss,
)
from mmrag.models.vq.data import ImageSet, load_images, split_holdout, to_unit
from mmrag.models.vq.evaluate import reconstructions
from mmrag.models.vq.model import (
    DECODING_PREFIXES,
    PerceptualLoss,
    VQConfig,
    VQModel,
    VQOutput,
    code_perplexity,
    psnr,
)
from mmrag.training.distributed import (
    Collectives,
    DistEnv,
    global_sum,
    setup,
    shard,
    teardown,
    wrap,
)
from mmrag.training.flags import (
    add_config_flags,
    add_run_flags,
    config_changes,
    log_progress,
    parse_run,
)
from mmrag.training.schedule import warmup_cosine
from mmrag.training.state import atomic_save, check_resumable

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.safetensors"
TRAIN_CONFIG_FILE = "train-config.json"
METRICS_FILE = "metrics.json"
# Fields that may change when a run resumes (they do not change what a step computes).
RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "save_every", "eval_images"})
PIXEL_LOSSES = {"mse": functional.mse_loss, "l1": functional.l1_loss}


@dataclasses.dataclass(frozen=True)
class VQTrainConfig(Config):
    """Reconstruction training of a `VQModel` (MSE + commitment [+ perceptual])."""

    preset_prefix: ClassVar[str] = "train-vq"

    vq: VQConfig = dataclasses.field(default_factory=VQConfig)
    steps: int = 20_000
    batch_size: int = 32
    lr: float = 4e-4  # AdamW peak; linear warm-up, cosine decay to lr * min_lr_ratio
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # Weight of the EfficientNet-Lite0 feature distance (0: pixels only, which is what PSNR
    # rewards; > 0 sharpens edges at some PSNR cost and ~25% more time per step).
    perceptual_weight: float = 0.0
    pixel_loss: str = "mse"  # "mse" (what PSNR rewards) or "l1" (VQGAN's)
    # Weight of the VQGAN adversarial term (PatchGAN, hinge, adaptive weight; 0: none), from
    # step `adversarial_start` on (the discriminator trains from then too).
    adversarial_weight: float = 0.0
    adversarial_start: int = 0
    # Start from this VQ checkpoint (a folder with config.json + model.safetensors; its
    # config must be `vq`). With `decoder_only`, only post_quant_conv and the decoder train:
    # the encoder and the codebook stay frozen, so every image keeps its codes and models
    # trained on those codes keep working with the refined decoder (an asymmetric VQGAN's
    # second stage, Zhu et al. 2023).
    init: str = ""
    decoder_only: bool = False
    hflip: bool = True  # random horizontal flips (emoji and photos are flip-tolerant)
    holdout: float = 0.1  # fraction of groups held out for the PSNR
    group_key: str = "base"
    seed: int = 0
    eval_every: int = 500
    eval_images: int = 512  # held-out images scored at each evaluation (the first N)
    save_every: int = 500

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("VQTrainConfig: steps >= 1, batch_size >= 1, lr > 0")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError("VQTrainConfig: holdout must be in [0, 1)")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("VQTrainConfig: warmup_steps >= 0, min_lr_ratio in [0, 1]")
        if min(self.eval_every, self.save_every, self.eval_images) < 1:
            raise ConfigError("VQTrainConfig: eval_every, save_every, eval_images must be >= 1")
        if self.perceptual_weight < 0 or self.grad_clip <= 0:
            raise ConfigError("VQTrainConfig: perceptual_weight >= 0, grad_clip > 0")
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ConfigError(f"VQTrainConfig: pixel_loss must be one of {sorted(PIXEL_LOSSES)}")
        if self.adversarial_weight < 0 or self.adversarial_start < 0:
            raise ConfigError("VQTrainConfig: adversarial_weight >= 0, adversarial_start >= 0")
        if self.decoder_only and not self.init:
            raise ConfigError("VQTrainConfig: decoder_only refines a trained VQ: give init")


# --- data ---------------------------------------------------------------------------------


class BatchOrder:
    """Step -> image indices: epoch-wise permutations seeded by (seed, epoch), so the order is
    a pure function of the step and a resumed run sees the very batches it would have."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = range(step * self.batch_size, (step + 1) * self.batch_size)
        return torch.stack([self._perm(p // self.n)[p % self.n] for p in pos])

    def flips(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * step + 1)
        return torch.rand(self.batch_size, generator=g) < 0.5


# --- state ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Adversary:
    """The discriminator and its optimizer (when `adversarial_weight` > 0)."""

    disc: PatchDiscriminator
    optimizer: torch.optim.Optimizer


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.{index}.{name}": torch.as_tensor(value)
        for index, slots in optimizer.state_dict()["state"].items()
        for name, value in slots.items()
    }


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], groups: str
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(groups)})


def save_state(
    out: Path,
    model: VQModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: VQTrainConfig,
    history: list[dict[str, float]],
    adversary: Adversary | None = None,
) -> None:
    """Weights (`model.safetensors`) and the training state, each written atomically."""
    model.config.save(out / "config.json")
    weights = dict(model.state_dict())
    atomic_save(weights, out / "model.safetensors", {"step": str(step)})
    tensors = {f"model.{k}": v for k, v in weights.items()}
    tensors |= _optimizer_tensors("optimizer", optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "step": str(step),
        "config": config.to_json(),
        "param_groups": json.dumps(optimizer.state_dict()["param_groups"]),
        "history": json.dumps(history),
    }
    if adversary is not None:
        tensors |= {f"disc.{k}": v for k, v in adversary.disc.state_dict().items()}
        tensors |= _optimizer_tensors("disc_optimizer", adversary.optimizer)
        meta["disc_param_groups"] = json.dumps(adversary.optimizer.state_dict()["param_groups"])
    atomic_save(tensors, out / STATE_FILE, meta)


def load_state(
    out: Path,
    model: VQModel,
    optimizer: torch.optim.Optimizer,
    config: VQTrainConfig,
    adversary: Adversary | None = None,
) -> tuple[int, list[dict[str, float]]]:
    """Restore weights, optimizers, RNG from `out/train_state.safetensors`; (step, history)."""
    path = out / STATE_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    check_resumable(path, json.loads(meta["config"]), config, RESUMABLE_CHANGES)
    model.load_state_dict(
        {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
        strict=True,
    )
    _restore_optimizer(optimizer, "optimizer", tensors, meta["param_groups"])
    if adversary is not None:
        adversary.disc.load_state_dict(
            {k.removeprefix("disc."): v for k, v in tensors.items() if k.startswith("disc.")},
            strict=True,
        )
        groups = meta["disc_param_groups"]
        _restore_optimizer(adversary.optimizer, "disc_optimizer", tensors, groups)
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), json.loads(meta["history"])


# --- evaluation -------------------------------------------------------------------------------


def evaluate(
    model: VQModel, pixels: torch.Tensor, device: torch.device, batch_size: int = 64
) -> dict[str, float]:
    """Mean per-image PSNR (dB, [0, 1] scale) of encode -> decode and the fraction of the
    codebook those images use."""
    scores, used = [], torch.zeros(model.config.codebook_size, dtype=torch.bool)
    for x, codes, recon in reconstructions(model, pixels, device, batch_size):
        scores.append(psnr(recon, x).cpu())
        used[codes.flatten().cpu()] = True
    return {"psnr": float(torch.cat(scores).mean()), "usage": float(used.float().mean())}


# --- training -------------------------------------------------------------------------------


def init_weights(model: VQModel, folder: Path) -> None:
    """Load the VQ checkpoint `folder` into `model`; its config must be the model's."""
    if VQConfig.load(folder / "config.json") != model.config:
        raise ValueError(f"the VQ checkpoint {folder} has another architecture than --config's")
    state = VQModel.from_pretrained(folder).state_dict()
    model.load_state_dict(state, strict=True)


def trainable(model: VQModel, decoder_only: bool) -> list[nn.Parameter]:
    """The parameters that train: all, or (decoder_only) those that turn codes into pixels
    (`DECODING_PREFIXES`: post_quant_conv's and the decoder's), with the rest frozen."""
    if not decoder_only:
        return list(model.parameters())
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(DECODING_PREFIXES))
        if p.requires_grad:
            params.append(p)
    return params


class DecoderRefiner(nn.Module):
    """A training forward that leaves the codes alone: frozen encoder and codebook (no EMA
    update, no restarts), then the trainable post_quant_conv and decoder."""

    def __init__(self, model: VQModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> VQOutput:
        with torch.no_grad():
            codes = self.model.encode(x)  # (B, h, w)
            z_q = self.model.quantize.lookup(codes)  # (B, D, h, w)
        recon = self.model.decoder(self.model.post_quant_conv(z_q))  # (B, 3, S, S)
        counts = torch.bincount(codes.flatten(), minlength=self.model.config.codebook_size)
        perplexity = code_perplexity(counts.float(), counts.sum().float())
        return VQOutput(recon, codes, recon.new_zeros(()), perplexity)


def train_vq(
    data: Sequence[Path],
    out: Path,
    config: VQTrainConfig,
    device: torch.device | str = "cpu",
    progress: bool = True,
    images: ImageSet | None = None,
    env: DistEnv | None = None,
) -> dict[str, float]:
    """Train (or resume, when `out` holds a training state) and return the final metrics.

    `images` skips reading `data` (tests, or callers that already hold the pixels). In a
    torchrun job (`env`) rank 0 writes the files and evaluates; `device` is the rank's own.
    """
    env = env or DistEnv()
    out, device = Path(out), env.device if env.distributed else torch.device(device)
    if config.batch_size < env.world_size:
        raise ValueError(f"batch_size {config.batch_size} < {env.world_size} processes")
    out.mkdir(parents=True, exist_ok=True)
    images = images or load_images(data, config.vq.image_size, config.group_key)
    train_idx, held_idx = split_holdout(images.groups, config.holdout, config.seed)
    train_pixels = images.pixels[train_idx]
    eval_pixels = images.pixels[held_idx[: config.eval_images]]
    logger.info("train %d images, held out %d", len(train_idx), len(held_idx))

    torch.manual_seed(config.seed)
    model = VQModel(config.vq).to(device).train()
    if config.init:
        init_weights(model, Path(config.init))
    if env.distributed:
        model.quantize.sync = Collectives(env)
    trained = trainable(model, config.decoder_only)
    # The codebook buffers are kept equal by `sync`, not by DDP's broadcast from rank 0.
    net: nn.Module = DecoderRefiner(model) if config.decoder_only else model
    ddp = wrap(net, env, broadcast_buffers=False)
    optimizer = torch.optim.AdamW(
        trained, lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay
    )
    perceptual = PerceptualLoss().to(device) if config.perceptual_weight > 0 else None
    adversary = None
    if config.adversarial_weight > 0:
        disc = PatchDiscriminator().to(device)
        betas = (0.5, 0.9)  # VQGAN's, for both players
        adversary = Adversary(disc, torch.optim.AdamW(disc.parameters(), config.lr, betas))
        ddp_disc = wrap(disc, env)
    pixel_loss = PIXEL_LOSSES[config.pixel_loss]
    step, history = 0, list[dict[str, float]]()
    if (out / STATE_FILE).is_file():
        step, history = load_state(out, model, optimizer, config, adversary)
        logger.info("resuming %s at step %d of %d", out, step, config.steps)
    if env.is_main:
        config.save(out / TRAIN_CONFIG_FILE)
    order = BatchOrder(len(train_pixels), config.batch_size, config.seed)
    rows = shard(config.batch_size, env)  # this rank's slice of every global batch
    share = (rows.stop - rows.start) / config.batch_size  # of the global mean
    bar = tqdm(
        total=config.steps,
        initial=step,
        desc="vq",
        unit="step",
        disable=not (progress and env.is_main),
    )
    while step < config.steps:
        x = to_unit(train_pixels[order.indices(step)])  # (B, 3, S, S)
        if config.hflip:
            flips = order.flips(step)
            x[flips] = x[flips].flip(-1)
        x = x[rows].to(device)  # (B / world, 3, S, S)
        lr = warmup_cosine(step, config.lr, config.warmup_steps, config.steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        result = ddp(x)
        pixel_term = pixel_loss(result.recon, x)
        reconstruction = pixel_term
        if perceptual is not None:
            reconstruction = reconstruction + config.perceptual_weight * perceptual(result.recon, x)
        loss = reconstruction + result.commitment_loss
        adversarial = adversary is not None and step >= config.adversarial_start
        if adversarial:
            fooling = -ddp_disc(result.recon).mean()
            last = model.decoder.conv_out.weight
            weight = adaptive_weight(reconstruction, fooling, last)
            loss = loss + config.adversarial_weight * weight * fooling
        optimizer.zero_grad(set_to_none=True)
        (loss * share * env.loss_scale).backward()
        torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
        optimizer.step()
        if adversarial and adversary is not None:
            for group in adversary.optimizer.param_groups:
                group["lr"] = lr
            real, fake = ddp_disc(x), ddp_disc(result.recon.detach())
            disc_loss = hinge_discriminator_loss(real, fake)
            adversary.optimizer.zero_grad(set_to_none=True)
            (disc_loss * share * env.loss_scale).backward()
            adversary.optimizer.step()
        step += 1
        bar.update(1)
        shown = {config.pixel_loss: f"{pixel_term.item():.4f}"}
        bar.set_postfix(shown | {"ppl": f"{result.perplexity.item():.0f}"})
        if step % config.eval_every == 0 or step == config.steps:
            row = {"step": float(step), "loss": global_sum(loss * share, env).item()}
            row |= {config.pixel_loss: global_sum(pixel_term * share, env).item()}
            row |= {"perplexity": result.perplexity.item(), "ema_usage": model.quantize.usage()}
            if adversarial:
                row |= {"disc_loss": global_sum(disc_loss * share, env).item()}
                row |= {"adaptive_weight": weight.item()}
            if len(eval_pixels) and env.is_main:
                row |= {f"heldout_{k}": v for k, v in evaluate(model, eval_pixels, device).items()}
            history.append(row)
            logger.info("step %d: %s", step, {k: round(v, 4) for k, v in row.items()})
        if env.is_main and (step % config.save_every == 0 or step == config.steps):
            save_state(out, model, optimizer, step, config, history, adversary)
    bar.close()
    final = history[-1] if history else {"step": float(step)}
    metrics = {
        "final": final,
        "history": history,
        "counts": {
            "train": len(train_idx),
            "heldout": len(held_idx),
            "heldout_scored": len(eval_pixels),
        },
        "train_config": config.to_dict(),
        "processes": env.world_size,
        "data": [str(p) for p in data],
    }
    if env.is_main:
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return final


# --- command line ---------------------------------------------------------------------------

# Config fields a flag overrides (type and default come from the config class).
FLAGS: dict[str, str] = {
    "steps": "optimizer steps in all; a resumed run continues up to this count",
    "batch_size": "images per step",
    "lr": "peak AdamW learning rate (warm-up, then cosine decay to lr * min_lr_ratio)",
    "perceptual_weight": (
        "weight of the frozen EfficientNet-Lite0 feature distance (0: pixels only; needs the "
        "`lite` extra)"
    ),
    "pixel_loss": "pixel reconstruction loss: mse or l1",
    "adversarial_weight": (
        "weight of the VQGAN adversarial term (patch discriminator, hinge loss, adaptive "
        "weight; 0: none)"
    ),
    "adversarial_start": "step from which the adversarial term and discriminator train",
    "init": (
        "start from this VQ checkpoint folder (config.json + model.safetensors); its "
        "architecture replaces --preset"
    ),
    "holdout": "fraction of --group-key groups held out for the PSNR",
    "group_key": "metadata key whose groups are held out whole (documents without it train)",
    "seed": "seed of the split, the initialisation, the batch order and code restarts",
    "eval_every": "steps between held-out evaluations (PSNR, code usage)",
    "eval_images": "held-out images scored at each evaluation",
    "save_every": "steps between checkpoints (weights + training state)",
}


def build_parser() -> argparse.ArgumentParser:
    defaults = VQTrainConfig()
    p = argparse.ArgumentParser(
        prog="mmrag train vq",
        description=(
            "Train the VQ image tokenizer (images -> a grid of discrete codes -> images) on the "
            "images of document collections. Writes config.json + model.safetensors (the "
            "tokenizer), train_state.safetensors (to resume), metrics.json to --out. Running "
            "the same command again resumes from the state file; the result is the same as an "
            "uninterrupted run. Runs data-parallel under torchrun (torchrun --nproc-per-node N "
            "-m mmrag.models.vq.train ...) with the same result as one process."
        ),
    )
    add_run_flags(
        p,
        VQTrainConfig,
        data_help="JSONL files or folders holding documents.jsonl (e.g. .cache/data/emoji)",
        out_help="output folder",
    )
    p.add_argument(
        "--preset",
        default="small",
        metavar="NAME",
        help="VQ architecture preset (src/mmrag/presets/vq-NAME.json: tiny, small); "
        "ignored with --config (default small)",
    )
    add_config_flags(p, defaults, FLAGS)
    p.add_argument(
        "--decoder-only",
        action="store_true",
        default=None,
        help="with --init: train only post_quant_conv and the decoder; the encoder and codebook "
        "stay frozen, so every image keeps its codes (models trained on them keep working)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: torch's choice, all cores)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu or cuda:0 (default: cpu; under torchrun, each rank's own "
        "GPU when there are GPUs)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> VQTrainConfig:
    if args.config:
        config = VQTrainConfig.load(args.config)
    elif args.init:
        config = VQTrainConfig(vq=VQConfig.load(Path(args.init) / "config.json"))
    else:
        config = VQTrainConfig(vq=VQConfig.preset(args.preset))
    changes = config_changes(args, FLAGS)
    if args.decoder_only:
        changes["decoder_only"] = True
    return config.replace(**changes) if changes else config


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["mmrag", "train", "vq", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config = parse_run(build_parser(), argv, config_from_args)
    env = setup(args.device)
    log_progress(env.is_main)
    logger.info("command: %s", command_line(argv))
    finished = False
    try:
        final = train_vq(args.data, args.out, config, env.device, not args.no_progress, env=env)
        finished = True
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 1
    finally:
        teardown(env, wait=finished)
    logger.info("final: %s", json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
