"""The Conditional VAE (PAPER.md's `paper` architecture) and how to save / rebuild it.

Shapes: images [B, 3, H, W] in [0, 1], attributes [B, A] (0/1 floats), latent z [B, Z].

Any H x W works. The encoder's two 2x2 max-pools floor the sides (218 -> 109 -> 54); the decoder
starts from ceil(H/4) x ceil(W/4), doubles twice and centre-crops to H x W, so every output pixel is
computed by the network (no constant padding rows) and the output always has the input's size.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.errors import UserError, one_line


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network; saved as the run's `config.json`."""

    attributes: list[str]
    image_size: tuple[int, int]  # (H, W)
    latent_dim: int = 128
    arch: str = "paper"
    extra: dict = field(default_factory=dict)  # provenance (recipe, step, beta...), not needed to rebuild

    @property
    def num_attributes(self) -> int:
        return len(self.attributes)


class PaperEncoder(nn.Module):
    """q(z | x, y): attributes tiled over the image, two 3x3 convs (64, 32) each ReLU + 2x2 max-pool,
    then linear heads for mu and log-variance."""

    def __init__(self, num_attributes: int, image_size: tuple[int, int], latent_dim: int):
        super().__init__()
        height, width = image_size
        self.conv1 = nn.Conv2d(3 + num_attributes, 64, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(64, 32, kernel_size=3, padding=1)
        flat = 32 * (height // 2 // 2) * (width // 2 // 2)
        self.mu = nn.Linear(flat, latent_dim)
        self.logvar = nn.Linear(flat, latent_dim)

    def forward(self, images: torch.Tensor, attributes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.first_conv(images, attributes)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.mu(x), self.logvar(x)

    def first_conv(self, images: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
        """conv1 over [images, attributes tiled to H x W], computed without tiling.

        The tiled channels are constant over the image, so their part of the convolution is, per
        sample and output channel, a 3x3 kernel V = sum_a x_a * W[:, 3 + a] applied to a map of ones
        (zero padding makes the borders differ from the interior). That is one one-channel
        convolution instead of A extra input channels: exact, and for CUB's 512 attributes about
        170 times cheaper than the literal tiling it replaces (a test checks they are equal).
        """
        batch, _, height, width = images.shape
        weight = self.conv1.weight
        x = F.conv2d(images, weight[:, :3], self.conv1.bias, padding=1)
        kernels = torch.einsum("ba,oaij->boij", attributes.to(weight.dtype), weight[:, 3:])
        ones = images.new_ones(1, 1, height, width)
        condition = F.conv2d(ones, kernels.reshape(-1, 1, *weight.shape[-2:]).to(images.dtype), padding=1)
        return x + condition.view(batch, -1, height, width)


class PaperDecoder(nn.Module):
    """p(y | x, z): [z, x] -> linear -> (32, H/4, W/4) -> ConvT(32->64, k2 s2) + ReLU -> ConvT(64->3, k2 s2) -> sigmoid."""

    def __init__(self, num_attributes: int, image_size: tuple[int, int], latent_dim: int):
        super().__init__()
        self.image_size = tuple(image_size)
        self.grid = (math.ceil(image_size[0] / 4), math.ceil(image_size[1] / 4))
        self.fc = nn.Linear(latent_dim + num_attributes, 32 * self.grid[0] * self.grid[1])
        self.up1 = nn.ConvTranspose2d(32, 64, kernel_size=2, stride=2)
        self.up2 = nn.ConvTranspose2d(64, 3, kernel_size=2, stride=2)

    def forward(self, z: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
        x = self.fc(torch.cat([z, attributes.to(z.dtype)], dim=1))
        x = x.view(-1, 32, *self.grid)
        x = F.relu(self.up1(x))
        x = torch.sigmoid(self.up2(x))
        height, width = self.image_size
        top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
        return x[..., top : top + height, left : left + width]


class CVAE(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.arch != "paper":
            raise UserError(f"unknown model.arch '{spec.arch}': expected paper")
        if min(spec.image_size) < 4:
            raise UserError(f"image size {tuple(spec.image_size)} is too small: the paper model pools twice, so both sides must be >= 4")
        self.spec = spec
        args = (spec.num_attributes, tuple(spec.image_size), spec.latent_dim)
        self.encoder = PaperEncoder(*args)
        self.decoder = PaperDecoder(*args)
        init_weights(self)

    def forward(self, images: torch.Tensor, attributes: torch.Tensor):
        """Returns (reconstruction, mu, logvar) with z drawn from q(z | x, y) by reparameterisation."""
        mu, logvar = self.encoder(images, attributes)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decoder(z, attributes), mu, logvar

    def generate(self, attributes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample from the prior N(0, I): the graph that export ships."""
        return self.decoder(noise, attributes)


def init_weights(module: nn.Module) -> None:
    """Kaiming normal (fan_in, relu) weights and zero biases, as in the paper."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(layer.bias)


# --- saving and loading: safetensors + config.json, never pickle ---------------------------------

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_model(model: CVAE, folder: str | Path) -> None:
    """Write fp32 weights and config.json into `folder`, each through a temporary name."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / WEIGHTS)
    spec = asdict(model.spec)
    spec["image_size"] = list(spec["image_size"])
    tmp = folder / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    tmp.replace(folder / CONFIG)


def read_spec(folder: str | Path) -> ModelSpec:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise UserError(f"{folder} is not a trained run: expected {path} (written by `cvae-tk train`)")
    try:
        raw = json.loads(path.read_text())
        return ModelSpec(
            attributes=list(raw["attributes"]),
            image_size=tuple(raw["image_size"]),
            latent_dim=int(raw["latent_dim"]),
            arch=raw.get("arch", "paper"),
            extra=raw.get("extra", {}),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a cvae-tk model config: {error}") from None


def load_model(folder: str | Path) -> CVAE:
    """Rebuild a model from a run folder (config.json + model.safetensors), on the CPU, in eval mode."""
    from safetensors.torch import load_file

    spec = read_spec(folder)
    weights = Path(folder) / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{folder} has no trained weights: expected {weights} (written by `cvae-tk train`)")
    model = CVAE(spec)
    try:
        state = load_file(str(weights))
    except Exception as error:
        raise UserError(f"{weights} is not a readable safetensors file: {one_line(error)}") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        wrong = sorted(set(expected) ^ set(found)) or [n for n in expected if expected[n] != found[n]]
        name = wrong[0]
        raise UserError(
            f"{weights} does not match {Path(folder) / CONFIG}: {len(wrong)} tensor(s) differ, first {name} "
            f"(config expects {expected.get(name, 'nothing')}, file has {found.get(name, 'nothing')})"
        )
    model.load_state_dict(state)
    return model.eval()
