"""Training GILL on a trained FROMAGe (docs/method.md §3): resumable, torchrun-ready.

FROMAGe's adapters stay frozen (the memory's vectors depend on them). Trained here:
the `[IMG0..r-1]` rows, the `[IMG0]` retrieval head, the mapper, then the decision.

Stage 1 (the LM in the loop, `steps`): a context (the caption, or a user's chat request for
it) runs once without gradients; `[IMG0..r-1]` run after it with gradients. Losses: NLL of
`[IMG0]` after the context (only `[IMG0]` is predicted; the rest are forced), InfoNCE between
the `[IMG0]` query and FROMAGe's frozen `W_i v` (text -> every training image, image -> the
batch), the mapper's L2 to the generator's own embeddings of the caption (divided by their
mean square, so the scale does not depend on the generator) and its length cross-entropy.
Stage 2 (`head_epochs`): the `[IMG]` rows frozen, their hidden states cached once per
context, the retrieval head and the mapper fitted for many epochs (as FROMAGe's heads are;
see fromage/retrieval_heads.py), keeping the epoch with the best validation loss.
Stage 3: the retrieve-or-generate decision (decision.py).

Files in `--out`: the GILL checkpoint (`Gill.from_pretrained`), `train_state.safetensors`,
`train-config.json`, `metrics.json`, `RECIPE.md`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mmrag.models.fromage.conversation import REQUEST_TEMPLATES
from mmrag.models.fromage.model import FrozenLM
from mmrag.models.fromage.train_config import FromageTrainConfig
from mmrag.models.gill.data import GillData, cached_states, load_gill_data
from mmrag.models.gill.losses import GillObjective, head_losses
from mmrag.models.gill.model import (
    Gill,
    GillHeads,
    generator_fingerprint,
)
from mmrag.models.gill.train_config import (
    METRICS_FILE,
    RECIPE_FILE,
    RESUMABLE_CHANGES,
    STATE_FILE,
    TRAIN_CONFIG_FILE,
    GillTrainConfig,
)
from mmrag.training import distributed
from mmrag.training.flags import (
    add_config_flags,
    add_run_flags,
    config_changes,
    log_progress,
    parse_run,
)
from mmrag.training.losses import masked_l2
from mmrag.training.schedule import warmup_cosine
from mmrag.training.state import check_resumable, load_state, read_meta, save_state

logger = logging.getLogger(__name__)


def plan(
    data: GillData, config: GillTrainConfig, step: int
) -> tuple[np.ndarray, list[bool], list[int]]:
    rng = np.random.default_rng([config.seed, 11, step])
    n = len(data.pairs.train)
    positions = rng.choice(n, size=config.batch_size, replace=n < config.batch_size)
    chat = [bool(c) for c in rng.random(config.batch_size) < config.chat_prob]
    templates = [int(t) for t in rng.integers(len(REQUEST_TEMPLATES), size=config.batch_size)]
    return positions, chat, templates


# --- stage 2 ----------------------------------------------------------------------------------


def fit_heads(
    model: FrozenLM, heads: GillHeads, data: GillData, config: GillTrainConfig, progress: bool
) -> list[dict[str, float]]:
    pd = data.pairs
    logger.info("caching [IMG] states of %d training contexts", 2 * len(pd.train))
    states, pairs = cached_states(model, pd, pd.train, config.seed)
    position = {int(i): p for p, i in enumerate(pd.train)}
    positions = torch.tensor([position[int(i)] for i in pairs])
    val_states, val_pairs = cached_states(model, pd, pd.validation[:256], config.seed + 1)
    params = [p for n, p in heads.named_parameters() if not n.startswith("decision.")]
    optimizer = torch.optim.AdamW(params, lr=config.head_lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    for epoch in tqdm(range(1, config.head_epochs + 1), desc="gill heads", disable=not progress):
        perm = torch.randperm(len(states), generator=generator)
        for start in range(0, len(perm), config.head_batch):
            b = perm[start : start + config.head_batch]
            parts = head_losses(
                model, heads, data, states[b], torch.as_tensor(pairs[b.numpy()]), positions[b]
            )
            loss = (
                config.contrastive_weight * parts["contrastive"]
                + config.l2_weight * parts["l2"]
                + config.length_weight * parts["length"]
            ) / len(b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        row = {"head_epoch": float(epoch)} | validation(model, heads, data, val_states, val_pairs)
        history.append(row)
        if best is None or row["val_l2"] + (1 - row["val_r1"]) < best[0]:
            best = (row["val_l2"] + (1 - row["val_r1"]), copy.deepcopy(heads.state_dict()))
    if best is not None:
        heads.load_state_dict(best[1])
    return history


@torch.no_grad()
def validation(
    model: FrozenLM, heads: GillHeads, data: GillData, states: torch.Tensor, pairs: np.ndarray
) -> dict[str, float]:
    """Mapper relative L2, slot-token accuracy and length accuracy; [IMG0] -> image R@1 over
    the validation images."""
    from mmrag.metrics.retrieval import recall
    from mmrag.models.fromage.pairs import split_matches

    pd = data.pairs
    embeds = model.adapters.img_tokens[None].expand(len(states), -1, -1)
    vectors, length_logits = heads.mapper(states, embeds)
    idx = torch.as_tensor(pairs)
    lengths = data.lengths[idx]
    mask = torch.arange(vectors.shape[1])[None] < lengths[:, None]
    l2 = float(masked_l2(vectors, data.targets[idx], mask)) / data.target_scale
    index = np.unique(pairs)
    position = {int(i): p for p, i in enumerate(index)}
    gallery = model.adapters.project_image(pd.features[index])
    matches = split_matches(pd, index)[[position[int(i)] for i in pairs]]
    r = recall(heads.query(states[:, 0]) @ gallery.T, matches)
    return {
        "val_l2": l2,
        "val_length_acc": float((length_logits.argmax(-1) + 1 == lengths).float().mean()),
        "val_r1": r["r1"],
        "val_r5": r["r5"],
    }


# --- training ---------------------------------------------------------------------------------


def gill_optimizer(
    model: FrozenLM, heads: GillHeads, config: GillTrainConfig
) -> torch.optim.Optimizer:
    """AdamW over the [IMG] rows, the retrieval head and the mapper; FROMAGe stays frozen."""
    for name, param in model.adapters.named_parameters():
        param.requires_grad_(name == "img_tokens")
    heads.decision.requires_grad_(False)  # stage 3 fits it (DDP wants every trained one used)
    params = [model.adapters.img_tokens]
    params += [p for n, p in heads.named_parameters() if not n.startswith("decision.")]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)


@torch.no_grad()
def init_img_rows(model: FrozenLM, seed: int) -> None:
    """Start `[IMG0]` at FROMAGe's trained `[RET]` row (so it is as likely as `[RET]` after a
    request from the first step, where a random row starts at NLL ~27) and `[IMG1..r-1]`
    near it (a seeded perturbation of half its norm, so their states differ)."""
    ret = model.adapters.ret_token[0]
    rows = model.adapters.img_tokens
    noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed))
    scale = 0.5 * ret.norm() / math.sqrt(rows.shape[1])
    rows.copy_(ret[None] + scale * noise)
    rows[0] = ret
    model.rescale_new_tokens(["img_tokens"])


class _Trained(nn.Module):
    """What a stage-1 state file holds: the [IMG] rows and the heads."""

    def __init__(self, model: FrozenLM, heads: GillHeads) -> None:
        super().__init__()
        self.img_tokens = model.adapters.img_tokens
        self.heads = heads


def train_gill(
    data: Sequence[Path],
    out: Path,
    config: GillTrainConfig,
    cache_dir: Path | None = None,
    progress: bool = True,
    model: FrozenLM | None = None,
    racm3: Any = None,
) -> dict[str, Any]:
    """Stages 1-3 (see the module docstring); resumes stage 1 from `out`'s state file.
    `model` (a FROMAGe FrozenLM) and `racm3` skip loading the shipped ones (tests)."""
    from mmrag.checkpoints import checkpoint_dir
    from mmrag.models.gill.decision import fit_decision
    from mmrag.models.ra_cm3.model import RACM3

    env = distributed.setup()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fromage_dir = Path(config.fromage) if config.fromage else checkpoint_dir("fromage")
    model = model or FrozenLM.from_pretrained(fromage_dir, device=str(env.device))
    racm3 = racm3 or RACM3.from_pretrained(config.gill.generator or None)
    gill_config = config.gill.replace(
        generator_dim=racm3.generator.config.dim, generator_fingerprint=generator_fingerprint(racm3)
    )
    split = FromageTrainConfig.load(fromage_dir / TRAIN_CONFIG_FILE)
    gdata = load_gill_data(data, model, racm3, config, split, cache_dir, progress)
    torch.manual_seed(config.seed)
    heads = GillHeads(gill_config, model.language_model.hidden_size, model.config.retrieval_dim)
    optimizer = gill_optimizer(model, heads, config)
    trained = _Trained(model, heads)
    meta: dict[str, Any] = {"step": 0, "history": []}
    if (out / STATE_FILE).is_file():
        saved = read_meta(out / STATE_FILE)["config"]
        check_resumable(out / STATE_FILE, saved, config, RESUMABLE_CHANGES)
        meta |= load_state(out / STATE_FILE, trained, optimizer)
    else:
        init_img_rows(model, config.seed)
    step, history = int(meta["step"]), list(meta["history"])
    if env.is_main:
        config.save(out / TRAIN_CONFIG_FILE)
    objective = distributed.wrap(GillObjective(model, heads, gdata, config, env), env)
    bar = tqdm(
        total=config.steps, initial=step, desc="gill", disable=not (progress and env.is_main)
    )
    while step < config.steps:
        positions, chat, templates = plan(gdata, config, step)
        local = distributed.shard(config.batch_size, env)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, config.lr, config.warmup_steps, config.steps)
        losses = objective(positions, local, chat[local], templates[local])
        optimizer.zero_grad(set_to_none=True)
        (losses["loss"] * env.loss_scale).backward()
        optimizer.step()
        model.rescale_new_tokens(["img_tokens"])
        step += 1
        row = {k: float(distributed.global_sum(v.detach(), env)) for k, v in losses.items()}
        history.append(row | {"step": float(step)})
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if env.is_main and (step % config.save_every == 0 or step == config.steps):
            state = {"step": step, "config": config.to_dict(), "history": history}
            save_state(out / STATE_FILE, trained, optimizer, state)
    bar.close()
    model.adapters.img_tokens.requires_grad_(False)
    head_history = fit_heads(model, heads, gdata, config, progress) if config.head_epochs else []
    gill = Gill(model, heads, gill_config, racm3)
    heads.decision.requires_grad_(True)
    decision = fit_decision(gill, gdata.pairs, config, progress)
    metrics = {
        "final": history[-1] if history else {},
        "head_final": head_history[-1] if head_history else {},
        "decision": decision,
        "train_config": config.to_dict(),
        "data": [str(p) for p in data],
        "history": history,
        "head_history": head_history,
    }
    if env.is_main:
        gill.save_pretrained(out)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    distributed.teardown(env)
    return metrics


# --- command line -----------------------------------------------------------------------------

# Config fields a flag overrides (type and default come from the config class).
FLAGS: dict[str, str] = {
    "fromage": "the FROMAGe checkpoint GILL builds on (default: the shipped one)",
    "steps": "stage-1 optimizer steps (the LM in the loop)",
    "batch_size": "contexts per stage-1 step",
    "lr": "peak AdamW learning rate of stage 1",
    "head_epochs": "stage-2 epochs over cached [IMG] states (0: skip)",
    "seed": "seed of every batch, context and the decision's family draw",
    "save_every": "stage-1 steps between state files",
}


def build_parser() -> argparse.ArgumentParser:
    defaults = GillTrainConfig()
    p = argparse.ArgumentParser(
        prog="mmrag train gill",
        description="Train GILL on a FROMAGe checkpoint and the RA-CM3 generator: the [IMG] "
        "tokens, the retrieval head, the mapper into the generator's caption embeddings and "
        "the retrieve-or-generate decision. Rerun the same command to resume stage 1.",
    )
    add_run_flags(
        p,
        GillTrainConfig,
        data_help="the caption-image documents FROMAGe was trained on",
        out_help="output folder",
    )
    p.add_argument(
        "--generator",
        default=None,
        metavar="DIR",
        help="RA-CM3 model folder (default: the shipped checkpoints/ra-cm3)",
    )
    add_config_flags(p, defaults, FLAGS)
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="frozen image feature cache")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--decision-only",
        action="store_true",
        help="refit only the retrieve-or-generate decision of the GILL in --out (stage 3)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> GillTrainConfig:
    config = GillTrainConfig.load(args.config) if args.config else GillTrainConfig()
    changes = config_changes(args, FLAGS)
    if args.generator:
        changes["gill"] = config.gill.replace(generator=str(args.generator))
    return config.replace(**changes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config = parse_run(build_parser(), argv, config_from_args)
    log_progress()
    if args.decision_only:
        from mmrag.models.gill.decision import refit_decision

        metrics = refit_decision(args.out, args.data, args.cache_dir, not args.no_progress)
        with (args.out / RECIPE_FILE).open("a", encoding="utf-8") as f:
            f.write(f"\n```\n{shlex.join(['mmrag', 'train', 'gill', *argv])}\n```\n\n")
            f.write("Decision (held-out): " + json.dumps(metrics["decision"]["heldout"]) + "\n")
        return 0
    metrics = train_gill(args.data, args.out, config, args.cache_dir, not args.no_progress)
    recipe = [
        "# GILL adapters: recipe",
        "",
        "On the FROMAGe adapters and the RA-CM3 generator named in train-config.json.",
        "",
        "```",
        shlex.join(["mmrag", "train", "gill", *argv]),
        "```",
        "",
        "Decision (held-out families): " + json.dumps(metrics["decision"].get("heldout", {})),
        "",
    ]
    (args.out / RECIPE_FILE).write_text("\n".join(recipe), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
