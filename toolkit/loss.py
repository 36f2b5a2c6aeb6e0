"""The paper's loss: (1 - beta) * MSE + beta * KL(q(z | x, y) || N(0, I)).

Reduction (the paper does not state one; this is ours): both terms are summed per image, over
all pixels and channels for the MSE and over latent units for the KL, then averaged over the
batch. So `mse` is a squared error per image; divide by C*H*W for the per-pixel figure.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossTerms(NamedTuple):
    total: torch.Tensor  # what is minimised
    mse: torch.Tensor  # summed squared error per image, batch mean
    kl: torch.Tensor  # KL per image, batch mean


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image: -1/2 * sum(1 + logvar - mu^2 - exp(logvar))."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def cvae_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> LossTerms:
    # fp32 sums: in mixed precision the per-image sum over 100k+ pixels overflows fp16
    mse = (recon.float() - target.float()).pow(2).flatten(1).sum(dim=1).mean()
    kl = kl_standard_normal(mu.float(), logvar.float()).mean()
    return LossTerms((1 - beta) * mse + beta * kl, mse, kl)
