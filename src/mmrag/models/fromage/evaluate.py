"""`mmrag eval fromage`: contextual image retrieval and captioning on emoji families held out of
FROMAGe's training.

Contextual retrieval (FROMAGe section 4.1, Visual Storytelling, rebuilt from our data): for
each held-out emoji with held-out siblings (same `base`: other skin tones, genders), the
query is up to `context` sibling pairs `[prefix(v_s)] c_s <eos>` followed by the target's
caption and `[RET]`; the gallery is every held-out image except the ones shown in the context
(FROMAGe excludes images already in the dialogue). R@1/5/10 with the context and, on the same
targets and galleries, with the caption alone. A hit is the target image or one with the same
caption or the same pixels (the emoji set draws some distinct flags with one glyph).

Captioning: greedy decoding after `[prefix(v)]` for every held-out image, CIDEr-D (eval/
metrics.py) against its caption (the emoji name: one reference each).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmrag.metrics.report import prepare, report
from mmrag.metrics.retrieval import recall
from mmrag.models.fromage.model import IMAGE_SLOT, FrozenLM, GenerateOptions, TokenRow
from mmrag.models.fromage.pairs import PairData, load_pair_data, pair_row, split_matches

logger = logging.getLogger(__name__)

TRAIN_CONFIG_FILE = "train-config.json"
PAPER = {"R@1": 0.182, "R@5": 0.427, "R@10": 0.518}  # FROMAGe, VIST, 5 captions + 4 images


@dataclasses.dataclass(frozen=True)
class ContextQuery:
    target: int  # index into the pairs
    context: tuple[int, ...]  # sibling pairs shown before the target's caption


def contextual_queries(
    data: PairData, index: np.ndarray, context: int, seed: int
) -> list[ContextQuery]:
    """One query per held-out pair that has held-out siblings; siblings in a seeded order."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i in index:
        groups.setdefault(data.pairs.groups[int(i)], []).append(int(i))
    queries = []
    for i in index:
        siblings = [s for s in groups[data.pairs.groups[int(i)]] if s != int(i)]
        if siblings:
            shown = rng.permutation(siblings)[:context]
            queries.append(ContextQuery(int(i), tuple(int(s) for s in shown)))
    return queries


def query_rows(
    model: FrozenLM, data: PairData, queries: Sequence[ContextQuery], with_context: bool
) -> list[TokenRow]:
    rows = []
    for q in queries:
        row = TokenRow([])
        if with_context:
            for s in q.context:
                row = row + pair_row(model, data, s, targets=False)
        rows.append(row + TokenRow(list(data.captions[q.target])))
    return rows


@torch.no_grad()
def contextual_retrieval(
    model: FrozenLM, data: PairData, queries: Sequence[ContextQuery], batch_size: int = 16
) -> dict[str, dict[str, float]]:
    """R@k with and without the context; the gallery excludes each query's context images."""
    index = data.heldout
    position = {int(i): p for p, i in enumerate(index)}
    matches = split_matches(data, index)  # (G, G)
    gallery = model.adapters.project_image(data.features[index])  # (G, R)
    shown = torch.zeros(len(queries), len(index), dtype=torch.bool)
    for row, q in enumerate(queries):
        shown[row, [position[s] for s in q.context]] = True
    targets = torch.tensor([position[q.target] for q in queries])
    groups = np.array([data.pairs.groups[int(i)] for i in index], dtype=object)
    family = torch.from_numpy(groups[None, :] == groups[targets.numpy(), None])  # (Q, G)
    result = {}
    for name, with_context in (("with_context", True), ("caption_only", False)):
        rows = query_rows(model, data, queries, with_context)
        states = model.special_states(rows, [model.ret_id], data.features, batch_size)[:, 0]
        scores = model.adapters.project_text(states) @ gallery.T  # (Q, G)
        scores = scores.masked_fill(shown, -torch.inf)
        hits = matches[targets] & ~shown
        result[name] = recall(scores, hits) | {"queries": float(len(queries))}
        # Diagnostic: any not-shown variant of the target's family counts as a hit.
        family_hits = recall(scores, (family | matches[targets]) & ~shown)
        result[name] |= {f"family_{k}": v for k, v in family_hits.items()}
    chance = (matches[targets] & ~shown).sum(1).float() / (~shown).sum(1).float()
    result["chance"] = {"r1": float(chance.mean())}
    return result


def newline_ids(model: FrozenLM) -> list[int]:
    """Ids of the byte-level BPE tokens holding a newline ("Ċ" in their string form)."""
    tokens = model.tokenizer.convert_ids_to_tokens(list(range(model.vocab)))
    return [i for i, t in enumerate(tokens) if t is not None and "Ċ" in t]


