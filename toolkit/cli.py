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


# Options shared by the image data sets (typer allows reusing these markers).
SIZE = typer.Option("64", "--size", help="N (N x N), HxW (e.g. 218x178) or original (keep the JPEG bytes).")
CROP = typer.Option(None, "--crop", help="center:N - a centred N x N square before resizing (CelebA faces: center:148).")
WORKERS = typer.Option(0, "--workers", min=0, help="Worker processes (0: every core).")
SHARD_SIZE = typer.Option(10_000, "--shard-size", min=1, help="Samples per tar shard.")
STRICT = typer.Option(False, "--strict", help="Fail on a corrupt image instead of skipping and listing it.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace shards that another build left in --out.")


def _build(table, out: Path, size: str, crop: Optional[str], workers: int, shard_size: int, strict: bool, overwrite: bool) -> None:
    from toolkit.data.build import ImageSpec, build_shards

    spec = ImageSpec.parse(size, crop)
    for split, manifest in build_shards(table, out, spec, workers, shard_size, strict, overwrite).items():
        skipped = manifest.get("skipped", {}).get("count", 0)
        note = f", {skipped} skipped (listed in the manifest)" if skipped else ""
        typer.echo(f"{split}: {manifest['count']} images in {len(manifest['shards'])} shard(s) -> {out / split}{note}")


@shards_app.command("celeba")
def shards_celeba(
    root: Path = typer.Option(..., "--root", help="The CelebA folder: img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt."),
    out: Path = typer.Option(Path("shards/celeba"), "--out"),
    size: str = typer.Option("original", "--size", help="original (the paper: 218x178 JPEGs untouched), N (N x N) or HxW."),
    crop: Optional[str] = CROP, workers: int = WORKERS, shard_size: int = SHARD_SIZE,
    strict: bool = STRICT, overwrite: bool = OVERWRITE,
) -> None:
    """CelebA: 40 attributes (-1/1 -> 0/1), the official train / val / test partition."""
    from toolkit.data.celeba import read_celeba

    _build(read_celeba(root), out, size, crop, workers, shard_size, strict, overwrite)


@shards_app.command("cub")
def shards_cub(
    root: Path = typer.Option(..., "--root", help="The archive root (attributes.txt beside CUB_200_2011/) or CUB_200_2011/ itself."),
    out: Path = typer.Option(Path("shards/cub"), "--out"),
    size: str = typer.Option("224", "--size", help="N (N x N), HxW or original."),
    bbox_crop: bool = typer.Option(False, "--bbox-crop", help="Crop each bird to its bounding box first."),
    crop: Optional[str] = CROP, workers: int = WORKERS, shard_size: int = SHARD_SIZE,
    strict: bool = STRICT, overwrite: bool = OVERWRITE,
) -> None:
    """CUB-200-2011: 200-way species one-hot + 312 attributes (present and certainty >= 3), official split."""
    from toolkit.data.cub import read_cub

    _build(read_cub(root, bbox_crop=bbox_crop), out, size, crop, workers, shard_size, strict, overwrite)


