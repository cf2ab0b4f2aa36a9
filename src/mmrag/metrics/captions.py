"""Caption metrics.

CIDEr-D (Vedantam et al. 2015) comes from pycocoevalcap; the PTB tokenizer it usually runs
needs Java, so captions are tokenised here the same simple way (lower case, punctuation
split off, whitespace split) before scoring.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def tokenize_caption(text: str) -> str:
    """Lower case, punctuation split off and dropped, single spaces (PTB-like, no Java)."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D of candidate i against its references[i] (x 100 is the usual report;
    this returns the raw score, e.g. 0.89 for the paper's 89.1)."""
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references) or not candidates:
        raise ValueError("need one non-empty list of references per candidate")
    res = {i: [tokenize_caption(c) or "empty"] for i, c in enumerate(candidates)}
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)
