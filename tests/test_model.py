import pytest
import torch

from toolkit.errors import UserError
from toolkit.loss import cvae_loss
from toolkit.model import (
    ARCH_OPTIONS,
    CVAE,
    ModelOutput,
    ModelSpec,
    arch_options,
    load_model,
    read_spec,
    save_model,
)


def make(height, width, attributes=40, latent=128):
    return CVAE(ModelSpec([f"a{i}" for i in range(attributes)], (height, width), latent))


@pytest.mark.parametrize("height, width", [(218, 178), (64, 64), (32, 32), (33, 21)])
def test_output_has_the_input_size(height, width):
    model = make(height, width, attributes=5, latent=8)
    images, attributes = torch.rand(2, 3, height, width), torch.randint(0, 2, (2, 5)).float()
    recon, mu, logvar, *_ = model(images, attributes)
    assert recon.shape == images.shape and mu.shape == logvar.shape == (2, 8)
    generated = model.generate(attributes, torch.randn(2, 8))
    assert generated.shape == (2, 3, height, width)
    assert generated.min() >= 0 and generated.max() <= 1


def test_paper_parameter_layout_celeba():
    shapes = {name: tuple(p.shape) for name, p in make(218, 178).named_parameters()}
    assert shapes == {
        "encoder.conv1.weight": (64, 3 + 40, 3, 3),
        "encoder.conv1.bias": (64,),
        "encoder.conv2.weight": (32, 64, 3, 3),
        "encoder.conv2.bias": (32,),
        "encoder.mu.weight": (128, 32 * 54 * 44),  # 218 -> 109 -> 54, 178 -> 89 -> 44
        "encoder.mu.bias": (128,),
        "encoder.logvar.weight": (128, 32 * 54 * 44),
        "encoder.logvar.bias": (128,),
        "decoder.fc.weight": (32 * 55 * 45, 128 + 40),  # ceil(218/4) x ceil(178/4), cropped after upsampling
        "decoder.fc.bias": (32 * 55 * 45,),
        "decoder.up1.weight": (32, 64, 2, 2),  # ConvTranspose2d(32 -> 64, k2, s2)
        "decoder.up1.bias": (64,),
        "decoder.up2.weight": (64, 3, 2, 2),  # ConvTranspose2d(64 -> 3, k2, s2)
        "decoder.up2.bias": (3,),
    }


def test_kaiming_init_and_zero_biases():
    torch.manual_seed(0)
    model = make(64, 64)
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(parameter) == 0, name
    fc = model.decoder.fc.weight  # fan_in = 168: std sqrt(2 / 168)
    assert abs(fc.std().item() / (2 / 168) ** 0.5 - 1) < 0.02
    conv1 = model.encoder.conv1.weight  # fan_in = 43 * 9
    assert abs(conv1.std().item() / (2 / (43 * 9)) ** 0.5 - 1) < 0.05


@pytest.mark.parametrize("height, width", [(32, 32), (21, 17), (7, 5)])
def test_condition_without_tiling_equals_literal_tiling(height, width):
    torch.manual_seed(1)
    model = make(height, width, attributes=12, latent=4).double()
    images = torch.rand(3, 3, height, width, dtype=torch.double)
    attributes = torch.randint(0, 2, (3, 12)).double()
    attributes[0] = 0.0  # no attribute at all
    tiled = attributes[:, :, None, None].expand(-1, -1, height, width)
    literal = model.encoder.conv1(torch.cat([images, tiled], dim=1))
    fast = model.encoder.first_conv(images, attributes)
    assert torch.allclose(fast, literal, atol=1e-12)
    # gradients reach the attribute weights identically
    grad_literal = torch.autograd.grad(literal.square().sum(), model.encoder.conv1.weight)[0]
    grad_fast = torch.autograd.grad(fast.square().sum(), model.encoder.conv1.weight)[0]
    assert torch.allclose(grad_fast, grad_literal, atol=1e-9)


def test_save_and_load_round_trip(tmp_path):
    model = make(32, 32, attributes=10, latent=16).eval()
    model.spec.extra = {"recipe": "digits", "step": 5}
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path)
    assert loaded.spec == model.spec
    attributes, noise = torch.eye(10), torch.randn(10, 16)
    assert torch.equal(loaded.generate(attributes, noise), model.generate(attributes, noise))


def test_run_folders_as_python_file_apis_take_them(tmp_path):
    import os

    model = make(32, 32, attributes=10, latent=16).eval()
    save_model(model, os.fsencode(tmp_path / "run"))  # bytes, as open() takes them
    assert load_model(os.fsencode(tmp_path / "run")).spec == model.spec
    for call, name in ((lambda: load_model(None), "load_model"), (lambda: save_model(model, 3), "save_model")):
        with pytest.raises(
            TypeError, match=rf"^{name}\(.*\): expected the run folder as a str, os.PathLike or bytes, got"
        ):
            call()


