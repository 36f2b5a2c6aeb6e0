"""The Conditional VAE and how to save / rebuild it.

Shapes: images [B, 3, H, W] in [0, 1], attributes [B, A] (0/1 floats), latent z [B, Z].

Two architectures (`ModelSpec.arch`):
- `paper`: the paper's network exactly (docs/method.md). Any H x W works. The encoder's two 2x2 max-pools floor the
  sides (218 -> 109 -> 54); the decoder starts from ceil(H/4) x ceil(W/4), doubles twice and
  centre-crops to H x W, so every output pixel is computed by the network (no constant padding
  rows) and the output always has the input's size.
- `resnet`: a deeper family for 64x64, 128x128 (any H, W divisible by 2**levels). Residual blocks
  (GroupNorm + SiLU, two 3x3 convs, identity / 1x1 skip), stride-2 conv downsampling, nearest
  upsampling + conv, channels width * (1, 2, 2, 2, ...) per level. The condition enters through a
  learned attribute embedding (Linear(A -> E) + SiLU) that scales and shifts (FiLM) every block.

Two priors (`ModelSpec.prior`): `standard` N(0, I) (the paper's code) or `learned`, Sohn et al.'s
conditional prior p(z | x) = N(mu_p(x), diag exp(logvar_p(x))) from a small MLP on the attributes.
`generate` samples from the model's prior, so an exported sampler always takes standard normal noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import toolkit
from toolkit.atomic import atomic_paths, write_state_dict
from toolkit.errors import UserError, one_line
from toolkit.formats import ARCH_OPTIONS, ARCHS, CONFIG, PRIORS, RECIPE, WEIGHTS, check_choice  # noqa: F401 (ARCH_OPTIONS, PRIORS, ...: re-exported)
from toolkit.memory import check_fits
from toolkit.paths import as_path
from toolkit.safe_load import read_safetensors, safetensors_shapes


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network; saved as the run's `config.json`."""

    attributes: list[str]
    image_size: tuple[int, int]  # (H, W)
    latent_dim: int = 128
    arch: str = "paper"  # one of ARCH_OPTIONS
    prior: str = "standard"  # one of PRIORS
    options: dict = field(default_factory=dict)  # the arch's hyper-parameters (resnet: width, levels, embed_dim)
    extra: dict = field(default_factory=dict)  # provenance (recipe, step, beta...), not needed to rebuild

    @property
    def num_attributes(self) -> int:
        return len(self.attributes)


PRIOR_HIDDEN = 256  # the learned prior's MLP: Linear(A, 256) - SiLU - Linear(256, 2Z)


def arch_options(arch: str, values: Mapping | object = ()) -> dict[str, int]:
    """The hyper-parameters `arch` takes, read from `values` (a mapping, or an object such as a
    ModelConfig, whose attributes of those names are used) or else their defaults.

        arch_options("resnet", config.model)  -> {"width": 64, "levels": 4, "embed_dim": 128}
        arch_options("paper", config.model)   -> {}
    """
    check_choice(arch, ARCHS, "model.arch")
    get = values.get if isinstance(values, Mapping) else lambda key, default: getattr(values, key, default)
    return {key: get(key, default) for key, default in ARCH_OPTIONS[arch].items()}


def _check_options(arch: str, options: Mapping) -> dict[str, int]:
    """`options` completed with the arch's defaults; an unknown key or a non-positive value is a UserError."""
    check_choice(arch, ARCHS, "model.arch")
    unknown = sorted(set(options) - set(ARCH_OPTIONS[arch]))
    if unknown:
        takes = ", ".join(ARCH_OPTIONS[arch]) or "none"
        raise UserError(f"model.arch={arch} does not take the option(s) {', '.join(unknown)} (it takes: {takes})")
    resolved = arch_options(arch, options)
    for key, value in resolved.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(
                f"bad value for model option '{key}' of model.arch={arch}: expected a positive integer, got {value!r}"
            )
    return resolved


