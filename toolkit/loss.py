"""The paper's loss: (1 - beta) * MSE + beta * KL(q(z | x, y) || p(z | x)).

p(z | x) is N(0, I) (the paper's code) or, for a model with the learned prior, the diagonal Gaussian
N(prior_mu, diag exp(prior_logvar)) that the model computes from the attributes.

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
    mse_prior: torch.Tensor | None = None  # the same for images decoded from the prior (gsnn_weight > 0)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image [B], summed over latent units (dim 1):
    -1/2 * sum(1 + logvar - mu^2 - exp(logvar))."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def kl_gaussians(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) between diagonal Gaussians, per image [B],
    summed over latent units (dim 1):
    1/2 * sum(logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) / exp(logvar_p) - 1)."""
    ratio = (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p)
    return 0.5 * torch.sum(logvar_p - logvar_q + ratio - 1, dim=1)


def cvae_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    prior_recon: torch.Tensor | None = None,
    gsnn_weight: float = 0.0,
) -> LossTerms:
    """The loss terms, batch means of per-image sums (see the module docstring). The KL is against
    N(0, I) unless prior_mu and prior_logvar (the learned prior's, [B, Z]) are given.

    gsnn_weight g > 0 (with `prior_recon`: the images decoded from z drawn from the prior instead of
    the posterior) gives Sohn et al.'s hybrid objective, (1 - g) * CVAE + g * GSNN, where the GSNN
    term is (1 - beta) * MSE(prior_recon, target). Why: the CVAE term alone lets the decoder read an
    attribute from z (the encoder sees the image), so at sampling time, where z comes from the prior,
    switching the attribute changes little; the GSNN term trains the decoder the way it is sampled,
    so it must take the attributes from the condition. g = 0 is the paper's loss exactly."""
    if (prior_mu is None) != (prior_logvar is None):
        raise ValueError("cvae_loss: give both prior_mu and prior_logvar, or neither (prior N(0, I))")
    # fp32 sums: in mixed precision the per-image sum over 100k+ pixels overflows fp16
    mse = (recon.float() - target.float()).pow(2).flatten(1).sum(dim=1).mean()
    if prior_mu is None:
        kl = kl_standard_normal(mu.float(), logvar.float()).mean()
    else:
        kl = kl_gaussians(mu.float(), logvar.float(), prior_mu.float(), prior_logvar.float()).mean()
    total = (1 - beta) * mse + beta * kl
    if gsnn_weight == 0:
        return LossTerms(total, mse, kl)
    if prior_recon is None:
        raise ValueError("cvae_loss: gsnn_weight > 0 needs prior_recon, the images decoded from the prior")
    mse_prior = (prior_recon.float() - target.float()).pow(2).flatten(1).sum(dim=1).mean()
    return LossTerms((1 - gsnn_weight) * total + gsnn_weight * (1 - beta) * mse_prior, mse, kl, mse_prior)
