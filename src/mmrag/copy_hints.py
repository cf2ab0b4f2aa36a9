"""Copy hints: the retrieved images' codes, aligned with the cell of the image being written.

Why. Prepending retrieved documents (RA-CM3) lets attention copy from them in principle,
but in our small generator that circuit never formed: after 900 or 3,000 steps its held-out
NLL per image code was the same with the held-out image's siblings prepended as with nothing
(README, "The proof"), although the best sibling holds the same code as the held-out image
at ~59% of the 256 cells (a random emoji: ~5%, mostly background). A copy hint hands that
evidence to the cell being predicted: at every token whose next token is cell c of the
image being written, the generator adds, for each retrieved image s (in rank order), an
embedding of the code image s holds at cell c (`Generator.forward(hints=...)`). The model
learns how far to trust each slot; with nothing retrieved there is no hint, and the model
is the plain one (the vanilla baseline and the unconditional branch of guidance).

Conventions. A sequence's *cells* say, for each token, which cell of the image being written
(the main document's) it is, or None; `hints_for` shifts them by one (a token predicts the
next one) and looks the codes up. Codes are 0-based VQ codes (token id - image_offset); -1
means no hint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NO_HINT = -1
Cells = list[int | None]


def image_cells(ids: Sequence[int], first: int, image_first: int, image_count: int) -> Cells:
    """Cells of an un-transformed sequence: the image codes from position `first` on (the
    main document's image) numbered 0, 1, ... in order; every other token None."""
    out: Cells = [None] * len(ids)
    cell = 0
    for t in range(first, len(ids)):
        if image_first <= ids[t] < image_first + image_count:
            out[t] = cell
            cell += 1
    return out


def moved_cells(cells: Sequence[int | None], source: Sequence[int]) -> Cells:
    """The cells of a causal-masked sequence (`MultimodalTokenizer.causal_mask`), whose
    position t holds the original token `source[t]` (-1: a sentinel, None)."""
    return [None if j < 0 else cells[j] for j in source]


def hints_for(
    cells: Sequence[int | None], images: Sequence[Sequence[int]], slots: int
) -> torch.Tensor:
    """(T, slots) int64: at token t, the code retrieved image s holds at the cell token t + 1
    is (NO_HINT where t + 1 is not a cell of the image being written, at the last token, and
    for slots beyond len(images))."""
    out = torch.full((len(cells), slots), NO_HINT, dtype=torch.long)
    if not images or len(cells) < 2:
        return out
    grids = torch.as_tensor([list(g) for g in images[:slots]], dtype=torch.long)  # (S', N)
    nxt = torch.as_tensor([NO_HINT if c is None else c for c in cells[1:]], dtype=torch.long)
    rows = (nxt >= 0).nonzero().squeeze(1)  # tokens that predict a cell
    if int(nxt.max()) >= grids.shape[1]:
        raise ValueError(f"a cell {int(nxt.max())} beyond the retrieved grids' {grids.shape[1]}")
    out[rows, : grids.shape[0]] = grids[:, nxt[rows]].T
    return out


def pad_hints(rows: Sequence[torch.Tensor], width: int, left: bool) -> torch.Tensor:
    """(B, width, S) from per-row (T_r, S) hints, padded with NO_HINT on the left (decoding's
    left-padded prompts) or the right (training's right-padded batches)."""
    slots = max((r.shape[1] for r in rows), default=0)
    out = torch.full((len(rows), width, slots), NO_HINT, dtype=torch.long)
    for b, r in enumerate(rows):
        n = r.shape[0]
        if left:
            out[b, width - n :, : r.shape[1]] = r
        else:
            out[b, :n, : r.shape[1]] = r
    return out
