"""Caption-image pairs for the `lite` encoder: reading them, their frozen features (cached by
document id), the group split that holds whole groups out, and recall at k.

Shared by the trainer (`lite_train`) and the evaluation (`evaluate`), so that an evaluation
never imports a trainer and both see the same split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save
from tqdm import tqdm

from mmrag.config import LiteEncoderConfig
from mmrag.data.writer import documents_files
from mmrag.documents import Document, DocumentError, Part, iter_jsonl
from mmrag.encoders.lite import (
    FINGERPRINT_VERSION,
    TOWER_NUMERICS,
    LiteEncoder,
    backbone_identity,
)

logger = logging.getLogger(__name__)

MAX_LOGGED_BAD_LINES = 10
EXTRACT_BATCH = 64
RECALL_KS = (1, 5, 10)


@dataclass
class Pairs:
    """Documents with a caption and an image: what contrastive training can use."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    images: list[Part] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int] | np.ndarray) -> Pairs:
        """The pairs at `index`, in that order (counts are the whole set's)."""
        rows = [int(i) for i in index]
        return Pairs(
            ids=[self.ids[i] for i in rows],
            texts=[self.texts[i] for i in rows],
            images=[self.images[i] for i in rows],
            groups=[self.groups[i] for i in rows],
            metadata=[self.metadata[i] for i in rows],
            counts=dict(self.counts),
        )


def group_keys(spec: str) -> tuple[str, ...]:
    """`"base,category"` -> ("base", "category"): the metadata keys a group is read from."""
    return tuple(k.strip() for k in spec.split(",") if k.strip())


def _group_of(doc: Document, key: str) -> str:
    """The document's group: the value of the first of the (comma-separated) keys it has;
    a document with none of them is its own group."""
    for name in group_keys(key):
        value = doc.metadata.get(name)
        if value is not None:
            return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return f"id:{doc.id}"


def load_pairs(paths: Sequence[Path], group_key: str) -> Pairs:
    """Read the documents; skip (and log) bad lines, documents lacking text or an image, and
    repeated ids. A document with several images trains on its first."""
    pairs = Pairs()
    counts = dict.fromkeys(("read", "bad_lines", "no_text_or_image", "duplicate", "multi_image"), 0)
    seen: set[str] = set()
    for file in documents_files(paths):
        for item in iter_jsonl(file):
            if isinstance(item, DocumentError):
                counts["bad_lines"] += 1
                if counts["bad_lines"] <= MAX_LOGGED_BAD_LINES:
                    logger.warning("skipping a bad line: %s", item)
                continue
            counts["read"] += 1
            if not item.text or not item.images:
                counts["no_text_or_image"] += 1
                continue
            if item.id in seen:
                counts["duplicate"] += 1
                continue
            seen.add(item.id)
            counts["multi_image"] += len(item.images) > 1
            pairs.ids.append(item.id)
            pairs.texts.append(item.text)
            pairs.images.append(item.images[0])
            pairs.groups.append(_group_of(item, group_key))
            pairs.metadata.append(dict(item.metadata))
    if counts["bad_lines"] > MAX_LOGGED_BAD_LINES:
        logger.warning("skipped %d bad lines in all", counts["bad_lines"])
    counts["pairs"] = len(pairs)
    counts["groups"] = len(set(pairs.groups))
    pairs.counts = counts
    logger.info("training pairs: %s", counts)
    return pairs


# --- frozen features, cached by document id ------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mmrag" / "encoder-features"


def feature_cache_path(cache_dir: Path, config: LiteEncoderConfig) -> Path:
    """One file per (backbones, preprocessing) setting; rows are keyed by document id."""
    key = (
        f"{FINGERPRINT_VERSION}|{TOWER_NUMERICS}|{backbone_identity()}|{config.image_size}"
        f"|{config.text_max_tokens}"
    )
    return cache_dir / f"lite-features-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def _read_cache(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        ids = json.loads((f.metadata() or {}).get("ids", "[]"))
    arrays = load_file(str(path))
    return {doc_id: (arrays["image"][i], arrays["text"][i]) for i, doc_id in enumerate(ids)}


