"""Training RA-CM3 (`mmrag train ra-cm3`) and its vanilla baseline (`--retrieval off`).

Each step draws K from {0, 1, 2} (RA) or K = 0 (vanilla), then fills a fixed budget of
`tokens_per_step` tokens with documents in a seeded epoch order, each prefixed by K of its
precomputed retrievals (ra_cm3_data.py), so both models take the same number of steps with
the same token budget: equal compute (RA-CM3 section 4 compares at equal compute). The
retrieval-augmented model sees fewer main documents per step, because the retrieved ones
take part of the budget, and its longer sequences fill the budget slightly less (~9% fewer
tokens over the shipped run). Loss: `L_main + alpha * L_retr` (section 3.3, alpha = 0.1), each a
mean over its tokens.

Files in `--out`: the model (`generator/`, `tokenizer/`, `vq/` copied from `--vq`,
`config.json`: loadable with `mmrag.models.ra_cm3.model.RACM3.from_pretrained`), the prepared data
(`corpus.safetensors`, `split.json`, `memory/` of the training documents,
`retrieval.safetensors`, `val_retrieval.safetensors`: ra_cm3_prepare.py),
`train_state.safetensors` (resume), `train-config.json` and `metrics.json`. Running the
same command again resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional
from tqdm import tqdm

from mmrag.checkpoints import checkpoint_dir
from mmrag.encoders.base import EncoderSpec
from mmrag.models.ra_cm3.copy_hints import NO_HINT
from mmrag.models.ra_cm3.data import (
    Example,
    build_sequence,
    collate,
)
from mmrag.models.ra_cm3.generator import Generator, GeneratorConfig
from mmrag.models.ra_cm3.model import CONFIG_FILE as RACM3_CONFIG_FILE
from mmrag.models.ra_cm3.model import RACM3Config
from mmrag.models.ra_cm3.prepare import Prepared, check_sizes, monitored, prepare
from mmrag.models.ra_cm3.train_config import (
    METRICS_FILE,
    RESUMABLE_CHANGES,
    STATE_FILE,
    TRAIN_CONFIG_FILE,
    RACM3TrainConfig,
)
from mmrag.training import distributed
from mmrag.training.distributed import DistEnv
from mmrag.training.flags import (
    add_config_flags,
    add_run_flags,
    config_changes,
    log_progress,
    parse_run,
)
from mmrag.training.schedule import warmup_cosine
from mmrag.training.state import check_resumable, load_state, read_meta, save_state

logger = logging.getLogger(__name__)

# --- batches and loss -----------------------------------------------------------------------


class Batcher:
    """Step -> a list of examples filling `tokens_per_step` (rows x padded width), a pure
    function of (seed, step, cursor): a resumed run sees the very batches it would have."""

    def __init__(self, prep: Prepared, config: RACM3TrainConfig) -> None:
        self.prep, self.config = prep, config
        self._perm: tuple[int, np.ndarray] | None = None

    def _row(self, cursor: int) -> int:
        n = len(self.prep.train_rows)
        epoch = cursor // n
        if self._perm is None or self._perm[0] != epoch:
            g = np.random.default_rng([self.config.seed, 17, epoch])
            self._perm = (epoch, g.permutation(n))
        return int(self._perm[1][cursor % n])

    def batch(self, step: int, cursor: int) -> tuple[list[Example], int]:
        """The examples of `step` starting at document `cursor`, and the next cursor."""
        cfg, prep = self.config, self.prep
        rng = np.random.default_rng([cfg.seed, step])
        k = int(rng.choice(cfg.k_choices)) if cfg.retrieval else 0
        batch: list[Example] = []
        width = 0
        while True:
            pos = self._row(cursor)
            retrieved: list[int] = []
            if k and prep.found is not None:
                variant = int(rng.integers(prep.found.shape[1]))
                retrieved = [int(j) for j in prep.found[pos, variant, :k] if j >= 0]
            main = int(prep.train_rows[pos])
            mode = cfg.modes.draw(rng)
            if (
                cfg.same_document
                and retrieved
                and mode in ("plain", "caption")
                and rng.random() < cfg.same_document
            ):
                retrieved = [main, *retrieved[: k - 1]]
            ex = example(prep, cfg, main, retrieved, mode, rng)
            wider = max(width, len(ex.ids))
            if batch and (len(batch) + 1) * wider > cfg.tokens_per_step:
                return batch, cursor
            batch.append(ex)
            width, cursor = wider, cursor + 1


def example(
    prep: Prepared,
    config: RACM3TrainConfig,
    main: int,
    retrieved: Sequence[int],
    mode: str,
    rng: np.random.Generator,
) -> Example:
    """The training sequence of corpus row `main` after `retrieved`, with the copy hints the
    generator takes."""
    gen = config.generator
    return build_sequence(
        prep.tokenizer,
        prep.corpus,
        main,
        retrieved,
        mode,
        rng,
        prep.grid,
        gen.hint_slots,
        gen.text_hints,
        config.same_document > 0,
    )


def token_nll(
    model: torch.nn.Module, ids: torch.Tensor, hints: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token next-token NLL (B, T - 1) of right-padded ids (B, T) with their copy hints
    (B, T, S) if any."""
    logits = model(ids[:, :-1], hints=None if hints is None else hints[:, :-1])  # (B, T-1, V)
    flat = functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    return flat.view(ids.shape[0], -1)  # (B, T-1)