def test_too_small_images_are_refused():
    with pytest.raises(UserError, match="too small"):
        make(3, 32)


def test_load_model_errors(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_model(tmp_path)
    save_model(make(32, 32, attributes=10, latent=16), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(tmp_path)


# --- the resnet architecture and the learned prior ---------------------------------------------

TINY = {"width": 8, "levels": 2, "embed_dim": 16}


def make_spec(h, w, arch="resnet", prior="standard", attributes=5, latent=8, **options):
    return ModelSpec([f"a{i}" for i in range(attributes)], (h, w), latent, arch, prior=prior, options=options)


@pytest.mark.parametrize(
    "height, width, options",
    [(64, 64, {"width": 16}), (128, 128, {"width": 8}), (32, 32, {"width": 8, "levels": 3}), (64, 32, {"width": 8})],
)
def test_resnet_output_shapes(height, width, options):
    torch.manual_seed(0)
    model = CVAE(make_spec(height, width, **options))
    images, attributes = torch.rand(2, 3, height, width), torch.randint(0, 2, (2, 5)).float()
    out = model(images, attributes)
    assert isinstance(out, ModelOutput)
    assert out.recon.shape == images.shape and out.mu.shape == out.logvar.shape == (2, 8)
    assert out.prior_mu is None and out.prior_logvar is None
    generated = model.generate(attributes, torch.randn(2, 8))
    assert generated.shape == (2, 3, height, width)
    assert generated.min() >= 0 and generated.max() <= 1
    levels = model.spec.options["levels"]
    assert model.decoder.grid[1:] == (height >> levels, width >> levels)


def test_resnet_defaults_and_size_of_the_64x64_model():
    model = CVAE(ModelSpec([f"a{i}" for i in range(40)], (64, 64), 128, "resnet"))
    assert model.spec.options == {"width": 64, "levels": 4, "embed_dim": 128}  # completed: config.json rebuilds it
    assert model.decoder.grid == (128, 4, 4)
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 6e6  # a few M parameters


@pytest.mark.parametrize("height, width, levels", [(65, 64, 4), (64, 72, 4), (32, 32, 6)])
def test_resnet_refuses_sizes_not_divisible(height, width, levels):
    with pytest.raises(UserError) as caught:
        CVAE(make_spec(height, width, levels=levels))
    message = str(caught.value)
    assert f"{height}x{width}" in message and f"2**{levels} = {2**levels}" in message and "model.levels" in message


@pytest.mark.parametrize(
    "spec, words",
    [
        (make_spec(32, 32, arch="vit"), ["model.arch", "vit", "resnet"]),
        (make_spec(32, 32, prior="flow"), ["model.prior", "flow", "learned"]),
        (make_spec(32, 32, arch="paper", width=8), ["paper", "width"]),
        (make_spec(32, 32, depth=3), ["resnet", "depth", "levels"]),
        (make_spec(32, 32, width=0), ["width", "positive"]),
    ],
)
def test_bad_arch_prior_or_options(spec, words):
    with pytest.raises(UserError) as caught:
        CVAE(spec)
    for word in words:
        assert word in str(caught.value)


def test_arch_options_reads_a_model_config():
    import subprocess
    import sys

    from toolkit.config import ModelConfig

    # one home (toolkit.formats) for the choices, which reading a recipe or an export takes without torch
    probe = "import sys, toolkit.config, toolkit.contract, toolkit.formats; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
    config = ModelConfig(arch="resnet", width=32, levels=3, embed_dim=64)
    assert arch_options("resnet", config) == {"width": 32, "levels": 3, "embed_dim": 64}
    assert arch_options("paper", config) == {}
    assert arch_options("resnet", {}) == ARCH_OPTIONS["resnet"]
    for key, default in ARCH_OPTIONS["resnet"].items():
        assert getattr(ModelConfig(), key) == default


def test_resnet_residual_branches_start_at_zero_and_biases_are_zero():
    model = CVAE(make_spec(32, 32, **TINY))
    for name, parameter in model.named_parameters():
        if name.endswith("bias") and "norm" not in name:
            assert torch.count_nonzero(parameter) == 0, name
        if ".conv2." in name or ".film." in name:
            assert torch.count_nonzero(parameter) == 0, name
    stem = model.encoder.stem.weight  # Kaiming fan_in = 27
    assert abs(stem.std().item() / (2 / 27) ** 0.5 - 1) < 0.3


def test_resnet_decoder_depends_on_the_attributes_through_the_embedding():
    torch.manual_seed(0)
    model = CVAE(make_spec(32, 32, **TINY)).eval()
    z = torch.randn(1, 8).expand(2, -1)
    attributes = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 1.0, 1.0]])
    images = model.decoder(z, attributes)
    assert (images[0] - images[1]).abs().max() > 1e-4


