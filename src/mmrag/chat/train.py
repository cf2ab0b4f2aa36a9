"""`mmrag train chat`: fit the chat's image decision on the frozen LM's states.

The LM and every adapter stay frozen; the decision is a logistic read-out of the state at
the start of the assistant's turn (`request.py`). Training conversations use the training
families and request phrasings; the L2 strength and then the temperature are chosen on the
validation families and phrasings (`prompts.py`), and the test split is never touched here.
Writes `config.json` + `request.safetensors`, `metrics.json` and `RECIPE.md` to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional
from tqdm import tqdm

from mmrag.chat.prompts import (
    REQUESTS,
    Example,
    Item,
    batches,
    family_split,
    load_items,
    request_examples,
)
from mmrag.chat.query_head import QueryHead, QueryHeadConfig
from mmrag.chat.request import RequestConfig, RequestDecision
from mmrag.checkpoints import checkpoint_dir
from mmrag.documents import load_image
from mmrag.encoders.base import Encoder, EncoderSpec, load_encoder
from mmrag.metrics.decision import decision_scores
from mmrag.metrics.retrieval import recall
from mmrag.models.fromage.conversation import Message, chat_row, image_features, message_images
from mmrag.models.fromage.model import FrozenLM, TokenRow
from mmrag.training.flags import log_progress

logger = logging.getLogger(__name__)

L2 = (1e-4, 1e-3, 1e-2, 1e-1)  # chosen on the validation conversations
BLENDS = (0.0, 0.25, 0.5, 0.75, 1.0)  # [RET] head vs text query, chosen on validation
HEAD_STEPS = 300
METRICS_FILE = "metrics.json"
RECIPE_FILE = "RECIPE.md"


@torch.no_grad()
def decision_states(
    model: FrozenLM, examples: Sequence[Example], progress: bool = False, batch_size: int = 16
) -> torch.Tensor:
    """(N, H) hidden states at the start of each conversation's assistant turn."""
    out = []
    for chunk in tqdm(list(batches(examples, batch_size)), disable=not progress, desc="states"):
        rows: list[Any] = []
        images: list[Any] = []
        for example in chunk:
            rows.append(chat_row(model, example.messages, first_image=len(images)))
            images += message_images(example.messages)
        features = image_features(model, images) if images else None
        last, _ = model.prefill(rows, features)
        out.append(last.float().cpu())
    return torch.cat(out)


