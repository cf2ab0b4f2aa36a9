"""The one sampler: greedy, top-k, nucleus, guidance, copy interpolation."""

from __future__ import annotations

import pytest
import torch

from mmrag.sampling import Sampling, guide, mix_in, sample_next


def test_sample_next_greedy_topk_and_nucleus() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0], [5.0, 0.0, 0.0, 4.9]])
    assert sample_next(logits, Sampling(temperature=0)).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, Sampling(top_k=1), g).tolist() == [1, 0]
        assert sample_next(logits, Sampling(top_p=0.01), g).tolist() == [1, 0]
        pair = sample_next(logits, Sampling(top_k=2), g)[1].item()
        assert pair in (0, 3)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)


def test_mix_in_is_the_interpolated_distribution() -> None:
    scores = torch.tensor([[0.0, 1.0, 2.0, float("-inf")], [0.0, 0.0, 0.0, 0.0]])
    mixed = mix_in(scores, torch.tensor([0, -1]), 0.25)
    expected = 0.75 * scores[0].softmax(-1) + 0.25 * torch.tensor([1.0, 0, 0, 0])
    assert mixed[0].softmax(-1) == pytest.approx(expected, abs=1e-6)
    assert mixed[0, 3] == float("-inf")  # a forbidden token stays forbidden
    assert torch.equal(mixed[1], scores[1])  # no suggestion: the row is unchanged
    assert torch.equal(mix_in(scores, torch.tensor([-1, 9]), 0.5), scores)


def test_nucleus_keeps_the_smallest_set_reaching_top_p() -> None:
    # probabilities 0.5, 0.3, 0.2: top-p 0.6 keeps the first two, never the third
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, Sampling(top_p=0.6), g)) for _ in range(200)}
    assert drawn == {0, 1}


def test_temperature_sharpens_towards_greedy() -> None:
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    g = torch.Generator().manual_seed(0)
    cold = [int(sample_next(logits, Sampling(temperature=0.01), g)) for _ in range(50)]
    assert set(cold) == {0}


def test_guidance_extrapolates_from_the_unconditional() -> None:
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    assert guide(cond, uncond, 3.0).tolist() == [[4.0, -2.0]]


def test_mix_in_takes_one_weight_per_row() -> None:
    scores = torch.log(torch.tensor([[0.5, 0.5, 0.0 + 1e-9], [0.25, 0.75, 1e-9]]))
    mixed = mix_in(scores, torch.tensor([2, 0]), torch.tensor([1.0, 0.5])).softmax(-1)
    assert torch.allclose(mixed[0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(mixed[1], torch.tensor([0.625, 0.375, 0.0]), atol=1e-6)
