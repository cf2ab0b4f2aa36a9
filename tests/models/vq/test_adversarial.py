"""The VQGAN adversarial pieces: patch discriminator, hinge loss, adaptive weight."""

from __future__ import annotations

import pytest
import torch

from mmrag.models.vq.adversarial import (
    PatchDiscriminator,
    adaptive_weight,
    hinge_discriminator_loss,
)


def test_patch_discriminator_scores_overlapping_patches() -> None:
    disc = PatchDiscriminator(channels=8, layers=3)
    logits = disc(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 1, 14, 14)  # 64 -> 32 -> 16 -> 15 -> 14


def test_hinge_loss_is_zero_only_beyond_the_margins() -> None:
    assert hinge_discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    loss = hinge_discriminator_loss(torch.zeros(4), torch.zeros(4))
    assert loss.item() == pytest.approx(2.0)
    real, fake = torch.tensor([0.5]), torch.tensor([0.25])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 + 1.25)


def test_adaptive_weight_balances_the_two_gradients() -> None:
    w = torch.ones(3, requires_grad=True)
    reconstruction = (6.0 * w).sum()  # gradient norm 6 sqrt(3)
    adversarial = (2.0 * w).sum()  # gradient norm 2 sqrt(3)
    weight = adaptive_weight(reconstruction, adversarial, w)
    assert weight.item() == pytest.approx(3.0, rel=1e-3)
    assert not weight.requires_grad
    capped = adaptive_weight((6.0 * w).sum(), (0.0 * w).sum(), w, max_weight=100.0)
    assert capped.item() == 100.0
