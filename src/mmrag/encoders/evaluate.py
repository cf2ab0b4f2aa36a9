"""`mmrag eval encoder`: text->image and image->text recall of `lite` encoders, per source.

Each `--data` source (a builder's folder or a JSONL file) is scored alone, on the side of the
encoder trainer's hash split (`pairs.hash_split`: whole groups, never single images) that
`--split` names, so the held-out groups of every source are the ones training never saw. The
gallery is that part of the source; an item answers a query when it has the same caption or
the same image (`match_matrix`). Sources whose documents carry no group key (a caption set
of photos, Fashion-MNIST's test images labelled by class) are never split: pass them only
if no encoder trained on them, or read their numbers as in-sample.

Systems: every `--encoder` checkpoint folder (`shipped` is the packaged heads) and, for each
bridged one, its class bridge alone (the residuals set to zero: ConSE zero-shot, no
training). Cross-style: for sources naming the same emoji (`emoji` metadata), image->image
recall from one style's images to another's (a hit is the same emoji).

Vectors come from `LiteEncoder.image_features` / `project_image` (and the text pair), which
is `encode_image` split in two so that the frozen towers run once for all systems; the tests
check the two agree.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrag.encoders.lite import LiteEncoder
from mmrag.encoders.pairs import (
    Pairs,
    default_cache_dir,
    extract_features,
    group_keys,
    hash_split,
    load_pairs,
    match_matrix,
    recall_at,
)
from mmrag.metrics.report import prepare, report

logger = logging.getLogger(__name__)

SIDES = {"train": 0, "validation": 1, "heldout": 2}
KS = (1, 5, 10)
SHIPPED = "shipped"


@dataclass
class Source:
    """One source's items on the evaluated side, with their frozen features."""

    name: str
    pairs: Pairs
    index: np.ndarray  # rows of `pairs` on the side
    image: np.ndarray  # (n, 1280)
    text: np.ndarray  # (n, 384)
    split: bool  # whether the source has groups (False: every item is scored)

    def texts(self) -> list[str]:
        return [self.pairs.texts[i] for i in self.index]

    def hashes(self) -> list[str]:
        return [self.pairs.images[i].sha256 or "" for i in self.index]

    def keys(self, key: str) -> list[str]:
        return [str(self.pairs.metadata[i].get(key) or "") for i in self.index]


def source_name(path: Path) -> str:
    """A data folder's name (`.cache/data/emoji` -> `emoji`), else the JSONL file's stem."""
    if path.is_dir():
        return path.name
    return path.parent.name if path.name == "documents.jsonl" else path.stem


def load_source(
    path: Path,
    encoder: LiteEncoder,
    group_key: str,
    side: str,
    holdout: float,
    seed: int,
    limit: int | None,
    cache_dir: Path,
    only: dict[str, str] | None = None,
) -> Source:
    """The source's documents on `side` of the trainer's split (all of them when none has a
    group key), narrowed to `only` and sampled evenly down to `limit`, with their features."""
    pairs = load_pairs([path], group_key)
    if only:
        pairs = pairs.subset([i for i, m in enumerate(pairs.metadata) if _matches(m, only)])
    keys = group_keys(group_key)
    grouped = any(any(k in m for k in keys) for m in pairs.metadata)
    if grouped:
        index = hash_split(pairs.groups, holdout, seed)[SIDES[side]]
    else:
        index = np.arange(len(pairs))
    if limit is not None and len(index) > limit:  # evenly spaced: every class of a sorted set
        index = index[np.linspace(0, len(index) - 1, limit).round().astype(int)]
    sub = pairs.subset(index)
    image, text = extract_features(sub, encoder, cache_dir, progress=False)
    return Source(source_name(path), sub, np.arange(len(sub)), image, text, grouped)


def _matches(metadata: dict[str, Any], only: dict[str, str]) -> bool:
    return all(str(metadata[k]) == v for k, v in only.items() if k in metadata)


