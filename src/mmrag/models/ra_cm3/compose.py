"""Composing captions from retrieved ones: what RA-CM3 writes for an image the memory does not
hold.

An image that is not stored is often a new combination of parts the memory holds apart: a
held-out emoji variant `woman cook: dark skin tone` whose siblings (`woman cook: medium skin
tone`, ...) are stored, and whose skin tone is stored in other families (`man cook: dark skin
tone`). Copying the top retrieved caption writes the sibling's attribute; the generator alone
does not know the attribute from the image well enough to overrule the copy (docs/ra-cm3.md,
"Composition"). `recombinations` therefore proposes captions that join a prefix of one
retrieved caption to a suffix of another at a word they share (`woman cook:` + `: dark skin
tone`), and the model ranks them with the generator's samples and the retrieved captions
themselves (`RACM3.generate_caption`).

Drawing has the same problem: copying the top retrieved image draws the sibling's attribute.
`analogous_pairs` finds, among the retrieved documents, pairs that differ as the caption asked
for differs from the copied document's (`man cook: medium skin tone` / `man cook: dark skin
tone` when `woman cook: dark skin tone` is asked and `woman cook: medium skin tone` copied), and
`translate_codes` changes the copied image's VQ codes as those pairs' codes change: an image
analogy learnt from the memory at request time.

Words here are whitespace-separated, with `,` and `:` split off as words of their own, so a
join can happen at punctuation; `join` puts them back.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Sequence

_PUNCT = re.compile(r"\s*([,:;])")


def words(text: str) -> list[str]:
    """`text` as words, with `,`, `:` and `;` as words of their own."""
    return _PUNCT.sub(r" \1", text).split()


def join(parts: Sequence[str]) -> str:
    """The text of `words`: words joined by spaces, no space before punctuation."""
    return _PUNCT.sub(r"\1", " ".join(parts))


def recombinations(captions: Sequence[str], heads: int = 2) -> list[str]:
    """The captions, then each of the first `heads` captions' prefixes joined to every
    caption's suffix at a word both hold (the shared word kept once), each text once, in
    order of first appearance."""
    out = dict.fromkeys(c for c in captions if c.strip())
    split = [words(c) for c in captions]
    for a in split[:heads]:
        for b in split:
            if a is b:
                continue
            for i, word in enumerate(a):
                for j, other in enumerate(b):
                    if word == other:
                        text = join([*a[: i + 1], *b[j + 1 :]])
                        if text:
                            out.setdefault(text)
    return list(out)


def spans_between(captions: Sequence[str], left: str, right: str) -> list[str]:
    """The spans of retrieved captions that fit a caption with a gap between `left` and
    `right` (caption infilling): in each caption, what lies between the last word of `left`
    and the first word of `right` (either context may be empty: then from the start, or to
    the end), each span once, in order of first appearance."""
    before, after = words(left)[-1:], words(right)[:1]
    out: dict[str, None] = {}
    for caption in captions:
        parts = words(caption)
        starts = [i + 1 for i, w in enumerate(parts) if w in before] if before else [0]
        for start in starts:
            ends = [j for j in range(start, len(parts)) if parts[j] in after] if after else []
            for end in ends or ([len(parts)] if not after else []):
                span = join(parts[start:end])
                if span:
                    out.setdefault(span)
    return list(out)


# --- drawing by analogy ----------------------------------------------------------------------

Edit = tuple[tuple[str, ...], tuple[str, ...]]


def caption_edits(source: str, target: str) -> list[Edit]:
    """The word replacements (old words, new words) that turn `source` into `target`."""
    a, b = words(source), words(target)
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    return [
        (tuple(a[i1:i2]), tuple(b[j1:j2]))
        for op, i1, i2, j1, j2 in matcher.get_opcodes()
        if op != "equal"
    ]


def apply_edits(text: str, edits: Sequence[Edit]) -> str | None:
    """`text` with each edit's old words replaced by its new words (first occurrence); None
    where an edit's old words are not in it (or an edit only inserts)."""
    parts = words(text)
    for old, new in edits:
        at = next(
            (s for s in range(len(parts) - len(old) + 1) if tuple(parts[s : s + len(old)]) == old),
            None,
        )
        if not old or at is None:
            return None
        parts = [*parts[:at], *new, *parts[at + len(old) :]]
    return join(parts)


def analogous_pairs(captions: Sequence[str], edits: Sequence[Edit]) -> list[tuple[int, int]]:
    """Pairs (i, j) of `captions` where the edits turn caption i into caption j: documents that
    differ as the drawing asked for differs from the document it copies. An edit that only
    inserts words (`banana` -> `purple banana`) is learnt where those words replaced others:
    pairs whose captions differ by one such replacement (`yellow heart` / `purple heart`)."""
    at = {c: j for j, c in enumerate(captions)}
    out = []
    for i, caption in enumerate(captions):
        edited = apply_edits(caption, edits) if edits else None
        if edited is not None and edited != caption and edited in at:
            out.append((i, at[edited]))
    if len(edits) == 1 and not edits[0][0] and edits[0][1]:
        out += replacements_by(captions, edits[0][1])
    return out


def replacements_by(captions: Sequence[str], new: tuple[str, ...]) -> list[tuple[int, int]]:
    """Pairs (i, j) of `captions` that differ by one replacement of words of caption i by the
    words `new` (`yellow heart` / `purple heart` for `purple`)."""
    holding = [j for j, c in enumerate(captions) if _holds(words(c), new)]
    return [
        (i, j)
        for j in holding
        for i, caption in enumerate(captions)
        if i != j
        and len(edits := caption_edits(caption, captions[j])) == 1
        and edits[0][0]
        and edits[0][1] == new
    ]


def _holds(parts: Sequence[str], new: tuple[str, ...]) -> bool:
    return any(tuple(parts[s : s + len(new)]) == new for s in range(len(parts) - len(new) + 1))


def translate_codes(
    codes: Sequence[int], pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> list[int]:
    """`codes` with each code replaced as the `pairs` of aligned code grids (before, after the
    edit) replace it: code a becomes the code b that stands most often where a stood in a
    pair's first grid, if a changed there more often than it stayed."""
    moved: dict[int, Counter[int]] = {}
    kept: Counter[int] = Counter()
    for before, after in pairs:
        for a, b in zip(before, after, strict=True):
            if a == b:
                kept[a] += 1
            else:
                moved.setdefault(a, Counter())[b] += 1
    out = []
    for a in codes:
        best = moved[a].most_common(1)[0] if a in moved else None
        out.append(best[0] if best is not None and best[1] > kept[a] else a)
    return out