@pytest.mark.parametrize("arch, options", [("paper", {}), ("resnet", TINY)])
def test_learned_prior_outputs_and_generate(arch, options):
    torch.manual_seed(0)
    model = CVAE(make_spec(32, 32, arch=arch, prior="learned", **options)).eval()
    with torch.no_grad():
        for parameter in model.prior_net.parameters():  # the untrained prior is N(0, I): make it not
            parameter.normal_(0, 0.5)
    images, attributes = torch.rand(2, 3, 32, 32), torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 1.0, 0, 0]])
    out = model(images, attributes)
    prior_mu, prior_logvar = model.prior(attributes)
    assert out.prior_mu.shape == out.prior_logvar.shape == (2, 8)
    assert torch.equal(out.prior_mu, prior_mu) and torch.equal(out.prior_logvar, prior_logvar)

    # generate samples z = mu_p + sigma_p * noise, so different conditions move z
    noise = torch.randn(1, 8).expand(2, -1)
    with torch.no_grad():
        expected = model.decoder(prior_mu + torch.exp(0.5 * prior_logvar) * noise, attributes)
        generated = model.generate(attributes, noise)
        assert torch.allclose(generated, expected)
        assert (prior_mu[0] - prior_mu[1]).abs().max() > 1e-3
        # the same decoder with z = noise (the standard prior) gives other images
        assert (generated - model.decoder(noise, attributes)).abs().max() > 1e-4

        for parameter in model.prior_net.parameters():
            parameter.zero_()
        assert torch.equal(model.generate(attributes, noise), model.decoder(noise, attributes))


def test_untrained_learned_prior_is_standard_normal():
    model = CVAE(make_spec(32, 32, prior="learned", **TINY))
    prior_mu, prior_logvar = model.prior(torch.rand(3, 5))
    assert torch.equal(prior_mu, torch.zeros(3, 8)) and torch.equal(prior_logvar, torch.zeros(3, 8))
    assert CVAE(make_spec(32, 32, **TINY)).prior(torch.rand(3, 5)) is None


@pytest.mark.parametrize("arch, options", [("paper", {}), ("resnet", TINY)])
@pytest.mark.parametrize("prior", ["standard", "learned"])
def test_save_and_load_round_trip_every_arch_and_prior(tmp_path, arch, prior, options):
    torch.manual_seed(0)
    model = CVAE(make_spec(32, 32, arch=arch, prior=prior, attributes=6, latent=4, **options)).eval()
    with torch.no_grad():  # nothing zero-initialised: every tensor has to survive the trip
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.spec.extra = {"recipe": "x"}
    save_model(model, tmp_path)
    assert read_spec(tmp_path) == model.spec
    loaded = load_model(tmp_path)
    assert loaded.spec == model.spec and loaded.spec.prior == prior
    images, attributes, noise = torch.rand(3, 3, 32, 32), torch.randint(0, 2, (3, 6)).float(), torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(loaded.generate(attributes, noise), model.generate(attributes, noise))
        assert all(
            torch.equal(a, b) for a, b in zip(loaded.encoder(images, attributes), model.encoder(images, attributes))
        )
        torch.manual_seed(1)
        first = model(images, attributes)
        torch.manual_seed(1)
        second = loaded(images, attributes)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


def test_old_config_without_prior_and_options_loads(tmp_path):
    import json

    model = make(32, 32, attributes=10, latent=16).eval()
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["prior"] == "standard" and config["options"] == {}
    del config["prior"], config["options"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path)
    assert loaded.spec.prior == "standard" and loaded.spec.options == {} and loaded.prior_net is None
    attributes, noise = torch.eye(10), torch.randn(10, 16)
    assert torch.equal(loaded.generate(attributes, noise), model.generate(attributes, noise))


def test_resnet_options_in_config_json_rebuild_the_model(tmp_path):
    model = CVAE(make_spec(32, 32, width=4, levels=3, embed_dim=8))
    save_model(model, tmp_path)
    import json

    assert json.loads((tmp_path / "config.json").read_text())["options"] == {"width": 4, "levels": 3, "embed_dim": 8}
    assert load_model(tmp_path).decoder.grid == (8, 4, 4)


def test_a_few_steps_lower_the_loss_resnet_learned_prior():
    torch.manual_seed(0)
    model = CVAE(make_spec(16, 16, prior="learned", attributes=4, latent=4, **TINY))
    images, attributes = torch.rand(8, 3, 16, 16), torch.randint(0, 2, (8, 4)).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss() -> torch.Tensor:
        out = model(images, attributes)
        return cvae_loss(out.recon, images, out.mu, out.logvar, 0.5, out.prior_mu, out.prior_logvar).total

    torch.manual_seed(1)
    with torch.no_grad():
        before = loss().item()
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    torch.manual_seed(1)
    with torch.no_grad():
        after = loss().item()
    assert after < 0.8 * before, (before, after)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prior_net.parameters())
