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

Words here are whitespace-separated, with `,` and `:` split off as words of their own, so a
join can happen at punctuation; `join` puts them back.
"""

from __future__ import annotations

import re
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