@shards_app.command("folder")
def shards_folder(
    root: Path = typer.Option(..., "--root", help="Folder the table's file names are relative to."),
    attributes: Path = typer.Option(..., "--attributes", help="CSV: a file column (file/filename/image/path) and one 0/1 column per attribute."),
    out: Path = typer.Option(..., "--out"),
    split_column: Optional[str] = typer.Option(None, "--split-column", help="Column with train/val/test per row."),
    test_fraction: float = typer.Option(0.1, "--test-fraction", min=0.0, max=0.9, help="Without --split-column: random test share."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random split."),
    size: str = SIZE, crop: Optional[str] = CROP, workers: int = WORKERS, shard_size: int = SHARD_SIZE,
    strict: bool = STRICT, overwrite: bool = OVERWRITE,
) -> None:
    """Your own images plus a CSV attribute table."""
    from toolkit.data.folder import read_folder

    table = read_folder(root, attributes, split_column=split_column, test_fraction=test_fraction, seed=seed)
    _build(table, out, size, crop, workers, shard_size, strict, overwrite)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train from a recipe: cvae-tk train recipe=digits [key=value ...] (same as toolkit/train.py).

    Common keys: run_dir, seed, max_steps, batch_size, lr, beta, mixed_precision (auto|no|fp16|bf16),
    data.shards, data.num_workers, model.arch (paper|resnet), model.latent_dim, model.prior
    (standard|learned), model.width, model.levels, model.embed_dim. For several GPUs use
    `accelerate launch toolkit/train.py recipe=...`.
    """
    from toolkit.config import load_config
    from toolkit.train import train as run_training

    run_training(load_config(list(ctx.args)))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run folder written by `cvae-tk train`."),
    onnx: bool = typer.Option(True, "--onnx", help="Export to ONNX (the only format so far)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output file (default export/<run name>.onnx, with -fp16 / -uint8 / -temperature for the variants)."
    ),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18 or newer)."),
    fp16: bool = typer.Option(False, "--fp16", help="fp16 weights and arithmetic (for GPU serving); inputs and outputs stay float32."),
    uint8: bool = typer.Option(False, "--uint8", help="Output uint8 images [B, H, W, 3] (no post-processing needed)."),
    temperature_input: bool = typer.Option(
        False, "--temperature-input", help="An extra float32 [1] input `temperature` that scales the prior's spread."
    ),
) -> None:
    """Export a run's conditional decoder as a self-contained ONNX sampler (parity-checked)."""
    from toolkit.export import PARITY_BATCHES, PARITY_TEMPERATURE, export_onnx, parity_limit

    if not onnx:
        raise UserError("only --onnx export exists")
    path, error = export_onnx(run_dir, out, opset, fp16=fp16, uint8=uint8, temperature_input=temperature_input)
    limit, measure = parity_limit(fp16, uint8)
    where = f"batch sizes {', '.join(map(str, PARITY_BATCHES))}" + (f", temperatures 1 and {PARITY_TEMPERATURE:g}" if temperature_input else "")
    typer.echo(f"parity: {measure} = {error:.3g} (limit {limit:g}) at {where}")
    typer.echo(f"wrote {path} ({'fp16' if fp16 else 'fp32'}, {path.stat().st_size / 1e6:.1f} MB)")


@app.command("inspect")
def inspect_model(model: Path = typer.Argument(..., help="An ONNX file written by `cvae-tk export`.")) -> None:
    """Show an exported sampler's metadata, inputs, outputs, opset and size (the file is only read, never run)."""
    from toolkit.inspection import inspect_onnx

    for line in inspect_onnx(model):
        typer.echo(line)


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
    temperature: float = typer.Option(1.0, "--temperature", help="Scale of the prior's spread (0: its mean)."),
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
    images = sampler.sample(conditions, n=n, seed=seed, temperature=temperature)
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


def _format_metric(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}"


@app.command("eval")
def eval_run(
    run_dir: Path = typer.Argument(..., help="A run folder written by `cvae-tk train`."),
    split: str = typer.Option("test", "--split", help="The split of the run's shards to measure on."),
    classifier: Optional[Path] = typer.Option(
        None, "--classifier", help="An attribute classifier folder (default: RUN/../classifier or RUN/../<recipe>-classifier, if there)."
    ),
    shards: Optional[str] = typer.Option(None, "--shards", help="Shards to measure on (default: the run's data.shards)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the posterior and prior noise and of the shuffled floor."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
) -> None:
    """Held-out metrics of a run (MSE, KL, diversity, attribute accuracy) -> a table and RUN/metrics.json."""
    from toolkit.evaluate import METRICS_FILE, evaluate_run

    if classifier is not None and not classifier.is_dir():
        raise UserError(f"classifier folder not found: {classifier}")
    report = evaluate_run(run_dir, split=split, classifier=classifier, device=device, shards=shards, seed=seed)
    rows = list(report["metrics"].items())
    width = max(len(name) for name, _ in rows)
    typer.echo(f"{'metric'.ljust(width)}  value")
    for name, value in rows:
        typer.echo(f"{name.ljust(width)}  {_format_metric(value)}")
    if report["classifier"] is None and report["metrics"]["attr_acc"] is None:
        typer.echo("(no attribute classifier: train one with `cvae-tk classifier train recipe=NAME`, or pass --classifier)")
    typer.echo(f"wrote {Path(run_dir) / METRICS_FILE}")


classifier_app = typer.Typer(help="The attribute classifier that judges generated images.", no_args_is_help=True)
app.add_typer(classifier_app, name="classifier")


@classifier_app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def classifier_train(
    ctx: typer.Context,
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimiser steps (default 2000)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default 1e-3)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/<recipe>-classifier)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
) -> None:
    """Train the attribute classifier on a recipe's shards: cvae-tk classifier train recipe=NAME [key=value ...].

    Uses the recipe's data.shards, seed, batch_size and data.num_workers; writes classifier.safetensors
    and classifier.json (with the accuracy on the real test images).
    """
    from toolkit.classifier import DEFAULTS, train_classifier
    from toolkit.config import load_config
    from toolkit.evaluate import resolve_device

    config = load_config(list(ctx.args))
    if lr is not None and lr <= 0:
        raise UserError(f"--lr must be positive, got {lr}")
    out = out or Path("runs") / f"{config.recipe}-classifier"
    path = train_classifier(
        config.data.shards, out, steps=steps or DEFAULTS["steps"], batch_size=config.batch_size, lr=lr or DEFAULTS["lr"],
        seed=config.seed, device=str(resolve_device(device)), num_workers=config.data.num_workers, log=typer.echo,
    )
    import json

    accuracy = json.loads((path.parent / "classifier.json").read_text())["test_accuracy"]
    top1 = f", top-1 {accuracy['top1']:.4f}" if accuracy["top1"] is not None else ""
    typer.echo(f"real test images: mean attribute accuracy {accuracy['mean']:.4f}{top1}")
    typer.echo(f"wrote {path} and {path.parent / 'classifier.json'}")


def main() -> None:
    try:
        app()
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
