"""Decoding with a reference: the reference's pixels where the codes are its, decoding elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmrag.models.vq.reference import (
    agreement_mask,
    paste_reference,
    pixel_difference,
    pixel_distance,
    upscale,
)


def test_cells_whose_code_agrees_keep_the_reference_pixels() -> None:
    decoded = Image.new("RGB", (8, 8), (0, 0, 255))
    reference = Image.new("RGB", (32, 32), (255, 0, 0))  # any size: resized to the output
    codes, reference_codes = [1, 2, 3, 4], [1, 9, 3, 9]  # a 2 x 2 grid: cells 0 and 2 agree
    out = np.asarray(paste_reference(decoded, codes, reference, reference_codes, 16))
    assert out.shape == (16, 16, 3)
    assert (out[:8, :8] == (255, 0, 0)).all() and (out[8:, :8] == (255, 0, 0)).all()
    assert (out[:8, 8:] == (0, 0, 255)).all() and (out[8:, 8:] == (0, 0, 255)).all()


def test_no_agreement_is_the_decoding_upscaled_and_full_agreement_the_reference() -> None:
    decoded = Image.new("RGB", (8, 8), (10, 20, 30))
    reference = Image.new("RGB", (16, 16), (200, 100, 50))
    none = paste_reference(decoded, [1, 2, 3, 4], reference, [5, 6, 7, 8], 16)
    assert none.tobytes() == upscale(decoded, 16).tobytes()
    full = paste_reference(decoded, [1, 2, 3, 4], reference, [1, 2, 3, 4], 16, feather=2.0)
    assert full.tobytes() == reference.tobytes()


def test_feathering_blends_the_seam() -> None:
    sharp = agreement_mask([1, 2, 3, 4], [1, 9, 3, 9], 2, 16, 0.0)[..., 0]
    soft = agreement_mask([1, 2, 3, 4], [1, 9, 3, 9], 2, 16, 2.0)[..., 0]
    assert set(np.unique(sharp)) == {0.0, 1.0}
    assert 0.0 < soft[4, 7] < 1.0 and 0.0 < soft[4, 8] < 1.0  # either side of the seam
    assert soft[4, 0] > 0.9 and soft[4, 15] < 0.1
    with pytest.raises(ValueError, match="cells"):
        agreement_mask([1, 2, 3], [1, 2, 3], 2, 16, 0.0)


def test_pixel_difference_sees_a_small_changed_region_that_the_mean_hides() -> None:
    base = np.full((32, 32, 3), 200, np.uint8)
    changed = base.copy()
    changed[:4, :4] = (90, 60, 40)  # 1.6% of the pixels: a face of another skin tone
    rng = np.random.default_rng(0)
    noisy = (base.astype(int) + rng.integers(-3, 4, base.shape)).clip(0, 255).astype(np.uint8)
    a, b, c = (Image.fromarray(x) for x in (base, changed, noisy))
    assert pixel_distance(a, b) < 4  # the mean: "alike"
    assert pixel_difference(a, b) > 100  # the 99th percentile: a region differs
    assert pixel_difference(a, c) <= 3 and pixel_difference(a, a) == 0
