"""Copy hints: the retrieved images' codes, aligned with the cell of the image being written.

Why. Prepending retrieved documents (RA-CM3) lets attention copy from them in principle,
but in our small generator that circuit never formed: after 900 or 3,000 steps its held-out
NLL per image code was the same with the held-out image's siblings prepended as with nothing
(docs/results.md), although the best sibling holds the same code as the held-out image
at ~59% of the 256 cells (a random emoji: ~5%, mostly background). A copy hint hands that
evidence to the cell being predicted: at every token whose next token is cell c of the
image being written, the generator adds, for each retrieved image s (in rank order), an
embedding of the code image s holds at cell c (`Generator.forward(hints=...)`). The model
learns how far to trust each slot; with nothing retrieved there is no hint, and the model
is the plain one (the vanilla baseline and the unconditional branch of guidance).

Text copy hints (`GeneratorConfig.text_hints`) do the same for the caption being written, the
words a retrieved caption suggests next. Captions do not align cell by cell (siblings differ
by inserted and swapped words: "woman dancing: dark skin tone" / "man dancing"), so the
suggestion is an induction rule (`suggest`): after the longest suffix of the caption written
so far that the retrieved caption contains, the token that follows it there; with no match,
the retrieved caption's token at the same position. The rule depends on the tokens written,
so decoding computes it step by step (`TextCopy`); training computes it from the true caption
(`text_hints_for`).

The same-document slot (`in_slots`). Training with RA-CM3's relevance cap and self-exclusion
never retrieves the document being written, so the model learns that a retrieval is always
another document and does not copy one the memory holds even when it is exactly the one
asked about. A model trained with `--same-document` keeps its last slot for that case: the
document itself in a share of training examples, at inference a retrieved document whose
image or caption is the query's.

Conventions. A sequence's *cells* say, for each token, which cell of the image being written
(the main document's) it is, or None; `hints_for` shifts them by one (a token predicts the
next one) and looks the codes up. Codes are 0-based VQ codes (token id - image_offset); -1
means no hint. Text hints share the tensor: a caption token id `t` is stored as
`offset + t`, with `offset` = the model's `hint_codes`, so a hint below it is an image code
and one at or above it a token (a token position is never an image cell).
"""

from __future__ import annotations