class ModelOutput(NamedTuple):
    """What `CVAE.forward` returns; `recon, mu, logvar, *_ = model(images, attributes)` unpacks it."""

    recon: torch.Tensor  # [B, 3, H, W] in [0, 1], decoded from z ~ q(z | x, y)
    mu: torch.Tensor  # [B, Z] posterior q(z | x, y)
    logvar: torch.Tensor  # [B, Z]
    prior_mu: torch.Tensor | None  # [B, Z] learned prior p(z | x); None for N(0, I)
    prior_logvar: torch.Tensor | None
    prior_recon: torch.Tensor | None = None  # [B, 3, H, W] decoded from z ~ p(z | x), when asked for


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


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, FiLM from the condition embedding (x * (1 + scale) + shift after the
    second GroupNorm), SiLU-conv3x3, plus the input (identity, or a 1x1 conv when channels change)."""

    def __init__(self, channels_in: int, channels_out: int, embed_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels_in), channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1)
        self.film = nn.Linear(embed_dim, 2 * channels_out)
        self.norm2 = nn.GroupNorm(_groups(channels_out), channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, kernel_size=3, padding=1)
        self.skip = (
            nn.Conv2d(channels_in, channels_out, kernel_size=1) if channels_in != channels_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(embedding)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))

    def zero_init(self) -> None:
        """The residual branch starts at zero (the block is its skip) and unconditioned."""
        for layer in (self.conv2, self.film):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


MAX_WIDTH_FACTOR = 2  # channels double per level up to this times `width` (as DDPM's (1, 2, 2, 2))


def resnet_channels(width: int, levels: int) -> list[int]:
    """Channels per level, shallowest first: width doubling per level up to MAX_WIDTH_FACTOR * width
    (width 64, 4 levels: 64, 128, 128, 128)."""
    return [width * min(2**level, MAX_WIDTH_FACTOR) for level in range(levels)]


def _embedding(num_attributes: int, embed_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(num_attributes, embed_dim), nn.SiLU())


class ResNetEncoder(nn.Module):
    """q(z | x, y): conv3x3 stem, then per level a ResBlock and a stride-2 conv3x3, then GroupNorm-SiLU
    and linear heads for mu and log-variance from the (C, H / 2**levels, W / 2**levels) features."""

    def __init__(
        self,
        num_attributes: int,
        image_size: tuple[int, int],
        latent_dim: int,
        width: int,
        levels: int,
        embed_dim: int,
    ):
        super().__init__()
        channels = resnet_channels(width, levels)
        self.embed = _embedding(num_attributes, embed_dim)
        self.stem = nn.Conv2d(3, channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        self.down = nn.ModuleList()
        previous = channels[0]
        for c in channels:
            self.blocks.append(ResBlock(previous, c, embed_dim))
            self.down.append(nn.Conv2d(c, c, kernel_size=3, stride=2, padding=1))
            previous = c
        self.norm = nn.GroupNorm(_groups(previous), previous)
        flat = previous * (image_size[0] >> levels) * (image_size[1] >> levels)
        self.mu = nn.Linear(flat, latent_dim)
        self.logvar = nn.Linear(flat, latent_dim)

    def forward(self, images: torch.Tensor, attributes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(attributes.to(images.dtype))
        x = self.stem(images)
        for block, down in zip(self.blocks, self.down):
            x = down(block(x, embedding))
        x = F.silu(self.norm(x)).flatten(1)
        return self.mu(x), self.logvar(x)


class ResNetDecoder(nn.Module):
    """p(y | x, z): [z, embedding] -> linear -> (C, H / 2**levels, W / 2**levels), then per level
    (deepest first) nearest 2x upsampling + conv3x3 and a ResBlock, then GroupNorm-SiLU-conv3x3 -> sigmoid."""

    def __init__(
        self,
        num_attributes: int,
        image_size: tuple[int, int],
        latent_dim: int,
        width: int,
        levels: int,
        embed_dim: int,
    ):
        super().__init__()
        channels = resnet_channels(width, levels)[::-1]
        self.grid = (channels[0], image_size[0] >> levels, image_size[1] >> levels)
        self.embed = _embedding(num_attributes, embed_dim)
        self.fc = nn.Linear(latent_dim + embed_dim, math.prod(self.grid))
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        previous = channels[0]
        for c in channels:
            self.up.append(nn.Conv2d(previous, c, kernel_size=3, padding=1))
            self.blocks.append(ResBlock(c, c, embed_dim))
            previous = c
        self.norm = nn.GroupNorm(_groups(previous), previous)
        self.out = nn.Conv2d(previous, 3, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
        embedding = self.embed(attributes.to(z.dtype))
        x = self.fc(torch.cat([z, embedding], dim=1)).view(-1, *self.grid)
        for up, block in zip(self.up, self.blocks):
            x = block(up(F.interpolate(x, scale_factor=2.0, mode="nearest")), embedding)
        return torch.sigmoid(self.out(F.silu(self.norm(x))))


class LearnedPrior(nn.Module):
    """Sohn et al.'s conditional prior p(z | x): Linear(A, 256) - SiLU - Linear(256, 2Z) -> (mu_p, logvar_p).
    Its last layer starts at zero, so an untrained prior is N(0, I)."""

    def __init__(self, num_attributes: int, latent_dim: int, hidden: int = PRIOR_HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_attributes, hidden), nn.SiLU(), nn.Linear(hidden, 2 * latent_dim))

    def forward(self, attributes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(attributes.to(self.net[0].weight.dtype)).chunk(2, dim=1)
        return mu, logvar

    def zero_init(self) -> None:
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)


class CVAE(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        check_choice(spec.arch, ARCHS, "model.arch")
        check_choice(spec.prior, PRIORS, "model.prior")
        options = _check_options(spec.arch, spec.options or {})
        size = tuple(spec.image_size)
        # the model's own copy, options completed: what config.json records
        self.spec = spec = replace(spec, image_size=size, options=options)
        args = (spec.num_attributes, size, spec.latent_dim)
        if spec.arch == "paper":
            if min(size) < 4:
                raise UserError(
                    f"image size {size} is too small: the paper model pools twice, so both sides must be >= 4"
                )
            self.encoder = PaperEncoder(*args)
            self.decoder = PaperDecoder(*args)
        else:
            levels = options["levels"]
            # levels beyond the sides' bits suit no image (and 2**levels of a huge value would take for ever)
            deep = levels >= min(size).bit_length()
            if deep or size[0] % 2**levels or size[1] % 2**levels:
                raise UserError(
                    f"image size {size[0]}x{size[1]} does not suit model.arch=resnet with model.levels={levels}: "
                    f"both sides must be multiples of 2**{levels}{f' = {2**levels}' if levels <= 64 else ''} (e.g. 64x64 with levels 4, "
                    f"128x128 with levels 4 or 5); rebuild the shards with such a --size or change model.levels"
                )
            self.encoder = ResNetEncoder(*args, **options)
            self.decoder = ResNetDecoder(*args, **options)
        self.prior_net = LearnedPrior(spec.num_attributes, spec.latent_dim) if spec.prior == "learned" else None
        init_weights(self)
        for module in self.modules():
            if isinstance(module, (ResBlock, LearnedPrior)):
                module.zero_init()

    def forward(self, images: torch.Tensor, attributes: torch.Tensor, prior_sample: bool = False) -> ModelOutput:
        """ModelOutput(recon, mu, logvar, prior_mu, prior_logvar, prior_recon), with z drawn from
        q(z | x, y) by reparameterisation; prior_* are the learned prior's (None for N(0, I)).
        prior_sample=True also decodes one z drawn from the prior (the hybrid loss's GSNN term), in
        the same forward so that DDP sees every parameter's gradient come from one call."""
        mu, logvar = self.encoder(images, attributes)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        prior_mu, prior_logvar = self.prior(attributes) or (None, None)
        prior_recon = self.generate(attributes, torch.randn_like(mu)) if prior_sample else None
        return ModelOutput(self.decoder(z, attributes), mu, logvar, prior_mu, prior_logvar, prior_recon)

    def prior(self, attributes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mu_p, logvar_p) of the learned prior p(z | x), or None when the prior is N(0, I)."""
        return None if self.prior_net is None else self.prior_net(attributes)

    def generate(
        self, attributes: torch.Tensor, noise: torch.Tensor, temperature: torch.Tensor | float = 1.0
    ) -> torch.Tensor:
        """Decode z drawn from the prior, given standard normal `noise`: z = noise * t for N(0, I),
        z = mu_p + exp(0.5 * logvar_p) * noise * t for the learned prior. The graph that export ships.

        The temperature t scales the prior's standard deviation (t = 0: the prior's mean); a tensor
        broadcasts against `noise` ([1] or [B, 1]). The default 1.0 adds no operation at all.
        """
        if isinstance(temperature, torch.Tensor) or temperature != 1.0:
            noise = noise * temperature
        prior = self.prior(attributes)
        if prior is not None:
            prior_mu, prior_logvar = prior
            noise = prior_mu + torch.exp(0.5 * prior_logvar) * noise
        return self.decoder(noise, attributes)


def init_weights(module: nn.Module) -> None:
    """Kaiming normal (fan_in, relu) weights and zero biases, as in the paper."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(layer.bias)


