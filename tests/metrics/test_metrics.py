"""Metrics: Frechet distance, FID on the declared extractor, CIDEr, dual-encoder score, R@k."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmrag.encoders.hashing import HashingEncoder
from mmrag.metrics.captions import cider, tokenize_caption
from mmrag.metrics.fid import fid, frechet_distance
from mmrag.metrics.retrieval import dual_encoder_scores, nearest_is_right, recall_at_k


def test_frechet_distance_of_gaussians() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, shifted) == pytest.approx(5.0, rel=1e-3)
    scaled = rng.normal(size=(4000, 3)) * 2.0  # (sqrt(4) - 1)^2 = 1 per dimension
    assert frechet_distance(a, scaled) == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match="two samples"):
        frechet_distance(a[:1], a)


@pytest.mark.pretrained
def test_fid_separates_similar_from_different_images() -> None:
    def disc(colour: tuple[int, int, int], shift: int) -> Image.Image:
        img = Image.new("RGB", (64, 64), "white")
        img.paste(colour, (10 + shift, 10, 40 + shift, 40))
        return img

    reds = [disc((220, 20, 20), s) for s in range(6)]
    other_reds = [disc((230, 30, 30), s + 1) for s in range(6)]
    blues = [Image.new("RGB", (64, 64), (20, 40, 200 + s)) for s in range(6)]
    assert fid(reds, other_reds) < fid(reds, blues)


def test_cider_rewards_matching_captions() -> None:
    refs = [["woman dancing: medium skin tone"], ["red apple"], ["keycap: 1"]]
    perfect = cider(["Woman dancing: medium skin tone.", "red apple", "keycap: 1"], refs)
    partial = cider(["woman dancing", "green apple", "keycap 2"], refs)
    wrong = cider(["a cat", "a dog", "a car"], refs)
    assert perfect > partial > wrong == 0.0
    assert tokenize_caption("Woman, DANCING: medium-skin tone!") == "woman dancing medium skin tone"
    with pytest.raises(ValueError, match="references"):
        cider(["a"], [])


def test_dual_encoder_scores_and_recall() -> None:
    encoder = HashingEncoder(dim=64)
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    scores = dual_encoder_scores(encoder, images, ["a red square", "a blue square"])
    assert scores.shape == (2,) and np.all(np.abs(scores) <= 1.0 + 1e-6)
    assert recall_at_k([0, 3, -1, 12], (1, 5)) == {"R@1": 0.25, "R@5": 0.5}
    gen = np.eye(3)[[2, 0, 1]]
    assert nearest_is_right(gen, np.eye(3), [2, 0, 0]).tolist() == [True, True, False]
