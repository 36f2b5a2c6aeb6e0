import math

import pytest
import torch

from toolkit.loss import cvae_loss, kl_gaussians, kl_standard_normal


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


def test_kl_gaussians_against_the_standard_normal_is_kl_standard_normal():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 7), torch.randn(4, 7)
    zeros = torch.zeros(4, 7)
    assert torch.allclose(kl_gaussians(mu, logvar, zeros, zeros), kl_standard_normal(mu, logvar), atol=1e-6)
    assert kl_gaussians(mu, logvar, zeros, zeros).shape == (4,)  # per image, summed over latent units


def test_kl_gaussians_equals_hand_computation():
    # one image, two units. KL per unit = 1/2 (lv_p - lv_q + (e^lv_q + (mu_q - mu_p)^2) / e^lv_p - 1)
    mu_q, logvar_q = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    mu_p, logvar_p = torch.tensor([[0.0, 3.0]]), torch.tensor([[math.log(4.0), 0.0]])
    unit1 = 0.5 * (math.log(4.0) - 0 + (1 + 1) / 4 - 1)  # ln2 - 1/4
    unit2 = 0.5 * (0 - math.log(2.0) + (2 + 9) / 1 - 1)  # 5 - ln2/2
    got = kl_gaussians(mu_q, logvar_q, mu_p, logvar_p)
    assert torch.allclose(got, torch.tensor([unit1 + unit2]), atol=1e-6)
    assert torch.equal(kl_gaussians(mu_p, logvar_p, mu_p, logvar_p), torch.zeros(1))


def test_kl_gaussians_equals_torch_distributions():
    from torch.distributions import Independent, Normal, kl_divergence

    torch.manual_seed(0)
    mu_q, logvar_q, mu_p, logvar_p = (torch.randn(5, 9, dtype=torch.double) for _ in range(4))
    q = Independent(Normal(mu_q, torch.exp(0.5 * logvar_q)), 1)
    p = Independent(Normal(mu_p, torch.exp(0.5 * logvar_p)), 1)
    assert torch.allclose(kl_gaussians(mu_q, logvar_q, mu_p, logvar_p), kl_divergence(q, p), atol=1e-10)


def test_cvae_loss_with_a_learned_prior():
    torch.manual_seed(0)
    recon, target = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    mu, logvar, prior_mu, prior_logvar = (torch.randn(4, 6) for _ in range(4))
    terms = cvae_loss(recon, target, mu, logvar, 0.25, prior_mu, prior_logvar)
    assert torch.allclose(terms.kl, kl_gaussians(mu, logvar, prior_mu, prior_logvar).mean())
    assert torch.allclose(terms.total, 0.75 * terms.mse + 0.25 * terms.kl)
    standard = cvae_loss(recon, target, mu, logvar, 0.25)
    assert torch.equal(standard.mse, terms.mse) and not torch.allclose(standard.kl, terms.kl)
    zeros = torch.zeros(4, 6)
    assert torch.allclose(cvae_loss(recon, target, mu, logvar, 0.25, zeros, zeros).kl, standard.kl)
    with pytest.raises(ValueError, match="both"):
        cvae_loss(recon, target, mu, logvar, 0.25, prior_mu, None)


def test_hybrid_loss_adds_the_prior_samples_error_with_its_weight():
    recon = torch.tensor([[[[0.0, 1.0]]], [[[0.5, 0.5]]]])
    target = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]]])
    prior_recon = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])  # errors 1 and 2 -> batch mean 1.5
    mu, logvar = torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.zeros(2, 2)
    paper = cvae_loss(recon, target, mu, logvar, beta=0.25)
    hybrid = cvae_loss(recon, target, mu, logvar, beta=0.25, prior_recon=prior_recon, gsnn_weight=0.4)
    assert paper.mse_prior is None and math.isclose(hybrid.mse_prior.item(), 1.5, rel_tol=1e-6)
    assert math.isclose(hybrid.total.item(), 0.6 * paper.total.item() + 0.4 * 0.75 * 1.5, rel_tol=1e-6)
    assert torch.equal(hybrid.mse, paper.mse) and torch.equal(hybrid.kl, paper.kl)
    # weight 0 is the paper's loss exactly, whatever prior_recon holds
    assert torch.equal(cvae_loss(recon, target, mu, logvar, 0.25, prior_recon=prior_recon).total, paper.total)
    with pytest.raises(ValueError, match="prior_recon"):
        cvae_loss(recon, target, mu, logvar, beta=0.25, gsnn_weight=0.5)


@pytest.mark.parametrize("prior", ["standard", "learned"])
def test_forward_decodes_a_prior_sample_when_asked(prior):
    from toolkit.model import CVAE, ModelSpec

    torch.manual_seed(0)
    model = CVAE(ModelSpec(["a", "b", "c"], (8, 8), 4, prior=prior))
    if prior == "learned":  # move the prior off N(0, I) so that the test tells them apart
        with torch.no_grad():
            model.prior_net.net[-1].bias.normal_()
    images, attributes = torch.rand(5, 3, 8, 8), torch.tensor([[1.0, 0, 1]] * 5)
    assert model(images, attributes).prior_recon is None
    torch.manual_seed(1)
    out = model(images, attributes, prior_sample=True)
    torch.manual_seed(1)
    mu, _ = model.encoder(images, attributes)
    torch.randn_like(mu)  # the posterior's eps is drawn first
    noise = torch.randn_like(mu)
    assert out.prior_recon.shape == (5, 3, 8, 8)
    assert torch.allclose(out.prior_recon, model.generate(attributes, noise), atol=1e-6)


def test_the_prior_samples_error_trains_the_decoder_and_the_learned_prior_not_the_encoder():
    from toolkit.model import CVAE, ModelSpec

    torch.manual_seed(0)
    model = CVAE(ModelSpec(["a", "b", "c"], (8, 8), 4, prior="learned"))
    with torch.no_grad():  # a prior off N(0, I), as after some training (its last layer starts at zero)
        model.prior_net.net[-1].weight.normal_(std=0.1)
    out = model(torch.rand(5, 3, 8, 8), torch.tensor([[1.0, 0, 1]] * 5), prior_sample=True)
    terms = cvae_loss(
        out.recon,
        torch.rand(5, 3, 8, 8),
        out.mu,
        out.logvar,
        0.5,
        out.prior_mu,
        out.prior_logvar,
        out.prior_recon,
        0.5,
    )
    decoder, prior, encoder = (list(m.parameters()) for m in (model.decoder, model.prior_net, model.encoder))
    grads = torch.autograd.grad(terms.mse_prior, decoder + prior + encoder, allow_unused=True)
    norm = lambda gs: sum(float(g.abs().sum()) for g in gs if g is not None)  # noqa: E731
    assert norm(grads[: len(decoder)]) > 0 and norm(grads[len(decoder) : len(decoder) + len(prior)]) > 0
    assert norm(grads[len(decoder) + len(prior) :]) == 0  # z came from the prior, not the encoder
