"""Preparing an RA-CM3 run (ra_cm3_data.py has the pieces): the coded corpus, the split,
the BPE, the memory of training documents and the precomputed retrievals, each cached in
the run folder and reused when present."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmrag.config import ConfigError
from mmrag.encoders.base import EncoderSpec
from mmrag.memory.ingest import ingest
from mmrag.memory.memory import ensure_memory
from mmrag.models.ra_cm3.data import (
    CORPUS_FILE,
    RETRIEVAL_FILE,
    Corpus,
    build_corpus,
    heldout_variants,
    load_retrieval,
    precompute_retrieval,
    read_pairs,
    save_retrieval,
)
from mmrag.models.ra_cm3.tokenizer import MultimodalTokenizer
from mmrag.models.vq.model import VQModel

if TYPE_CHECKING:
    from mmrag.models.ra_cm3.train_config import RACM3TrainConfig

logger = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
VAL_RETRIEVAL_FILE = "val_retrieval.safetensors"


@dataclasses.dataclass
class Prepared:
    corpus: Corpus
    tokenizer: MultimodalTokenizer
    train_rows: np.ndarray
    heldout_rows: np.ndarray  # the test variants
    validation_rows: np.ndarray  # variants for choosing decoding settings (may be empty)
    found: torch.Tensor | None  # (len(train_rows), variants, k) corpus indices, -1 = none
    val_found: torch.Tensor | None  # (len(val rows), 1, k)
    grid: int


def prepare(
    data: Sequence[Path],
    out: Path,
    config: RACM3TrainConfig,
    vq_dir: Path,
    encoder: EncoderSpec,
    progress: bool = True,
) -> Prepared:
    """Code the corpus, split it, train the BPE, build the memory of training documents and
    precompute retrievals; every product is cached in `out` and reused when present."""
    vq = VQModel.from_pretrained(vq_dir)
    if not (out / "vq" / "config.json").is_file():
        shutil.copytree(vq_dir, out / "vq", dirs_exist_ok=True)
    docs = None
    if (out / CORPUS_FILE).is_file():
        corpus = Corpus.load(out / CORPUS_FILE)
    else:
        docs = read_pairs(data, config.group_key)
        corpus = build_corpus(docs, vq, config.group_key, progress)
        corpus.save(out / CORPUS_FILE)
    held = heldout_variants(corpus.groups, config.holdout, config.seed)
    validation = heldout_variants(corpus.groups, config.validation, config.seed + 1, held.tolist())
    train = np.setdiff1d(np.arange(len(corpus)), np.concatenate([held, validation]))
    split: dict[str, list[Any]] = {"train": train.tolist()}
    for name, rows in (("heldout", held), ("validation", validation)):
        split[name] = rows.tolist()
        split[f"{name}_ids"] = [corpus.ids[i] for i in rows]
    (out / SPLIT_FILE).write_text(json.dumps(split) + "\n", encoding="utf-8")
    tok_config = config.tokenizer.replace(
        image_codes=vq.config.codebook_size, image_tokens=vq.config.tokens_per_image
    )
    if (out / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = MultimodalTokenizer.from_pretrained(out / "tokenizer")
    else:
        tokenizer = MultimodalTokenizer.train([corpus.captions[i] for i in train], tok_config)
        tokenizer.save_pretrained(out / "tokenizer")
    found = val_found = None
    if config.retrieval:
        scored = monitored(held, validation)
        found, val_found = _retrievals(out, corpus, train, scored, config, encoder, docs, progress)
    return Prepared(
        corpus, tokenizer, train, held, validation, found, val_found, vq.config.grid_size
    )


def monitored(heldout: np.ndarray, validation: np.ndarray) -> np.ndarray:
    """The rows whose loss the trainer reports: the validation variants when there are any
    (the test variants then stay unseen until the evaluation), else the test variants."""
    return validation if len(validation) else heldout


def _retrievals(
    out: Path,
    corpus: Corpus,
    train: np.ndarray,
    scored: np.ndarray,
    config: RACM3TrainConfig,
    encoder: EncoderSpec,
    docs: Sequence[Any] | None,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if (out / RETRIEVAL_FILE).is_file() and (out / VAL_RETRIEVAL_FILE).is_file():
        return load_retrieval(out / RETRIEVAL_FILE)[1], load_retrieval(out / VAL_RETRIEVAL_FILE)[1]
    with ensure_memory(out / "memory", encoder) as memory:
        if len(memory) < len(train):
            if docs is None:
                raise ConfigError(f"{out / 'memory'} is incomplete; delete it and {CORPUS_FILE}")
            ingest(memory, [docs[i] for i in train], progress=progress)
        rows = train.tolist()
        found, scores = precompute_retrieval(
            memory, corpus, rows, config.retriever, config.query_variants, config.seed, progress
        )
        save_retrieval(out / RETRIEVAL_FILE, rows, found, scores)
        val_rows = scored[: config.val_docs].tolist()
        val_config = config.retriever.replace(query_dropout=0.0)
        val_found, val_scores = precompute_retrieval(
            memory, corpus, val_rows, val_config, 1, config.seed, progress=False
        )
        save_retrieval(out / VAL_RETRIEVAL_FILE, val_rows, val_found, val_scores)
    share = float((found[:, :, 0] >= 0).float().mean())
    logger.info(
        "retrieval: %.1f%% of queries found a document; mean top score %.3f",
        100 * share,
        float(scores[:, :, 0].mean()),
    )
    return found, val_found


def check_sizes(prep: Prepared, config: RACM3TrainConfig) -> None:
    tok, gen = prep.tokenizer, config.generator
    if gen.vocab_size < tok.vocab_size:
        raise ConfigError(
            f"generator.vocab_size {gen.vocab_size} < the tokenizer's {tok.vocab_size}"
        )
    longest = 1 + (max(config.k_choices) + 1) * (tok.config.image_tokens + 40) + 8
    if config.retrieval and gen.max_seq_len < longest:
        raise ConfigError(f"generator.max_seq_len {gen.max_seq_len} < ~{longest} tokens needed")
