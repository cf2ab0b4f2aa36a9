"""Colour analogies: recolour an image as pairs of stored images show a caption edit recolours.

Drawing a caption the memory does not hold often means changing the colour of something it
does hold: `woman cook: dark skin tone` when `woman cook: medium skin tone` is stored, `blue
apple` when a green apple is. The memory holds the change elsewhere, in pairs of documents whose
captions differ the same way (`man cook: medium skin tone` / `man cook: dark skin tone`, `green
heart` / `blue heart`; `compose.analogous_pairs` finds them). An image analogy in the sense of
Hertzmann et al. (2001), restricted to colour: learn from the pairs' aligned pixels which
colours the edit moves and where to (`ColourMap.learn`), check that such a map explains the
pairs (`ColourMap.gain`: an edit that moves shapes, `pointing left` / `pointing right`, is no
recolouring and gains little), and apply it to the image being copied (`ColourMap.apply`).

Colours are binned on a 32-level grid per channel. A bin moves when more of its pixels change
than stay across the pairs; it moves by the mean change of its pixels that changed. Bins no pair
holds take the move of their most populated neighbour bin (anti-aliased edges are blends of
colours that are held), else stay.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

LEVELS = 32  # bins per channel
_WIDTH = 256 // LEVELS

Pixels = NDArray[np.uint8]  # (H, W, 3)
Pair = tuple[Pixels, Pixels]


def _bins(pixels: NDArray[np.generic]) -> NDArray[np.int64]:
    q = (np.asarray(pixels).reshape(-1, 3).astype(np.int64) // _WIDTH).clip(0, LEVELS - 1)
    return (q[:, 0] * LEVELS + q[:, 1]) * LEVELS + q[:, 2]


def _fill_from_neighbours(
    count: NDArray[np.float64], shift: NDArray[np.float64]
) -> NDArray[np.float64]:
    """`shift` with every empty bin given the shift of its most populated neighbour bin (the
    26 around it on the colour grid), itself empty when all neighbours are."""
    cube_count = count.reshape(LEVELS, LEVELS, LEVELS)
    cube_shift = shift.reshape(LEVELS, LEVELS, LEVELS, 3)
    best = np.zeros_like(cube_count)
    filled = cube_shift.copy()
    pad_count = np.pad(cube_count, 1)
    pad_shift = np.pad(cube_shift, ((1, 1), (1, 1), (1, 1), (0, 0)))
    empty = cube_count == 0
    for dr, dg, db in itertools.product((0, 1, 2), repeat=3):
        if (dr, dg, db) == (1, 1, 1):
            continue
        near = pad_count[dr : dr + LEVELS, dg : dg + LEVELS, db : db + LEVELS]
        take = empty & (near > best)
        best = np.where(take, near, best)
        filled[take] = pad_shift[dr : dr + LEVELS, dg : dg + LEVELS, db : db + LEVELS][take]
    return filled.reshape(-1, 3)


@dataclasses.dataclass(frozen=True)
class ColourMap:
    """A move (RGB change) per colour bin; zero for colours the edit leaves alone."""

    shift: NDArray[np.float64]  # (LEVELS ** 3, 3)

    @classmethod
    def learn(cls, pairs: Sequence[Pair], changed: float = 24.0, min_pixels: int = 3) -> ColourMap:
        """The map of the `pairs` (before, after), each two aligned images of one size: a pixel
        changed where a channel moved by more than `changed`; a bin moves when more of its
        pixels changed than stayed, and at least `min_pixels` did."""
        if not pairs:
            raise ValueError("a colour map needs at least one pair")
        before = np.concatenate([np.asarray(a, np.float64).reshape(-1, 3) for a, _ in pairs])
        after = np.concatenate([np.asarray(b, np.float64).reshape(-1, 3) for _, b in pairs])
        if before.shape != after.shape:
            raise ValueError("the images of a pair must have one size")
        moved = np.abs(after - before).max(1) > changed
        bins = _bins(before)
        size = LEVELS**3
        count = np.bincount(bins, minlength=size).astype(np.float64)
        moves = np.bincount(bins, weights=moved, minlength=size)
        change = (after - before) * moved[:, None]
        sums = np.stack([np.bincount(bins, change[:, c], minlength=size) for c in range(3)], 1)
        delta = sums / np.maximum(moves, 1.0)[:, None]
        keep = (moves > count - moves) & (moves >= min_pixels)
        return cls(_fill_from_neighbours(count, np.where(keep[:, None], delta, 0.0)))

    def apply(self, pixels: Pixels) -> Pixels:
        """`pixels` (H, W, 3) with every colour moved as its bin moves."""
        x = np.asarray(pixels)
        moved = x.reshape(-1, 3).astype(np.float64) + self.shift[_bins(x)]
        return moved.round().clip(0, 255).astype(np.uint8).reshape(x.shape)

    @property
    def moves_anything(self) -> bool:
        return bool(np.any(self.shift))

    def gain(self, pairs: Sequence[Pair]) -> float:
        """How much of the pairs' difference the map explains: 1 - |map(before) - after| /
        |before - after| (summed over pixels and pairs); 1 for a pure recolouring, near 0 or
        below for an edit that moves shapes, 0 for pairs that do not differ."""
        was = sum(float(np.abs(a.astype(np.int64) - b).sum()) for a, b in pairs)
        now = sum(float(np.abs(self.apply(a).astype(np.int64) - b).sum()) for a, b in pairs)
        return 1.0 - now / was if was else 0.0