# --- saving and loading: safetensors + config.json, never pickle ---------------------------------


def save_model(model: CVAE, folder: str | Path) -> None:
    """Write fp32 weights and config.json into `folder` as one set: both through temporary names,
    renamed only once both are written (weights last), so a failure leaves the folder as it was."""
    folder = as_path(folder, "save_model(model, folder): expected the run folder")
    folder.mkdir(parents=True, exist_ok=True)
    spec = asdict(model.spec)
    spec["image_size"] = list(spec["image_size"])
    with atomic_paths(folder / WEIGHTS, folder / CONFIG) as (weights, config):
        write_state_dict(model, weights)
        config.write_text(json.dumps(spec, indent=2) + "\n")


def _no_final_model(folder: Path, missing: Path) -> UserError:
    """The error for a run folder without its final model, saying how to get one from a checkpoint;
    for a path that is no run folder at all, what it is."""
    if not folder.exists():
        return UserError(f"{folder} is not a trained run: it does not exist")
    if not folder.is_dir():
        return UserError(
            f"{folder} is not a trained run: it is a file (expected the run folder `cvae-tk train` wrote)"
        )
    if (folder / "trainer_state.json").is_file():
        return UserError(
            f"{folder} is not a trained run but one of its checkpoints: give the run, {folder.parent.parent}, "
            "whose final model is written when the training finishes"
        )
    checkpoints = sorted(folder.glob("checkpoints/checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        return UserError(
            f"{folder} is not a trained run: expected {missing} (written by `cvae-tk train` when it finishes)"
        )
    newest = checkpoints[-1].parent
    step = newest.name.rsplit("-", 1)[-1]
    recipe = folder / RECIPE
    how = (
        f"`cvae-tk train recipe={recipe} run_dir={folder} resume=latest max_steps={step}` writes it from there"
        if recipe.is_file()
        else "finish the training with resume=latest, which writes it"
    )
    return UserError(
        f"{folder} has no final model ({missing.name} is missing: the training did not finish); "
        f"its newest checkpoint is {newest}: {how}"
    )


def _config_error(path: Path, expected: str, found) -> UserError:
    shown = repr(found)
    return UserError(f"{path}: {expected}, got {shown[:80] + '...' if len(shown) > 80 else shown}")


def read_spec(folder: str | Path) -> ModelSpec:
    """config.json as a ModelSpec; anything else than what save_model writes is one UserError naming the file."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise _no_final_model(folder, path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a cvae-tk model config: not valid JSON ({one_line(error)})") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or one_line(error)}") from None
    if not isinstance(raw, dict):
        raise _config_error(
            path, "expected a JSON object with attributes, image_size and latent_dim (a cvae-tk model config)", raw
        )
    missing = [key for key in ("attributes", "image_size", "latent_dim") if key not in raw]
    if missing:
        raise UserError(f"{path} is not a cvae-tk model config: it has no {', '.join(missing)}")
    # every key but `extra` rebuilds the model: one this toolkit does not know (a newer one wrote it)
    # would be ignored, and the model built without it; provenance goes into `extra`
    unknown = sorted(set(raw) - {item.name for item in fields(ModelSpec)})
    if unknown:
        version = raw.get("extra", {}).get("toolkit_version", "?") if isinstance(raw.get("extra"), dict) else "?"
        raise UserError(
            f"{path} has keys this cvae-tk ({toolkit.__version__}) does not know: {', '.join(map(repr, unknown[:5]))}; "
            f"it was written by cvae-tk {version}: use that version, or upgrade cvae-tk"
        )
    attributes, size, latent = raw["attributes"], raw["image_size"], raw["latent_dim"]
    if (
        not isinstance(attributes, list)
        or not attributes
        or not all(isinstance(a, str) and a.strip() for a in attributes)
    ):
        raise _config_error(path, "'attributes' must be a non-empty list of names", attributes)
    repeated = sorted({name for name in attributes if attributes.count(name) > 1})
    if repeated:
        raise UserError(
            f"{path}: 'attributes' must be distinct names, but {', '.join(map(repr, repeated[:5]))} appear(s) more than once"
        )
    if not isinstance(size, list) or len(size) != 2 or not all(type(side) is int and side >= 1 for side in size):
        raise _config_error(path, "'image_size' must be [height, width], two positive integers", size)
    if type(latent) is not int or latent < 1:
        raise _config_error(path, "'latent_dim' must be a positive integer", latent)
    for key, kind, default in (
        ("arch", str, "paper"),
        ("prior", str, "standard"),
        ("options", dict, {}),
        ("extra", dict, {}),
    ):
        if not isinstance(raw.get(key, default), kind):
            raise _config_error(path, f"'{key}' must be a {'string' if kind is str else 'JSON object'}", raw[key])
    return ModelSpec(
        attributes=list(attributes),
        image_size=tuple(size),
        latent_dim=latent,
        arch=raw.get("arch", "paper"),
        prior=raw.get("prior", "standard"),  # absent before the learned prior existed
        options=dict(raw.get("options", {})),
        extra=raw.get("extra", {}),
    )


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]] | None:
    """The model's tensor names and shapes, found without allocating them (on torch's meta device);
    None when a size is beyond what a tensor can hold."""
    try:
        with torch.device("meta"):
            return {name: tuple(t.shape) for name, t in CVAE(spec).state_dict().items()}
    except RuntimeError as error:  # "Storage size calculation overflowed"
        if "overflow" not in str(error):
            raise
        return None


def check_model_fits(spec: ModelSpec, where, shapes: dict | None = None) -> None:
    """Refuse a spec whose weights (twice: the file's tensors and the model's) exceed the memory available."""
    shapes = expected_shapes(spec) if shapes is None else shapes
    count = 2**63 if shapes is None else sum(math.prod(shape) for shape in shapes.values())
    check_fits(
        2 * 4 * count,
        f"the model of {where} ({count:.3g} parameters: image_size {list(spec.image_size)}, "
        f"latent_dim {spec.latent_dim}, {spec.num_attributes} attributes)",
        "is that config.json what training wrote?",
    )


def load_model(folder: str | Path) -> CVAE:
    """Rebuild a model from a run folder (config.json + model.safetensors), on the CPU, in eval mode.
    The file's tensor names and shapes are checked from its header against the config before
    anything is allocated; then the memory the model needs; then every tensor's values."""
    folder = as_path(folder, "load_model(folder): expected the run folder")
    spec = read_spec(folder)
    weights = Path(folder) / WEIGHTS
    if not weights.is_file():
        raise _no_final_model(Path(folder), weights)
    try:
        expected = expected_shapes(spec)
    except UserError as error:  # an arch, prior, option or size the model cannot be built with
        raise UserError(f"{Path(folder) / CONFIG}: {error}") from None
    try:
        found = safetensors_shapes(weights)
    except Exception as error:
        raise UserError(f"{weights} is not a readable safetensors file: {one_line(error)}") from None
    if expected is not None and found != expected:
        wrong = sorted(set(expected) ^ set(found)) or [n for n in expected if expected[n] != found[n]]
        name = wrong[0]
        raise UserError(
            f"{weights} does not match {Path(folder) / CONFIG}: {len(wrong)} tensor(s) differ, first {name} "
            f"(config expects {expected.get(name, 'nothing')}, file has {found.get(name, 'nothing')})"
        )
    check_model_fits(spec, Path(folder) / CONFIG, expected)
    model = CVAE(spec)
    try:
        state = read_safetensors(weights)
    except Exception as error:
        raise UserError(f"{weights} is not a readable safetensors file: {one_line(error)}") from None
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise UserError(f"{weights}: tensor {name} is {tensor.dtype}, expected floating-point weights")
        if not torch.isfinite(tensor).all():
            raise UserError(
                f"{weights}: tensor {name} holds NaN or infinite values; a model with them generates no images"
            )
    model.load_state_dict(state)
    return model.eval()
