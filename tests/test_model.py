import pytest
import torch

from toolkit.errors import UserError
from toolkit.model import CVAE, ModelSpec, load_model, save_model


def make(height, width, attributes=40, latent=128):
    return CVAE(ModelSpec([f"a{i}" for i in range(attributes)], (height, width), latent))


@pytest.mark.parametrize("height, width", [(218, 178), (64, 64), (32, 32), (33, 21)])
def test_output_has_the_input_size(height, width):
    model = make(height, width, attributes=5, latent=8)
    images, attributes = torch.rand(2, 3, height, width), torch.randint(0, 2, (2, 5)).float()
    recon, mu, logvar = model(images, attributes)
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
