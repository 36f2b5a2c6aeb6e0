"""`cvae-tk`: the command line, one command per stage (shards -> train -> export -> sample).

Heavy libraries are imported inside the commands, so `cvae-tk sample` starts without torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from toolkit.errors import UserError, one_line

app = typer.Typer(
    help="Train attribute-conditioned image generators (Conditional VAEs) and ship them as ONNX samplers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show [brackets] literally
)
shards_app = typer.Typer(help="Build WebDataset shards (+ manifest.json per split) from a raw data set.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")


@shards_app.command("digits")
def shards_digits(
    out: Path = typer.Option(Path("shards/digits"), "--out", help="Folder to write train/ and test/ into."),
    size: int = typer.Option(32, "--size", min=8, max=512, help="Side of the square images (the source is 8x8)."),
    shard_size: int = typer.Option(10_000, "--shard-size", min=1, help="Samples per tar shard."),
) -> None:
    """The embedded demo set: scikit-learn's 1,797 handwritten digits, one-hot digit_0 ... digit_9."""
    from toolkit.data.digits import ATTRIBUTES, SPLITS, digit_samples
    from toolkit.data.shards import write_split

    for split in SPLITS:
        manifest = write_split(digit_samples(split, size), out, split, ATTRIBUTES, (size, size), "scikit-learn digits", shard_size)
        typer.echo(f"{split}: {manifest['count']} images in {len(manifest['shards'])} shard(s) -> {out / split}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train from a recipe: cvae-tk train recipe=digits [key=value ...] (same as toolkit/train.py).

    Common keys: run_dir, seed, max_steps, batch_size, lr, beta, mixed_precision (auto|no|fp16|bf16),
    data.shards, data.num_workers, model.arch, model.latent_dim. For several GPUs use
    `accelerate launch toolkit/train.py recipe=...`.
    """
    from toolkit.config import load_config
    from toolkit.train import train as run_training

    run_training(load_config(list(ctx.args)))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run folder written by `cvae-tk train`."),
    onnx: bool = typer.Option(True, "--onnx", help="Export to ONNX (the only format so far)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (default export/<run name>.onnx)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset."),
) -> None:
    """Export a run's conditional decoder as a self-contained ONNX sampler (parity-checked)."""
    from toolkit.export import PARITY_BATCHES, export_onnx

    if not onnx:
        raise UserError("only --onnx export exists")
    path, error = export_onnx(run_dir, out, opset)
    typer.echo(f"parity with PyTorch: max abs difference {error:.2e} at batch sizes {', '.join(map(str, PARITY_BATCHES))}")
    typer.echo(f"wrote {path}")


def _parse_attr(items: List[str]) -> dict:
    mapping = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or value.strip() not in ("0", "1"):
            raise UserError(f"--attr expects NAME=0 or NAME=1, got '{item}'")
        mapping[name.strip()] = int(value)
    return mapping


@app.command()
def sample(
    model: Path = typer.Argument(..., help="An ONNX file written by `cvae-tk export`."),
    attr: List[str] = typer.Option([], "--attr", help="NAME=0|1; repeat for several; unnamed attributes are 0."),
    each_attribute: bool = typer.Option(False, "--each-attribute", help="One row per attribute, that attribute alone set."),
    n: int = typer.Option(8, "-n", help="Images per condition."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Noise seed (same seed, same images)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Write one PNG grid, one row per condition."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Write one PNG per image."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
) -> None:
    """Generate images with chosen attributes through ONNX Runtime (no torch needed)."""
    import numpy as np
    from PIL import Image

    from toolkit.sampler import Sampler, image_grid

    if grid is None and out_dir is None:
        raise UserError("say where the images go: --grid out.png or --out-dir DIR")
    sampler = Sampler(model, device=device)
    if each_attribute:
        if attr:
            raise UserError("--each-attribute and --attr exclude each other")
        conditions = np.eye(len(sampler.attributes), dtype=np.float32)
    else:
        conditions = sampler.conditions(_parse_attr(attr))
    images = sampler.sample(conditions, n=n, seed=seed)
    if grid is not None:
        grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(images, columns=n)).save(grid)
        typer.echo(f"wrote {grid} ({len(conditions)} row(s) x {n}, {sampler.provider})")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            Image.fromarray(image).save(out_dir / f"{index:05d}.png")
        typer.echo(f"wrote {len(images)} images to {out_dir} ({sampler.provider})")


@app.command()
def recipes() -> None:
    """List the recipes and the keys a recipe or a key=value override can set."""
    from omegaconf import OmegaConf

    from toolkit.config import TrainConfig, available_recipes, find_recipe

    for name in available_recipes():
        typer.echo(f"{name}: {find_recipe(name)}")
    typer.echo("\nkeys (defaults):")
    typer.echo(OmegaConf.to_yaml(OmegaConf.structured(TrainConfig)))


def main() -> None:
    try:
        app()
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