import dataclasses
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
    is (NO_HINT where t + 1 is not a cell of the image being written, at the last token, for
    an empty image (a slot left free, see `in_slots`), and for slots beyond len(images))."""
    out = torch.full((len(cells), slots), NO_HINT, dtype=torch.long)
    used = [(s, g) for s, g in enumerate(images[:slots]) if len(g)]
    if not used or len(cells) < 2:
        return out
    grids = torch.as_tensor([list(g) for _, g in used], dtype=torch.long)  # (S', N)
    nxt = torch.as_tensor([NO_HINT if c is None else c for c in cells[1:]], dtype=torch.long)
    rows = (nxt >= 0).nonzero().squeeze(1)  # tokens that predict a cell
    if int(nxt.max()) >= grids.shape[1]:
        raise ValueError(f"a cell {int(nxt.max())} beyond the retrieved grids' {grids.shape[1]}")
    picked = grids[:, nxt[rows]].T  # (rows, S')
    for column, (s, _) in enumerate(used):
        out[rows, s] = picked[:, column]
    return out


def in_slots(
    items: Sequence[Sequence[int]], slots: int, same_slot: bool, same: int | None
) -> list[Sequence[int]]:
    """The retrieved documents' images (or captions), in rank order, placed in the hint
    slots: with `same_slot` the model keeps its last slot for *the same document* as the
    one being written (training puts the document itself there; inference, a retrieved one
    whose given part, the query image or caption, is identical), so the `same`-th item goes
    there and the others fill the slots before it; empty entries are free slots. Items
    beyond the slots get no hints."""
    if not same_slot:
        return list(items[:slots])
    others = [x for i, x in enumerate(items) if i != same][: slots - 1]
    out: list[Sequence[int]] = [*others, *([()] * (slots - 1 - len(others)))]
    return [*out, items[same] if same is not None else ()]


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


# --- text copy hints ----------------------------------------------------------------------


def caption_cells(length: int, start: int, end: int) -> Cells:
    """Cells of an un-transformed sequence's caption: tokens [start, end) numbered 0, 1, ...;
    every other token None (`moved_cells` follows them through the causal-mask transform)."""
    return [t - start if start <= t < end else None for t in range(length)]


def suggest(source: Sequence[int], run: Sequence[int], position: int, end: int) -> int:
    """The token a retrieved caption `source` suggests at caption position `position`, given
    `run`, the caption tokens written just before it (all of them, or fewer after a gap):
    after the longest suffix of `run` that occurs in `source` (its first occurrence), the
    token that follows it there; without a match, `source`'s token at `position`. `end` (the
    token that closes a caption in this sequence) is suggested just past `source`'s last
    token; NO_HINT beyond that and for an empty source."""
    if not source:
        return NO_HINT
    follow = follow_at(source, run, position)
    if follow < len(source):
        return int(source[follow])
    return end if follow == len(source) else NO_HINT


def follow_at(source: Sequence[int], run: Sequence[int], position: int) -> int:
    """Where `source` goes on after `run` (`suggest`'s rule): just after the first occurrence
    of the longest suffix of `run` that `source` contains; without one, at `position`."""
    best, at = 0, -1
    for j in range(len(source)):
        n = 0
        while n <= j and n < len(run) and source[j - n] == run[len(run) - 1 - n]:
            n += 1
        if n > best:
            best, at = n, j
    return at + 1 if best else position


def text_hints_for(
    ids: Sequence[int],
    cells: Sequence[int | None],
    caption: Sequence[int],
    sources: Sequence[Sequence[int]],
    slots: int,
    offset: int,
    complete: bool = True,
) -> torch.Tensor:
    """(T, slots) int64 text copy hints of a sequence `ids` whose caption cells are `cells`
    (the caption `caption`): at token t that predicts caption token j (or the token closing
    the caption), `offset + suggest(source s, the run of caption tokens just before t + 1 in
    the sequence, j, closing token)` for each retrieved caption s. `complete=False`: the
    caption goes on beyond `caption` (a left context before the tokens to decode), so no
    token closes it."""
    out = torch.full((len(ids), slots), NO_HINT, dtype=torch.long)
    n = len(caption)
    if not sources or not n or len(ids) < 2:
        return out
    last = next((t for t, c in enumerate(cells) if c == n - 1), None)
    if last is None or last + 1 >= len(ids):
        return out
    end = int(ids[last + 1]) if complete else NO_HINT
    for t in range(len(ids) - 1):
        j = cells[t + 1]
        if j is None:
            if t != last or not complete:
                continue
            j = n  # t predicts the token that closes the caption
        r = t  # walk back over the caption tokens written just before j, in order
        while r >= 0 and cells[r] is not None and cells[r] == j - 1 - (t - r):
            r -= 1
        run = caption[j - (t - r) : j]
        out[t] = torch.as_tensor(suggestions(sources, run, j, end, slots, offset))
    return out


def suggestions(
    sources: Sequence[Sequence[int]],
    run: Sequence[int],
    position: int,
    end: int,
    slots: int,
    offset: int,
) -> list[int]:
    """The text hints (slots,) of one token: `offset + suggest(...)` of each retrieved caption
    in rank order, NO_HINT where it suggests nothing and for slots beyond the sources."""
    out = [NO_HINT] * slots
    for s, source in enumerate(sources[:slots]):
        hint = suggest(source, run, position, end)
        if hint != NO_HINT:
            out[s] = offset + hint
    return out


def merge_hints(image: torch.Tensor | None, text: torch.Tensor | None) -> torch.Tensor | None:
    """Image and text hints of one sequence in one (T, S) tensor (their tokens are disjoint:
    a token predicts an image cell or a caption token, not both)."""
    if image is None or text is None:
        return image if text is None else text
    slots = max(image.shape[1], text.shape[1])
    out = torch.full((image.shape[0], slots), NO_HINT, dtype=torch.long)
    out[:, : image.shape[1]] = image
    text_rows = text != NO_HINT
    out[:, : text.shape[1]][text_rows] = text[text_rows]
    return out


def sequence_hints(
    cells: Sequence[int | None],
    images: Sequence[Sequence[int]],
    slots: int,
    offset: int = 0,
    ids: Sequence[int] = (),
    words: Sequence[int | None] | None = None,
    captions: Sequence[Sequence[int]] = (),
    complete: bool = True,
) -> torch.Tensor:
    """(len(cells), slots) copy hints of a sequence, built the same way for training and
    inference: the retrieved `images`' codes at the image `cells`, and, with the caption
    cells `words` of its first tokens `ids` and retrieved `captions`, the text hints of its
    caption (in cell order from `ids`; `complete` as in `text_hints_for`) merged in."""
    hints = hints_for(cells, images, slots)
    if words is None or not captions:
        return hints
    order = sorted((c, t) for t, c in enumerate(words) if c is not None)
    caption = [ids[t] for _, t in order]
    text = text_hints_for(ids, words, caption, captions, slots, offset, complete)
    merged = merge_hints(hints[: len(ids)], text)
    assert merged is not None
    hints[: len(ids)] = merged
    return hints


@dataclasses.dataclass(frozen=True)
class TextCopy:
    """Text copy hints for a caption being decoded: the retrieved captions' tokens in slot
    order, the token that closes the caption (decoding's stop token), the hint offset (the
    model's `hint_codes`) and the caption position of the first decoded token (after a
    left context kept in place, as in caption infilling).

    The text copy interpolation (decoding.py) follows one of them, `copy_from`, with weight
    `weight` (0: hints only): the token it suggests after the left context `left` and the
    tokens decoded so far, and the closing token where it goes on with the right context
    `right` (caption infilling: the span ends where the given text resumes)."""

    sources: tuple[tuple[int, ...], ...]
    end: int
    offset: int
    start: int = 0
    copy_from: int | None = None
    weight: float = 0.0
    left: tuple[int, ...] = ()
    right: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"TextCopy.weight must be in [0, 1], got {self.weight}")
        if self.copy_from is not None and not 0 <= self.copy_from < len(self.sources):
            raise ValueError(f"TextCopy.copy_from {self.copy_from} is not a source")

    def row(self, decoded: Sequence[int], slots: int) -> list[int]:
        """The hints (slots,) of the token after `decoded`, the tokens decoded so far."""
        position = self.start + len(decoded)
        return suggestions(self.sources, decoded, position, self.end, slots, self.offset)

    @property
    def copies(self) -> bool:
        return self.weight > 0 and self.copy_from is not None and bool(self.sources[self.copy_from])

    def target(self, decoded: Sequence[int]) -> int:
        """The token the copied caption suggests after `decoded` (NO_HINT: none)."""
        if not self.copies:
            return NO_HINT
        assert self.copy_from is not None
        source = self.sources[self.copy_from]
        follow = follow_at(source, (*self.left, *decoded), self.start + len(decoded))
        if self.right and tuple(source[follow : follow + len(self.right)]) == self.right:
            return self.end
        if follow < len(source):
            return int(source[follow])
        return self.end if follow == len(source) else NO_HINT