def ra_loss(
    nll: torch.Tensor, main: torch.Tensor, retrieved: torch.Tensor, alpha: float, env: DistEnv
) -> tuple[torch.Tensor, dict[str, float]]:
    """`L_main + alpha * L_retr`, each normalised by its global token count (all ranks)."""
    counts = distributed.global_sum(torch.stack([main.sum(), retrieved.sum()]).float(), env)
    main_sum, retr_sum = (nll * main).sum(), (nll * retrieved).sum()
    loss = main_sum / counts[0].clamp(min=1)
    if counts[1] > 0:
        loss = loss + alpha * retr_sum / counts[1]
    stats = {"main_tokens": float(counts[0]), "retrieved_tokens": float(counts[1])}
    return loss, stats


@torch.no_grad()
def validate(
    model: Generator, prep: Prepared, config: RACM3TrainConfig, device: torch.device
) -> dict[str, float]:
    """NLL of the validation variants (else the held-out ones) per image code (plain mode:
    caption [+ retrieval] -> image) and per caption token (caption mode: image [+ retrieval]
    -> caption)."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng([config.seed, 2**31])  # apart from step seeds
    rows = monitored(prep.heldout_rows, prep.validation_rows)[: config.val_docs]
    tok = prep.tokenizer
    sums = {"image": [0.0, 0], "caption": [0.0, 0]}
    for r, main in enumerate(rows.tolist()):
        retrieved: list[int] = []
        if prep.val_found is not None:
            retrieved = [int(j) for j in prep.val_found[r, 0] if j >= 0]
        for mode, key in (("plain", "image"), ("caption", "caption")):
            ex = example(prep, config, main, retrieved, mode, rng)
            batch = collate([ex], tok.pad_id)
            ids = batch["ids"].to(device)
            hints = batch["hints"].to(device) if "hints" in batch else None
            nll = token_nll(model, ids, hints)[0]
            targets = ids[0, 1:]
            kind = (
                tok.image_offset <= targets
                if key == "image"
                else ((tok.text_offset <= targets) & (targets < tok.image_offset))
            )
            chosen = batch["main"][0].to(device) & kind
            sums[key][0] += float(nll[chosen].sum())
            sums[key][1] += int(chosen.sum())
    model.train(was_training)
    return {f"val_{k}_nll": s / max(1, n) for k, (s, n) in sums.items()}


# --- training -------------------------------------------------------------------------------


def write_model(out: Path, model: Generator, config: RACM3TrainConfig) -> None:
    """The loadable model folder: generator weights and the inference config."""
    model.save_pretrained(out / "generator")
    RACM3Config(
        trained_with_retrieval=config.retrieval, same_document_slot=config.same_document > 0
    ).save(out / RACM3_CONFIG_FILE)


def train_ra_cm3(
    data: Sequence[Path],
    out: Path,
    config: RACM3TrainConfig,
    vq_dir: Path | None = None,
    encoder: EncoderSpec | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train (or resume) and return the final metrics row."""
    env = distributed.setup(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        prep = prepare(
            data, out, config, vq_dir or checkpoint_dir("vq"), encoder or EncoderSpec(), progress
        )
    distributed.barrier(env)
    if not env.is_main:
        prep = prepare(
            data, out, config, vq_dir or checkpoint_dir("vq"), encoder or EncoderSpec(), False
        )
    check_sizes(prep, config)
    config = resolve_generator(config, prep)
    torch.manual_seed(config.seed)
    model = Generator(config.generator).to(env.device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    step, cursor, history, tokens = 0, 0, list[dict[str, float]](), 0
    if (out / STATE_FILE).is_file():
        _check_resumable(out / STATE_FILE, config)
        meta = load_state(out / STATE_FILE, model, optimizer)
        step, cursor, history, tokens = (
            meta["step"],
            meta["cursor"],
            meta["history"],
            meta["tokens"],
        )
        logger.info("resuming %s at step %d of %d", out, step, config.steps)
    if env.is_main:
        config.save(out / TRAIN_CONFIG_FILE)
    wrapped = distributed.wrap(model, env)
    batcher = Batcher(prep, config)
    bar = tqdm(
        total=config.steps,
        initial=step,
        desc="ra-cm3",
        unit="step",
        disable=not (progress and env.is_main),
    )
    while step < config.steps:
        examples, cursor = batcher.batch(step, cursor)
        batch = collate(examples, prep.tokenizer.pad_id)
        part = distributed.shard(len(examples), env)
        ids = batch["ids"][part].to(env.device)
        hints = batch["hints"][part].to(env.device) if "hints" in batch else None
        if hints is None and config.generator.hint_slots:  # every step uses the hint table
            slots = config.generator.hint_slots
            hints = torch.full((*ids.shape, slots), NO_HINT, device=env.device)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(
                step, config.lr, config.warmup_steps, config.steps, config.min_lr_ratio
            )
        nll = token_nll(wrapped, ids, hints)
        loss, stats = ra_loss(
            nll,
            batch["main"][part].to(env.device),
            batch["retrieved"][part].to(env.device),
            config.alpha,
            env,
        )
        optimizer.zero_grad(set_to_none=True)
        (loss * env.loss_scale).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step, tokens = step + 1, tokens + batch["ids"].numel()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", docs=len(examples))
        if env.is_main and (step % config.eval_every == 0 or step == config.steps):
            row = {
                "step": float(step),
                "loss": loss.item(),
                "tokens": float(tokens),
                "docs_in_step": float(len(examples)),
                **stats,
                **validate(model, prep, config, env.device),
            }
            history.append(row)
            logger.info("step %d: %s", step, {k: round(v, 4) for k, v in row.items()})
        if env.is_main and (step % config.save_every == 0 or step == config.steps):
            meta = {
                "step": step,
                "cursor": cursor,
                "history": history,
                "tokens": tokens,
                "config": config.to_dict(),
            }
            save_state(out / STATE_FILE, model, optimizer, meta)
            write_model(out, model, config)
    bar.close()
    final = history[-1] if history else {"step": float(step)}
    if env.is_main:
        _write_metrics(out, final, history, prep, config, data)
    distributed.teardown(env)
    return final


def resolve_generator(config: RACM3TrainConfig, prep: Prepared) -> RACM3TrainConfig:
    """With `image_positions`, the generator's grid embeddings over the tokenizer's codes;
    with `copy_hints`, one hint table per retrieval rank (also in the vanilla baseline, so
    both have the same architecture; it never gets a hint)."""
    generator, tok = config.generator, prep.tokenizer
    if config.image_positions:
        generator = generator.replace(
            image_grid=prep.grid, image_first=tok.image_offset, image_count=tok.config.image_codes
        )
    if config.copy_hints:
        generator = generator.replace(
            hint_slots=max(1, *config.k_choices) + (config.same_document > 0),
            hint_codes=tok.config.image_codes,
            text_hints=config.text_hints,
        )
    return config.replace(generator=generator)


def _check_resumable(path: Path, config: RACM3TrainConfig) -> None:
    check_resumable(path, read_meta(path)["config"], config, RESUMABLE_CHANGES)


def _write_metrics(
    out: Path,
    final: dict[str, float],
    history: list[dict[str, float]],
    prep: Prepared,
    config: RACM3TrainConfig,
    data: Sequence[Path],
) -> None:
    metrics = {
        "final": final,
        "history": history,
        "counts": {
            "corpus": len(prep.corpus),
            "train": len(prep.train_rows),
            "heldout": len(prep.heldout_rows),
            "validation": len(prep.validation_rows),
        },
        "parameters": Generator(config.generator).num_parameters(),
        "train_config": config.to_dict(),
        "data": [str(p) for p in data],
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


# --- command line ---------------------------------------------------------------------------

# Config fields a flag overrides (type and default come from the config class).
FLAGS: dict[str, str] = {
    "steps": "optimizer steps in all; a resumed run continues up to this count",
    "tokens_per_step": "token budget of one step (rows x padded width), both models",
    "lr": "peak AdamW learning rate (warm-up, then cosine decay to lr * min_lr_ratio)",
    "alpha": "weight of the loss on the retrieved documents (L_main + alpha L_retr)",
    "holdout": "fraction of multi-variant groups that give up one held-out variant",
    "validation": (
        "fraction of multi-variant groups, apart from the held-out ones, that give up one "
        "variant to a validation set (out of training and memory, like the held-out ones; for"
        " choosing decoding settings with eval ra-cm3 --split validation)"
    ),
    "seed": "seed of the split, the initialisation, the batches and the query dropout",
    "eval_every": "steps between validations (validation, else held-out, variants)",
    "save_every": "steps between checkpoints (model + training state)",
    "val_docs": "validation (else held-out) documents scored at each validation",
    "same_document": (
        "share of plain and caption-infilling examples that retrieve the document itself, "
        "through a hint slot of its own, so the model learns to copy a document the memory "
        "holds (needs --copy-hints on)"
    ),
}


def build_parser() -> argparse.ArgumentParser:
    defaults = RACM3TrainConfig()
    p = argparse.ArgumentParser(
        prog="mmrag train ra-cm3",
        description=(
            "Train the RA-CM3 generator on image + caption documents, each prefixed by K in "
            "{0, 1, 2} documents retrieved from a memory of the training documents (relevance "
            "cap 0.9, self-exclusion, redundancy skipping, 20%% query dropout), loss L_main + "
            "0.1 L_retr. --retrieval off trains the vanilla baseline with identical steps and "
            "tokens. Writes a model folder loadable by mmrag generate (--model). Running the "
            "same command again resumes."
        ),
    )
    add_run_flags(
        p,
        RACM3TrainConfig,
        data_help="JSONL files or folders holding documents.jsonl (e.g. .cache/data/emoji)",
        out_help="output folder",
    )
    p.add_argument(
        "--retrieval",
        choices=["on", "off"],
        help="on: RA-CM3; off: the vanilla baseline (default on, or --config's)",
    )
    p.add_argument(
        "--image-positions",
        choices=["on", "off"],
        help="row and column embeddings for image codes, so attention can align a retrieved "
        "image with the one being written cell by cell "
        f"(default {'on' if defaults.image_positions else 'off'})",
    )
    p.add_argument(
        "--copy-hints",
        choices=["on", "off"],
        help="give the generator each retrieved image's code at the cell it is predicting "
        "(copy_hints.py), a direct path for copying from retrieved images "
        f"(default {'on' if defaults.copy_hints else 'off'})",
    )
    p.add_argument(
        "--text-hints",
        choices=["on", "off"],
        help="with --copy-hints on, also give it the token each retrieved caption suggests "
        "next at every token of the caption being written (copy_hints.suggest) "
        f"(default {'on' if defaults.text_hints else 'off'})",
    )
    p.add_argument(
        "--preset",
        default="small",
        metavar="NAME",
        help="generator preset (presets/generator-NAME.json; default small); ignored with --config",
    )
    add_config_flags(p, defaults, FLAGS)
    p.add_argument(
        "--vq",
        type=Path,
        metavar="DIR",
        help="VQ image tokenizer folder (default: the shipped checkpoints/vq)",
    )
    p.add_argument(
        "--encoder", default="lite", help="retriever encoder for the training memory (default lite)"
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: torch's choice; use 1 on shared cores)",
    )
    p.add_argument("--device", help="torch device (default cpu; cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> RACM3TrainConfig:
    if args.config:
        config = RACM3TrainConfig.load(args.config)
    else:
        config = RACM3TrainConfig(generator=GeneratorConfig.preset(args.preset))
    changes: dict[str, Any] = config_changes(args, FLAGS)
    if args.retrieval is not None:  # unset keeps --config's choice (a vanilla run stays vanilla)
        changes["retrieval"] = args.retrieval == "on"
    if args.image_positions is not None:
        changes["image_positions"] = args.image_positions == "on"
    if args.copy_hints is not None:
        changes["copy_hints"] = args.copy_hints == "on"
    if args.text_hints is not None:
        changes["text_hints"] = args.text_hints == "on"
    return config.replace(**changes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config = parse_run(build_parser(), argv, config_from_args)
    log_progress()
    logger.info("command: %s", shlex.join(["mmrag", "train", "ra-cm3", *argv]))
    try:
        final = train_ra_cm3(
            args.data,
            args.out,
            config,
            args.vq,
            EncoderSpec(name=args.encoder),
            args.device,
            not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 1
    logger.info("final: %s", json.dumps(final))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