def _fit(
    head: RequestDecision, states: torch.Tensor, labels: torch.Tensor, l2: float
) -> RequestDecision:
    optimizer = torch.optim.LBFGS(
        head.linear.parameters(), max_iter=200, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = functional.binary_cross_entropy_with_logits(head.logit(states), labels)
        loss = loss + l2 * head.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def _temperature(head: RequestDecision, states: torch.Tensor, labels: torch.Tensor) -> None:
    """Temperature scaling (Guo et al. 2017) on held-out conversations."""
    with torch.no_grad():
        logits = head.logit(states)
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = functional.binary_cross_entropy_with_logits(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    head.temperature.fill_(float(log_t.exp().detach()))


def scores(head: RequestDecision, states: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The decision's scores (`metrics.decision`) and its log loss."""
    p = head.probability(states)
    out = decision_scores(p, labels, head.config.threshold)
    out["log_loss"] = float(functional.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), labels))
    return out


def _requests(items: Sequence[Item], split: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    templates = REQUESTS["train" if split == "train" else "validation"]
    return [rng.choice(templates).format(i.caption) for i in items]


@torch.no_grad()
def _ret_states(model: FrozenLM, texts: Sequence[str], progress: bool) -> torch.Tensor:
    """(N, H) states at `[RET]` after each request in the chat template."""
    rows: list[TokenRow] = [chat_row(model, [Message("user", [t])]) for t in texts]
    out = []
    for start in tqdm(range(0, len(rows), 64), disable=not progress, desc="[RET] states"):
        out.append(model.special_states(rows[start : start + 64], [model.ret_id])[:, 0])
    return torch.cat(out)


def train_query_head(
    model: FrozenLM, items: Sequence[Item], encoder: Encoder, seed: int, progress: bool
) -> tuple[QueryHead, dict[str, Any]]:
    """Fit W_t into `encoder`'s space on the training families' requests (InfoNCE against the
    frozen image vectors), then choose the blend with the text query on validation R@1."""
    splits = {
        name: [i for i in items if i.image is not None and family_split(i.family) == name]
        for name in ("train", "validation")
    }
    texts = {name: _requests(group, name, seed) for name, group in splits.items()}
    states = {name: _ret_states(model, texts[name], progress) for name in splits}
    images = {
        name: torch.from_numpy(encoder.encode_image([load_image(str(i.image)) for i in group]))
        for name, group in splits.items()
    }
    config = QueryHeadConfig(
        hidden=model.language_model.hidden_size,
        dim=encoder.dim,
        encoder=encoder.name,
        fingerprint=encoder.fingerprint(),
        lm_identity=model.language_model.identity,
    )
    torch.manual_seed(seed)
    head = QueryHead(config)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    captions = [i.caption for i in splits["train"]]
    same = torch.tensor([[a == b for b in captions] for a in captions])
    target = torch.arange(len(captions))
    for _ in range(HEAD_STEPS):
        logits = head.logit_scale.exp() * head(states["train"]) @ images["train"].T
        logits = logits.masked_fill(same & ~torch.eye(len(captions), dtype=torch.bool), -1e4)
        loss = functional.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    val_captions = [i.caption for i in splits["validation"]]
    matches = torch.tensor([[a == b for b in val_captions] for a in val_captions])
    text = functional.normalize(torch.from_numpy(encoder.encode_text(texts["validation"])), dim=-1)
    with torch.no_grad():
        query = head(states["validation"])
    by_blend = {}
    for blend in BLENDS:
        mixed = functional.normalize(blend * query + (1 - blend) * text, dim=-1)
        by_blend[str(blend)] = recall(mixed @ images["validation"].T, matches)
    best = max(BLENDS, key=lambda b: (by_blend[str(b)]["r1"], b))
    head.config = config.replace(blend=best)
    metrics = {
        "pairs": {name: len(group) for name, group in splits.items()},
        "final_loss": float(loss.detach()),
        "validation_recall_by_blend": by_blend,
        "blend": best,
    }
    return head, metrics


def train_request_decision(
    data: Sequence[Path],
    out: Path,
    fromage: Path | None = None,
    examples: int = 1200,
    seed: int = 0,
    progress: bool = True,
    memory_encoder: str = "lite",
) -> dict[str, Any]:
    """Fit, choose, calibrate and write the decision, then fit the `[RET]` head into
    `memory_encoder`'s space; returns the metrics written."""
    model = FrozenLM.from_pretrained(fromage or checkpoint_dir("fromage"))
    items = load_items(data)
    if not items:
        raise ValueError(f"no captioned documents in {[str(d) for d in data]}")
    train = request_examples(items, "train", examples, seed)
    validation = request_examples(items, "validation", examples // 3, seed + 1)
    x_train = decision_states(model, train, progress)
    x_val = decision_states(model, validation, progress)
    y_train = torch.tensor([e.label for e in train], dtype=torch.float32)
    y_val = torch.tensor([e.label for e in validation], dtype=torch.float32)
    config = RequestConfig(
        hidden=model.language_model.hidden_size, lm_identity=model.language_model.identity
    )
    best: tuple[float, float, RequestDecision] | None = None
    for l2 in L2:
        torch.manual_seed(seed)
        head = _fit(RequestDecision(config), x_train, y_train, l2)
        loss = scores(head, x_val, y_val)["log_loss"]
        logger.info("l2 %g: validation log loss %.4f", l2, loss)
        if best is None or loss < best[0]:
            best = (loss, l2, head)
    assert best is not None
    _, l2, head = best
    _temperature(head, x_val, y_val)
    metrics = {
        "l2": l2,
        "temperature": float(head.temperature),
        "train": scores(head, x_train, y_train),
        "validation": scores(head, x_val, y_val),
        "examples": {"train": len(train), "validation": len(validation)},
        "seed": seed,
    }
    head.save_pretrained(out)
    encoder = load_encoder(EncoderSpec(name=memory_encoder))
    query, query_metrics = train_query_head(model, items, encoder, seed, progress)
    query.save_pretrained(out)
    metrics["query_head"] = query_metrics
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmrag train chat",
        description="Fit the chat's image decision (does the user ask to see an image?) on "
        "the frozen LM's states, from conversations built out of captioned documents; "
        "choose L2 and calibrate on held-out families and phrasings.",
    )
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        type=Path,
        metavar="PATH",
        help="JSONL files or folders holding documents.jsonl (captions, images)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument(
        "--fromage",
        type=Path,
        metavar="DIR",
        help="FROMAGe folder whose LM is read (default: the shipped one)",
    )
    p.add_argument("--examples", type=int, default=1200, help="training conversations")
    p.add_argument(
        "--encoder",
        default="lite",
        help="the memory encoder whose image vectors the [RET] head maps into (default lite)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the conversations")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log_progress()
    try:
        metrics = train_request_decision(
            args.data,
            args.out,
            args.fromage,
            args.examples,
            args.seed,
            not args.no_progress,
            args.encoder,
        )
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 1
    command = shlex.join(["mmrag", "train", "chat", *argv])
    (args.out / RECIPE_FILE).write_text(
        "# The chat's image decision: recipe\n\n"
        f"```\n{command}\n```\n\n"
        "Data: the captioned documents given (`mmrag data emoji`, `mmrag data photos`); the "
        "training families and phrasings of `mmrag.chat.prompts`, the validation ones for "
        "the L2 choice and the temperature. Deterministic for the same data and seed.\n\n"
        f"Validation: accuracy {metrics['validation']['accuracy']:.3f}, F1 "
        f"{metrics['validation']['f1']:.3f}, ECE {metrics['validation']['ece']:.3f}.\n",
        encoding="utf-8",
    )
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
