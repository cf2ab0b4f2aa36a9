"""Colour analogies: a map learnt from aligned pairs recolours what the pairs recolour."""

from __future__ import annotations

import numpy as np
import pytest

from mmrag.models.ra_cm3.recolour import ColourMap

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
GREEN, BLUE, RED = (40, 180, 60), (30, 60, 220), (220, 30, 30)
RGB = tuple[int, int, int]


def picture(shape: str, colour: RGB, outline: RGB = BLACK) -> np.ndarray:
    """A 16 x 16 white picture with a coloured square or bar, outlined."""
    x = np.full((16, 16, 3), WHITE, np.uint8)
    if shape == "square":
        x[3:13, 3:13] = outline
        x[4:12, 4:12] = colour
    else:
        x[6:10, 1:15] = outline
        x[7:9, 2:14] = colour
    return x


def test_a_recolouring_learnt_from_other_shapes_applies_to_a_new_one() -> None:
    pairs = [(picture("square", GREEN), picture("square", BLUE))]
    colours = ColourMap.learn(pairs)
    assert colours.moves_anything
    assert colours.gain(pairs) == pytest.approx(1.0)
    bar = colours.apply(picture("bar", GREEN))
    assert (bar == picture("bar", BLUE)).all()  # green became blue; white and outline stay
    untouched = picture("bar", RED)
    assert (colours.apply(untouched) == untouched).all()


def test_colours_near_a_moved_one_move_with_it() -> None:
    colours = ColourMap.learn([(picture("square", GREEN), picture("square", BLUE))])
    shade = (GREEN[0] + 6, GREEN[1] - 7, GREEN[2] + 5)  # a neighbouring bin no pair holds
    moved = colours.apply(picture("bar", shade))[7, 5]
    assert np.abs(moved.astype(int) - np.array(BLUE) - (6, -7, 5)).max() <= 1


def test_an_edit_that_moves_shapes_gains_little() -> None:
    pairs = [(picture("square", GREEN), picture("bar", GREEN))]
    colours = ColourMap.learn(pairs)
    assert colours.gain(pairs) < 0.5


def test_pairs_that_do_not_differ_move_nothing() -> None:
    same = picture("square", GREEN)
    colours = ColourMap.learn([(same, same.copy())])
    assert not colours.moves_anything and colours.gain([(same, same)]) == 0.0
    with pytest.raises(ValueError, match="at least one pair"):
        ColourMap.learn([])
    with pytest.raises(ValueError, match="one size"):
        ColourMap.learn([(same, same[:8])])