def _write_cache(path: Path, rows: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = sorted(rows)
    tensors = {
        "image": np.stack([rows[i][0] for i in ids]).astype(np.float32),
        "text": np.stack([rows[i][1] for i in ids]).astype(np.float32),
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks on other nodes may write their own
    tmp.write_bytes(save(tensors, metadata={"ids": json.dumps(ids)}))  # umask's mode, not 0600
    os.replace(tmp, path)


def extract_features(
    pairs: Pairs, encoder: LiteEncoder, cache_dir: Path, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1280) image and (N, 384) text features of `pairs`, extracting only uncached ids."""
    path = feature_cache_path(cache_dir, encoder.config)
    rows = _read_cache(path)
    missing = [i for i, doc_id in enumerate(pairs.ids) if doc_id not in rows]
    logger.info(
        "features: %d cached in %s, %d to extract", len(pairs) - len(missing), path, len(missing)
    )
    if missing:
        bar = tqdm(total=len(missing), desc="frozen features", unit="doc", disable=not progress)
        for start in range(0, len(missing), EXTRACT_BATCH):
            chunk = missing[start : start + EXTRACT_BATCH]
            image = encoder.image_features([pairs.images[i].open_image() for i in chunk])
            text = encoder.text_features([pairs.texts[i] for i in chunk])
            for j, i in enumerate(chunk):
                rows[pairs.ids[i]] = (image[j], text[j])
            bar.update(len(chunk))
        bar.close()
        _write_cache(path, rows)
    image_feats = np.stack([rows[doc_id][0] for doc_id in pairs.ids]).astype(np.float32)
    text_feats = np.stack([rows[doc_id][1] for doc_id in pairs.ids]).astype(np.float32)
    return image_feats, text_feats


# --- splits and metrics ---------------------------------------------------------------------


def split_by_group(
    groups: Sequence[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): a seeded `fraction` of the distinct groups goes out whole."""
    names = sorted(set(groups))
    n_out = 0 if fraction <= 0 else min(len(names) - 1, max(1, round(fraction * len(names))))
    order = np.random.default_rng(seed).permutation(len(names))
    out_groups = {names[i] for i in order[:n_out]}
    held = np.array([g in out_groups for g in groups], dtype=bool)
    return np.flatnonzero(~held), np.flatnonzero(held)


def match_matrix(texts: Sequence[str], image_hashes: Sequence[str]) -> np.ndarray:
    """(N, N) bool: item j answers query i when they share a caption or an image (the emoji
    set has distinct flags drawn with one glyph, so such duplicates count as hits)."""
    t = np.array(texts, dtype=object)
    h = np.array(image_hashes, dtype=object)
    return (t[:, None] == t[None, :]) | (h[:, None] == h[None, :])


def recall_at(
    scores: np.ndarray, matches: np.ndarray, ks: Sequence[int] = RECALL_KS
) -> dict[int, float]:
    """Fraction of queries (rows) with a matching item among their top-k columns."""
    order = np.argsort(-scores, axis=1, kind="stable")  # (Q, G), ties broken by index
    hits = np.take_along_axis(matches, order, axis=1)
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def three_way_split(
    groups: Sequence[str], holdout: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, held-out) indices: `holdout` of the groups are held out, then the
    same fraction of the remaining groups validates (with another seed)."""
    kept, test_idx = split_by_group(groups, holdout, seed)
    train_idx, val_idx = split_by_group([groups[i] for i in kept], holdout, seed + 1)
    return kept[train_idx], kept[val_idx], test_idx


def hash_split(
    groups: Sequence[str], holdout: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, held-out) indices decided by each group's own seeded hash: a
    group is held out with probability `holdout`, else validates with probability `holdout`.

    Unlike `three_way_split`, a group's side does not depend on which other groups are in
    the data, so the held-out part of each source can be found again from that source alone
    (`mmrag eval encoder`), and adding a data set never moves another's groups.
    """
    sides = np.array([group_side(g, holdout, seed) for g in groups], dtype=np.int8)
    return tuple(np.flatnonzero(sides == side) for side in (0, 1, 2))  # type: ignore[return-value]


def group_side(group: str, holdout: float, seed: int) -> int:
    """0 train, 1 validation, 2 held out (see `hash_split`)."""
    digest = hashlib.sha256(f"{seed}\x00{group}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    v = int.from_bytes(digest[8:16], "big") / 2**64
    if u < holdout:
        return 2
    return 1 if v < holdout else 0
