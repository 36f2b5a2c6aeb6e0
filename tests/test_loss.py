import math

import torch

from toolkit.loss import cvae_loss, kl_standard_normal


def test_loss_equals_hand_computation():
    # two images of 1 x 1 x 2 "pixels"
    recon = torch.tensor([[[[0.0, 1.0]]], [[[0.5, 0.5]]]])
    target = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]]])
    # image 1: (0-1)^2 + 0 = 1; image 2: 0.25 + 0.25 = 0.5 -> batch mean 0.75
    mu = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [math.log(2.0), 0.0]])
    # KL per unit = -1/2 (1 + lv - mu^2 - e^lv): img1: 0 + 0.5 = 0.5; img2: -1/2(1 + ln2 - 4 - 2) + 0 = 2.5 - ln2/2
    kl1, kl2 = 0.5, 2.5 - math.log(2.0) / 2
    terms = cvae_loss(recon, target, mu, logvar, beta=0.25)
    assert math.isclose(terms.mse.item(), 0.75, rel_tol=1e-6)
    assert math.isclose(terms.kl.item(), (kl1 + kl2) / 2, rel_tol=1e-6)
    assert math.isclose(terms.total.item(), 0.75 * 0.75 + 0.25 * (kl1 + kl2) / 2, rel_tol=1e-6)
    assert torch.allclose(kl_standard_normal(mu, logvar), torch.tensor([kl1, kl2]))


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(3, 5)
    assert torch.equal(kl_standard_normal(zeros, zeros), torch.zeros(3))
    assert (kl_standard_normal(torch.randn(3, 5), torch.randn(3, 5)) > 0).all()


def test_beta_weights_the_two_terms():
    recon, target = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    only_mse = cvae_loss(recon, target, mu, logvar, beta=0.0)
    only_kl = cvae_loss(recon, target, mu, logvar, beta=1.0)
    assert torch.equal(only_mse.total, only_mse.mse) and torch.equal(only_kl.total, only_kl.kl)
