"""The adversarial part of VQ training (Esser et al. 2021, taming-transformers' VQGAN loss).

A pixel loss alone rewards the mean of the plausible patches a code could stand for, which is
a blur; a patch discriminator penalises outputs that do not look like real patches. As in
VQGAN: a PatchGAN discriminator (Isola et al. 2017) with the hinge loss, and the generator's
adversarial term scaled by the adaptive weight ||grad L_rec|| / ||grad L_adv|| taken at the
decoder's last layer, so neither term swamps the other whatever their scales.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class PatchDiscriminator(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (B, 1, s, s) realness logits, one per overlapping patch
    (receptive field 34 px with the default three strided layers)."""

    def __init__(self, channels: int = 32, layers: int = 3, groups: int = 8) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        cin = channels
        for i in range(1, layers):
            cout = channels * 2**i
            stride = 2 if i < layers - 1 else 1
            blocks += [nn.Conv2d(cin, cout, 4, stride, 1), nn.GroupNorm(groups, cout)]
            blocks.append(nn.LeakyReLU(0.2))
            cin = cout
        blocks.append(nn.Conv2d(cin, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return functional.relu(1.0 - real).mean() + functional.relu(1.0 + fake).mean()


def adaptive_weight(
    reconstruction: torch.Tensor,
    adversarial: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """||d rec / d W|| / ||d adv / d W|| at the decoder's last layer `W`, detached (VQGAN)."""
    rec_grad = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (adv_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
