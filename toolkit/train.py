"""Train a CVAE from a recipe. Accelerate manages the device, precision and processes.

    accelerate launch toolkit/train.py recipe=digits max_steps=500
    python toolkit/train.py recipe=digits
    cvae-tk train recipe=digits run_dir=runs/try1

The run folder (default runs/<recipe>) ends up holding:
    model.safetensors, config.json   fp32 weights + everything needed to rebuild the model
    recipe.yaml                      the resolved config this run used
    samples.png                      samples from the prior, one row per condition (see grid_conditions)
    samples/step-<N>.png, logs/      grids during training, TensorBoard scalars and images
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python toolkit/train.py` puts toolkit/ first on sys.path, where its modules would shadow
    # libraries of the same names; put the project root there instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import math
import time

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

import toolkit
from toolkit.config import TrainConfig, load_config, to_yaml
from toolkit.data.stream import eval_batches, read_manifest, train_batches
from toolkit.errors import UserError, one_line
from toolkit.loss import cvae_loss
from toolkit.model import CVAE, ModelSpec, save_model

GRID_COLUMNS = 8
GRID_ROWS = 8  # test-set conditions shown when there are too many attributes for one row each
GRID_ROWS_ONE_HOT = 16


def grid_conditions(shards: str, num_attributes: int) -> torch.Tensor:
    """Rows of the sample grids: with few attributes (digits' classes) each one alone; with many
    (CelebA, CUB) the attribute vectors of the first test images, which are real combinations."""
    if num_attributes <= GRID_ROWS_ONE_HOT:
        return torch.eye(num_attributes)
    _, attributes = next(iter(eval_batches(shards, "test", batch_size=GRID_ROWS)))
    return attributes


@torch.no_grad()
def sample_grid(model: CVAE, attributes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One row per attribute vector, GRID_COLUMNS noise vectors per row -> a [3, H', W'] grid."""
    rows = attributes.repeat_interleave(GRID_COLUMNS, dim=0)
    images = model.generate(rows, noise).float().clamp(0, 1)
    return make_grid(images.cpu(), nrow=GRID_COLUMNS, padding=2, pad_value=1.0)


@torch.no_grad()
def heldout_metrics(model: CVAE, shards: str, device: torch.device) -> dict[str, float]:
    """Reconstruction MSE (summed per image, and per pixel) and KL per image on the test split, from the posterior mean."""
    mse_sum = kl_sum = count = 0.0
    pixels = 1
    for images, attributes in eval_batches(shards, "test"):
        images, attributes = images.to(device), attributes.to(device)
        mu, logvar = model.encoder(images, attributes)
        recon = model.decoder(mu, attributes)
        terms = cvae_loss(recon, images, mu, logvar, beta=0.5)
        mse_sum += terms.mse.item() * len(images)
        kl_sum += terms.kl.item() * len(images)
        count += len(images)
        pixels = images[0].numel()
    return {"test/mse_per_image": mse_sum / count, "test/mse_per_pixel": mse_sum / count / pixels, "test/kl_per_image": kl_sum / count}


def train(config: TrainConfig) -> Path:
    run_dir = Path(config.run_dir)
    accelerator = Accelerator(
        mixed_precision=None if config.mixed_precision == "auto" else config.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    set_seed(config.seed)
    manifest = read_manifest(config.data.shards, "train")
    if not manifest.get("image_size") or 0 in manifest["image_size"]:
        raise UserError(f"{config.data.shards}: the images have varied sizes; rebuild the shards with --size N or HxW")
    read_manifest(config.data.shards, "test")  # needed for grids and metrics: fail now, not after training
    spec = ModelSpec(
        attributes=manifest["attributes"],
        image_size=tuple(manifest["image_size"]),
        latent_dim=config.model.latent_dim,
        arch=config.model.arch,
    )
    model = CVAE(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Already rank- and worker-aware: not passed through accelerator.prepare (it would re-shard).
    batches = iter(
        train_batches(config.data.shards, config.batch_size, config.seed, config.data.num_workers, config.data.shuffle_buffer)
    )

    # Fixed conditions and noise for every grid, so grids are comparable across steps.
    grid_attributes = grid_conditions(config.data.shards, spec.num_attributes).to(accelerator.device)
    grid_noise = torch.randn(
        len(grid_attributes) * GRID_COLUMNS, spec.latent_dim, generator=torch.Generator().manual_seed(config.seed)
    ).to(accelerator.device)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(to_yaml(config))
        accelerator.init_trackers("cvae", config={"beta": config.beta, "lr": config.lr, "batch_size": config.batch_size})
        print(f"training {spec.arch} CVAE on {config.data.shards} ({manifest['count']} train images, "
              f"{spec.image_size[0]}x{spec.image_size[1]}, {spec.num_attributes} attributes) "
              f"on {accelerator.device}, precision {accelerator.mixed_precision}, {accelerator.num_processes} process(es)")

    def write_grid(step: int) -> None:
        grid = sample_grid(accelerator.unwrap_model(model), grid_attributes, grid_noise)
        (run_dir / "samples").mkdir(exist_ok=True)
        save_image(grid, run_dir / "samples" / f"step-{step:06d}.png")
        accelerator.get_tracker("tensorboard", unwrap=True).add_image("samples", grid, step)

    model.train()
    progress = tqdm(range(1, config.max_steps + 1), disable=not accelerator.is_main_process, desc="train", mininterval=2)
    window_start, window_images = time.perf_counter(), 0
    for step in progress:
        images, attributes = (t.to(accelerator.device, non_blocking=True) for t in next(batches))
        recon, mu, logvar = model(images, attributes)
        terms = cvae_loss(recon, images, mu, logvar, config.beta)
        if not math.isfinite(terms.total.item()):
            raise RuntimeError(f"loss is not finite at step {step} (mse={terms.mse.item()}, kl={terms.kl.item()}); try a lower lr")
        accelerator.backward(terms.total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_images += len(images) * accelerator.num_processes

        if step % config.log_every == 0 or step == config.max_steps:
            elapsed = time.perf_counter() - window_start
            logs = {
                "train/loss": terms.total.item(),
                "train/mse": terms.mse.item(),
                "train/kl": terms.kl.item(),
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/images_per_s": window_images / max(elapsed, 1e-9),
            }
            accelerator.log(logs, step=step)
            progress.set_postfix(loss=f"{logs['train/loss']:.1f}", mse=f"{logs['train/mse']:.1f}", kl=f"{logs['train/kl']:.1f}")
            window_start, window_images = time.perf_counter(), 0
        if accelerator.is_main_process and (step % config.sample_every == 0 or step == config.max_steps):
            model.eval()
            write_grid(step)
            model.train()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model).eval()
        metrics = heldout_metrics(final, config.data.shards, accelerator.device)
        accelerator.log(metrics, step=config.max_steps)
        final.spec.extra = {
            "recipe": config.recipe,
            "step": config.max_steps,
            "beta": config.beta,
            "toolkit_version": toolkit.__version__,
            **{k.replace("test/", "test_"): round(v, 4) for k, v in metrics.items()},
        }
        save_model(final, run_dir)
        save_image(sample_grid(final, grid_attributes, grid_noise), run_dir / "samples.png")
        print(
            f"test: MSE {metrics['test/mse_per_image']:.2f} per image ({metrics['test/mse_per_pixel']:.5f} per pixel), "
            f"KL {metrics['test/kl_per_image']:.2f} per image"
        )
        print(f"saved {run_dir / 'model.safetensors'} and {run_dir / 'config.json'}; samples: {run_dir / 'samples.png'}")
    accelerator.end_training()
    return run_dir


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        train(load_config(args))
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