def parse_only(items: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` pairs (compared as strings with the metadata's values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--only {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def load_encoders(paths: Sequence[str]) -> dict[str, LiteEncoder]:
    """`shipped` or checkpoint folders -> encoders; each bridged one adds its bridge alone."""
    out: dict[str, LiteEncoder] = {}
    for spec in paths:
        encoder = LiteEncoder.from_pretrained(None if spec == SHIPPED else spec)
        out[spec] = encoder
        if encoder.heads.bridge is not None:
            out[f"{spec} (bridge alone)"] = bridge_alone(encoder)
    return out


def bridge_alone(encoder: LiteEncoder) -> LiteEncoder:
    """The same encoder with its trained residuals zeroed: the zero-shot class bridge."""
    heads = copy.deepcopy(encoder.heads)
    with torch.no_grad():
        for weight in heads.projections():
            weight.zero_()
    return LiteEncoder(encoder.config, heads, device=encoder.device)


def recalls(encoder: LiteEncoder, source: Source) -> dict[str, float]:
    """t2i and i2t R@k over the source's items (the gallery)."""
    img = encoder.project_image(source.image)
    txt = encoder.project_text(source.text)
    matches = match_matrix(source.texts(), source.hashes())
    sims = txt @ img.T
    t2i, i2t = recall_at(sims, matches, KS), recall_at(sims.T, matches.T, KS)
    out = {f"t2i_r{k}": v for k, v in t2i.items()} | {f"i2t_r{k}": v for k, v in i2t.items()}
    out["chance_r1"] = float(matches.sum(axis=1).mean() / len(matches))
    out["n"] = float(len(matches))
    return out


def cross_style(encoder: LiteEncoder, query: Source, gallery: Source) -> dict[str, float] | None:
    """image->image R@k from `query`'s images to `gallery`'s, over the emoji both draw."""
    q_keys, g_keys = query.keys("emoji"), gallery.keys("emoji")
    shared = sorted(set(q_keys) & set(g_keys) - {""})
    if len(shared) < 2:
        return None
    q_rows = [q_keys.index(k) for k in shared]
    g_rows = [g_keys.index(k) for k in shared]
    q = encoder.project_image(query.image[q_rows])
    g = encoder.project_image(gallery.image[g_rows])
    hits = recall_at(q @ g.T, np.eye(len(shared), dtype=bool), KS)
    return {f"i2i_r{k}": v for k, v in hits.items()} | {"n": float(len(shared))}


def evaluate_encoders(
    encoders: Sequence[str],
    data: Sequence[Path],
    side: str = "heldout",
    holdout: float = 0.2,
    seed: int = 0,
    group_key: str = "base,category",
    limit: int | None = None,
    cache_dir: Path | None = None,
    only: dict[str, str] | None = None,
) -> dict[str, Any]:
    systems = load_encoders(encoders)
    first = next(iter(systems.values()))
    for name, encoder in systems.items():
        if encoder.config.image_size != first.config.image_size:
            raise ValueError(f"{name}: every encoder must use the same image size")
    cache = cache_dir or default_cache_dir()
    sources = [load_source(p, first, group_key, side, holdout, seed, limit, cache) for p in data]
    result: dict[str, Any] = {
        "split": {"side": side, "holdout": holdout, "seed": seed, "group_key": group_key},
        "only": only or {},
        "limit": limit,
        "sources": {s.name: {"n": len(s.index), "split": s.split} for s in sources},
        "recall": {},
        "cross_style": {},
    }
    for name, encoder in systems.items():
        result["recall"][name] = {s.name: recalls(encoder, s) for s in sources}
        styles: dict[str, Any] = {}
        for q in sources:
            for g in sources:
                if q is not g and (scores := cross_style(encoder, q, g)) is not None:
                    styles[f"{q.name} -> {g.name}"] = scores
        result["cross_style"][name] = styles
        logger.info(
            "%s: %s", name, {s: round(r["t2i_r1"], 3) for s, r in result["recall"][name].items()}
        )
    return result


def markdown(result: dict[str, Any]) -> str:
    split = result["split"]
    lines = [
        f"Recall on the {split['side']} side (hash split, holdout {split['holdout']}, "
        f"seed {split['seed']}, groups by {split['group_key']}):",
        "",
        "| system | source | n | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | chance R@1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, per_source in result["recall"].items():
        for source, r in per_source.items():
            lines.append(
                f"| {system} | {source} | {int(r['n'])} | {r['t2i_r1']:.3f} | {r['t2i_r5']:.3f} "
                f"| {r['t2i_r10']:.3f} | {r['i2t_r1']:.3f} | {r['i2t_r5']:.3f} "
                f"| {r['chance_r1']:.4f} |"
            )
    rows = [
        (system, pair, r)
        for system, styles in result["cross_style"].items()
        for pair, r in styles.items()
    ]
    if rows:
        lines += [
            "",
            "Cross-style image->image (same emoji in another style):",
            "",
            "| system | query -> gallery | n | R@1 | R@5 | R@10 |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {s} | {p} | {int(r['n'])} | {r['i2i_r1']:.3f} | {r['i2i_r5']:.3f} "
            f"| {r['i2i_r10']:.3f} |"
            for s, p, r in rows
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmrag eval encoder",
        description="Text->image and image->text recall of lite encoders on the held-out groups "
        "of each source (the split `mmrag train encoder` makes), cross-style image recall "
        "between emoji styles, and each bridged encoder's class bridge alone (zero-shot).",
    )
    p.add_argument(
        "--encoder",
        nargs="+",
        default=[SHIPPED],
        metavar="DIR",
        help=f"checkpoint folders of `mmrag train encoder`, or {SHIPPED!r} (the packaged heads)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        type=Path,
        metavar="PATH",
        help="one source per path: a data folder (documents.jsonl) or a JSONL file",
    )
    p.add_argument("--split", choices=sorted(SIDES), default="heldout", help="which side to score")
    p.add_argument("--holdout", type=float, default=0.2, help="train encoder's --holdout (0.2)")
    p.add_argument("--seed", type=int, default=0, help="train encoder's --seed (0)")
    p.add_argument(
        "--group-key", default="base,category", help="train encoder's --group-key (base,category)"
    )
    p.add_argument(
        "--limit", type=int, help="score at most N items per source, evenly spaced in its order"
    )
    p.add_argument(
        "--only",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="score only documents whose metadata has these values (e.g. split=t10k: "
        "Fashion-MNIST's test images); sources without the key are scored whole",
    )
    p.add_argument("--cache-dir", type=Path, help="the frozen-feature cache (train encoder's)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("runs/eval-encoder.json"), help="results JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    prepare(args.threads)
    try:
        result = evaluate_encoders(
            args.encoder,
            args.data,
            args.split,
            args.holdout,
            args.seed,
            args.group_key,
            args.limit,
            args.cache_dir,
            parse_only(args.only),
        )
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 1
    report(result, args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