@torch.no_grad()
def captions(
    model: FrozenLM,
    data: PairData,
    index: np.ndarray,
    max_tokens: int = 16,
    batch_size: int = 32,
    progress: bool = True,
) -> list[str]:
    """Greedy captions of the images `index` from the visual prefix alone."""
    eos = model.tokenizer.eos_token_id
    # A caption is one line: a newline ends it as <eos> does (the frozen LM otherwise runs on
    # into unrelated text after the caption).
    stops = (eos, *newline_ids(model))
    options = GenerateOptions(
        max_new_tokens=max_tokens, allow_ret=False, allow_img=False, stop_ids=stops
    )
    out: list[str] = []
    chunks = range(0, len(index), batch_size)
    for start in tqdm(chunks, desc="captions", disable=not progress):
        rows = [TokenRow([IMAGE_SLOT], [int(i)]) for i in index[start : start + batch_size]]
        for gen in model.generate(rows, data.features, options):
            out.append(model.decode_text([t for t in gen.tokens if t not in stops]).strip())
    return out


def evaluate_fromage(
    checkpoint: Path,
    data_paths: Sequence[Path],
    context: int = 3,
    cache_dir: Path | None = None,
    progress: bool = True,
    model: FrozenLM | None = None,
    caption_limit: int | None = None,
) -> dict[str, Any]:
    """Both evaluations on the held-out split the checkpoint was trained with."""
    from mmrag.metrics.captions import cider
    from mmrag.models.fromage.train_config import FromageTrainConfig

    train_config = FromageTrainConfig.load(checkpoint / TRAIN_CONFIG_FILE)
    model = model or FrozenLM.from_pretrained(checkpoint)
    data = load_pair_data(
        data_paths,
        model,
        train_config.holdout,
        train_config.group_key,
        train_config.seed,
        cache_dir,
        progress,
    )
    queries = contextual_queries(data, data.heldout, context, train_config.seed)
    retrieval = contextual_retrieval(model, data, queries)
    index = data.heldout[:caption_limit] if caption_limit else data.heldout
    generated = captions(model, data, index, progress=progress)
    references = [[t] for t in data.texts(index)]
    examples = [
        {"reference": r[0], "generated": g}
        for r, g in list(zip(references, generated, strict=True))[:12]
    ]
    return {
        "checkpoint": str(checkpoint),
        "heldout_pairs": len(data.heldout),
        "heldout_groups": len({data.pairs.groups[int(i)] for i in data.heldout}),
        "context_pairs": context,
        "retrieval": retrieval,
        "captioning": {"cider": cider(generated, references), "n": len(index)},
        "caption_examples": examples,
        "paper_vist": PAPER,
    }


def markdown(result: dict[str, Any]) -> str:
    r = result["retrieval"]
    lines = [
        "| FROMAGe contextual image retrieval | R@1 | R@5 | R@10 |",
        "|---|---|---|---|",
        "| ours: {} sibling pairs + caption, then [RET] | {r1:.3f} | {r5:.3f} | {r10:.3f} |".format(
            result["context_pairs"], **r["with_context"]
        ),
        "| ours: caption alone, then [RET] | {r1:.3f} | {r5:.3f} | {r10:.3f} |".format(
            **r["caption_only"]
        ),
        f"| chance | {r['chance']['r1']:.3f} | | |",
        "| any variant of the target's family counts (diagnostic), with context | "
        "{family_r1:.3f} | {family_r5:.3f} | {family_r10:.3f} |".format(**r["with_context"]),
        "| same, caption alone | {family_r1:.3f} | {family_r5:.3f} | {family_r10:.3f} |".format(
            **r["caption_only"]
        ),
        "| paper (OPT-6.7B + CLIP ViT-L/14, VIST, 5 captions + 4 images) | 0.182 | 0.427 | 0.518 |",
        "",
        f"Captioning CIDEr-D on {result['captioning']['n']} held-out images: "
        f"{100 * result['captioning']['cider']:.1f}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmrag eval fromage",
        description="Contextual image retrieval (R@1/5/10 with and without sibling context) "
        "and captioning CIDEr-D on the emoji families a FROMAGe checkpoint never saw.",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="FROMAGe folder holding train-config.json (default: checkpoints/fromage)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        type=Path,
        required=True,
        help="the documents it was trained on (the split is recomputed from them)",
    )
    p.add_argument("--context", type=int, default=3, help="sibling pairs before the caption")
    p.add_argument(
        "--caption-limit",
        type=int,
        default=None,
        help="caption only the first N held-out images (default: all)",
    )
    p.add_argument("--cache-dir", type=Path, help="frozen image feature cache")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("runs/eval-fromage.json"), help="results JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    from mmrag.checkpoints import checkpoint_dir

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    prepare(args.threads)
    checkpoint = args.checkpoint or checkpoint_dir("fromage")
    result = evaluate_fromage(
        checkpoint,
        args.data,
        args.context,
        args.cache_dir,
        not args.no_progress,
        caption_limit=args.caption_limit,
    )
    report(result, args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
