"""`cvae-tk`: the command line, one command per stage (shards -> train -> export -> sample).

Heavy libraries are imported inside the commands, so `cvae-tk sample` starts without torch.
"""

from __future__ import annotations

import errno
import os
import sys
from functools import partial
from pathlib import Path
from typing import List, Optional

# ONNX Runtime 1.29+ sends usage telemetry from Linux and macOS by default, and says so on stderr
# when it cannot store its device ID (a read-only or foreign home folder). A command-line tool that
# promises to work offline opts out, before onnxruntime is first imported; ORT_DISABLE_TELEMETRY=0
# in the environment keeps ONNX Runtime's default. (The Sampler, a library, leaves the process as it finds it.)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import typer  # noqa: E402

from toolkit.atomic import check_output, file_name  # noqa: E402
from toolkit.entry import INTERRUPTED_EXIT, begin, interrupted_line, on_interrupt  # noqa: E402
from toolkit.errors import UserError, check_int, check_seed, one_line  # noqa: E402


class Interrupted(Exception):
    """A Ctrl-C inside a command, carried past typer (which ends the process silently with 130, or says
    'aborted' with exit 1 in older versions) to main(), which says what the command left."""


class _Commands(typer.core.TyperGroup):
    def invoke(self, ctx):
        on_interrupt()  # not an earlier command's note, where several run in one process (tests, scripts)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted from None


app = typer.Typer(
    cls=_Commands,
    help="Train attribute-conditioned image generators (Conditional VAEs) and ship them as ONNX samplers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show [brackets] literally
)
shards_app = typer.Typer(
    help="Build WebDataset shards (+ manifest.json per split) from a raw data set, or verify built ones.",
    no_args_is_help=True,
)
app.add_typer(shards_app, name="shards")


def _version(shown: bool) -> None:
    if shown:
        import toolkit

        typer.echo(f"cvae-tk {toolkit.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Train attribute-conditioned image generators (Conditional VAEs) and ship them as ONNX samplers."""


def _seed(value: Optional[int]) -> Optional[int]:
    """Every --seed: an integer in [0, 2**63) (torch wraps negative seeds silently, overflows on huge ones)."""
    return value if value is None else check_seed(value, "--seed")


def _count(low: int = 1):
    """The callback of every count option (--steps, -n, --workers, --shard-size): an integer in
    [low, 2**63), the range config.validate gives every integer key (max_steps: [1, 2**63)); one
    line naming the option and the range. (A huge --steps was accepted, and ran for ever.)"""

    def check(param: typer.CallbackParam, value: Optional[int]) -> Optional[int]:
        return value if value is None else check_int(value, param.opts[0], low)

    return check


def _output_folder(value: Optional[Path]) -> Optional[Path]:
    """A folder to write into: not a file, and writable (checked while the options are read, before any work)."""
    return value if value is None else check_output(value, folder=True)


def output_file(default, option: str, **options):
    """The option naming a file to write (--grid, --out of export, edit, interpolate): its text is
    read here, before typer's Path drops a trailing / (`--grid out.png/` means a folder, or is a
    typo; it wrote the file out.png), and refused in one line (atomic.file_name)."""
    return typer.Option(default, option, parser=partial(file_name, option=option), metavar="<path>", **options)


OVERWRITE = typer.Option(
    False,
    "--overwrite",
    help="Replace the shards of another build in --out (files that are not shards are never deleted).",
)


def _a_ctrl_c_leaves_a_build(out: Path) -> None:
    on_interrupt(
        f"the build is not finished; a split of {out} without its manifest.json is not usable: "
        "run the same command again"
    )


@shards_app.command("digits")
def shards_digits(
    out: Path = typer.Option(
        Path("shards/digits"), "--out", callback=_output_folder, help="Folder to write train/ and test/ into."
    ),
    size: int = typer.Option(32, "--size", min=8, max=512, help="Side of the square images (the source is 8x8)."),
    shard_size: Optional[int] = typer.Option(
        None, "--shard-size", callback=_count(1), help="Samples per tar shard (default: 100).", show_default=False
    ),
    overwrite: bool = OVERWRITE,
) -> None:
    """The embedded demo set: scikit-learn's 1,797 handwritten digits, one-hot digit_0 ... digit_9."""
    from toolkit.data.digits import write_digits

    _a_ctrl_c_leaves_a_build(out)
    for split, manifest in write_digits(out, size, shard_size or 100, overwrite).items():
        typer.echo(f"{split}: {manifest['count']} images in {len(manifest['shards'])} shard(s) -> {out / split}")


# Options shared by the image data sets (typer allows reusing these markers).
SIZE = typer.Option("64", "--size", help="N (N x N), HxW (e.g. 218x178) or original (keep the JPEG bytes).")
CROP = typer.Option(
    None, "--crop", help="center:N - a centred N x N square before resizing (CelebA faces: center:148)."
)
WORKERS = typer.Option(0, "--workers", callback=_count(0), help="Worker processes (0: every core).")
SHARD_SIZE = typer.Option(
    None,
    "--shard-size",
    callback=_count(1),
    show_default=False,
    help="Samples per tar shard (default: about 256 shards per split, 100 to 1,000 samples each, so many loader workers read in parallel).",
)
STRICT = typer.Option(False, "--strict", help="Fail on a corrupt image instead of skipping and listing it.")


def _build(
    read,
    out: Path,
    size: str,
    crop: Optional[str],
    workers: int,
    shard_size: Optional[int],
    strict: bool,
    overwrite: bool,
) -> None:
    """`read()` gives the reader's table: called once the options are checked (CUB's tables take seconds)."""
    from toolkit.data.build import ImageSpec, build_shards, constant_attributes, require_train_and_test

    spec = ImageSpec.parse(size, crop)
    _a_ctrl_c_leaves_a_build(out)
    table = read()
    require_train_and_test(table)
    for split, manifest in build_shards(table, out, spec, workers, shard_size, strict, overwrite).items():
        skipped = manifest.get("skipped", {}).get("count", 0)
        note = f", {skipped} skipped (listed in the manifest)" if skipped else ""
        typer.echo(f"{split}: {manifest['count']} images in {len(manifest['shards'])} shard(s) -> {out / split}{note}")
    # after the build: a refused build stays one line
    for warning in [*table.warnings, constant_attributes(table)]:
        if warning:
            typer.echo(f"warning: {warning}", err=True)


@shards_app.command("celeba")
def shards_celeba(
    root: Path = typer.Option(
        ...,
        "--root",
        help="The CelebA folder: img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt (also as the Drive folder's Anno/, Eval/, Img/, the PNG copy, Kaggle's .csv).",
    ),
    out: Path = typer.Option(Path("shards/celeba"), "--out", callback=_output_folder),
    size: str = typer.Option(
        "original", "--size", help="original (the paper: 218x178 JPEGs untouched), N (N x N) or HxW."
    ),
    crop: Optional[str] = CROP,
    workers: int = WORKERS,
    shard_size: Optional[int] = SHARD_SIZE,
    strict: bool = STRICT,
    overwrite: bool = OVERWRITE,
) -> None:
    """CelebA: 40 attributes (-1/1 -> 0/1), the official train / val / test partition."""
    from toolkit.data.celeba import read_celeba

    _build(partial(read_celeba, root), out, size, crop, workers, shard_size, strict, overwrite)


@shards_app.command("cub")
def shards_cub(
    root: Path = typer.Option(
        ..., "--root", help="The archive root (attributes.txt beside CUB_200_2011/) or CUB_200_2011/ itself."
    ),
    out: Path = typer.Option(Path("shards/cub"), "--out", callback=_output_folder),
    size: str = typer.Option("224", "--size", help="N (N x N), HxW or original."),
    condition: str = typer.Option(
        "both",
        "--condition",
        help="species (200-way one-hot only; needs no attribute files), attributes (the 312 only) or both (the paper's 512).",
    ),
    bbox_crop: bool = typer.Option(
        False,
        "--bbox-crop",
        help="Crop around each bird first: the square of 1.5 x its bounding box's longer side, clipped to the image (StackGAN / AttnGAN).",
    ),
    crop: Optional[str] = CROP,
    workers: int = WORKERS,
    shard_size: Optional[int] = SHARD_SIZE,
    strict: bool = STRICT,
    overwrite: bool = OVERWRITE,
) -> None:
    """CUB-200-2011, official split: 200-way species one-hot + 312 attributes (present and certainty >= 3), or either alone."""
    from toolkit.data.cub import read_cub

    _build(
        partial(read_cub, root, bbox_crop=bbox_crop, condition=condition),
        out,
        size,
        crop,
        workers,
        shard_size,
        strict,
        overwrite,
    )


@shards_app.command("folder")
def shards_folder(
    root: Path = typer.Option(
        ...,
        "--root",
        help="Folder the table's file names are relative to; without --attributes, one folder per class.",
    ),
    attributes: Optional[Path] = typer.Option(
        None,
        "--attributes",
        help="CSV: a file column (file/filename/file_name/image/path/image_id) and one 0/1 (or -1/1) column per attribute. Without it, each "
        "folder in --root is a class (ROOT/cat/*.jpg, or ROOT/train/cat/*.jpg and ROOT/test/cat/*.jpg).",
    ),
    out: Path = typer.Option(..., "--out", callback=_output_folder),
    split_column: Optional[str] = typer.Option(None, "--split-column", help="Column with train/val/test per row."),
    test_fraction: Optional[float] = typer.Option(
        None,
        "--test-fraction",
        min=0.0,
        max=0.9,
        show_default=False,
        help="Without --split-column: random test share (default: 0.1; of each class without --attributes).",
    ),
    seed: Optional[int] = typer.Option(
        None, "--seed", callback=_seed, show_default=False, help="Seed of the random split (default: 0)."
    ),
    size: str = SIZE,
    crop: Optional[str] = CROP,
    workers: int = WORKERS,
    shard_size: Optional[int] = SHARD_SIZE,
    strict: bool = STRICT,
    overwrite: bool = OVERWRITE,
) -> None:
    """Your own images: plus a CSV attribute table, or one folder per class (torchvision's ImageFolder layout)."""
    from toolkit.data.classes import read_class_folders
    from toolkit.data.folder import read_folder

    if split_column is not None:  # the column gives every row's split: a random split's settings do nothing
        if attributes is None:
            raise UserError("--split-column names a column of the --attributes table: give the table too")
        for option, value in (("--test-fraction", test_fraction), ("--seed", seed)):
            if value is not None:
                raise UserError(f"{option} does nothing with --split-column: the column gives each row's split")
    if attributes is None:
        read = partial(read_class_folders, root, test_fraction=test_fraction, seed=seed)
    else:
        fraction = 0.1 if test_fraction is None else test_fraction
        read = partial(
            read_folder, root, attributes, split_column=split_column, test_fraction=fraction, seed=seed or 0
        )
    _build(read, out, size, crop, workers, shard_size, strict, overwrite)


@shards_app.command("verify")
def shards_verify(
    shards: str = typer.Argument(..., help="A folder written by `cvae-tk shards` (or a pipe:/http URL of one)."),
    splits: Optional[List[str]] = typer.Option(
        None,
        "--split",
        metavar="SPLIT",
        help="A split to check (repeatable; default: every split folder, train and test for a URL).",
    ),
) -> None:
    """Read every tar whole and compare its size and sha256 with what its build recorded in the manifest
    (bit rot, a copy cut short or a replaced file; exit 1 if any tar differs)."""
    from tqdm import tqdm

    from toolkit.data.verify import verify_shards

    def bar(total: int) -> tqdm:
        return tqdm(
            total=total, desc="verify", unit="B", unit_scale=True, unit_divisor=1024, mininterval=1, leave=False
        )

    reports = verify_shards(shards, splits, bar)
    for report in reports:
        state = f"{len(report.damaged)} damaged" if report.damaged else "every tar as built"
        typer.echo(
            f"{report.split}: {report.shards} shard(s), {report.samples:,} samples, {report.bytes:,} bytes: {state}"
        )
        for damage in report.damaged:
            typer.echo(f"  {damage.name}: {damage.problem}")
    damaged = sum(len(report.damaged) for report in reports)
    if damaged:
        total = sum(report.shards for report in reports)
        typer.echo(
            f"error: {damaged} of {total} tars in {shards} are not what their build wrote; run the `cvae-tk shards` "
            "command that made them again (it rebuilds the same bytes), or copy them again",
            err=True,
        )
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train from a recipe: cvae-tk train recipe=digits [key=value ...] (same as toolkit/train.py).

    Common keys: run_dir, resume (latest|PATH), overwrite (true: replace the run in run_dir), seed,
    max_steps, batch_size, lr, beta, mixed_precision (auto|no|fp16|bf16), data.shards,
    data.num_workers, model.arch (paper|resnet), model.latent_dim, model.prior (standard|learned),
    model.width, model.levels, model.embed_dim (resnet only). For several GPUs use
    `accelerate launch toolkit/train.py recipe=...`.
    """
    from toolkit.entry import quiet_interrupt, usual_interrupt

    # a Ctrl-C while the config loads or torch imports: one line, nothing written (was 'aborted', exit 1)
    quiet_interrupt()
    try:
        from toolkit.config import load_config

        config = load_config(list(ctx.args))  # a mistake in it is said before torch's import
        from toolkit.train import stop_on_interrupt
        from toolkit.train import train as run_training
    except BaseException:
        usual_interrupt()
        raise
    try:
        usual_interrupt()  # from here a Ctrl-C is a KeyboardInterrupt, which says what the run kept
        run_training(config)
    except KeyboardInterrupt:  # one line naming the checkpoint to continue from, as toolkit/train.py says it
        stop_on_interrupt(config)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run folder written by `cvae-tk train`."),
    onnx: bool = typer.Option(True, "--onnx", help="Export to ONNX (the only format so far)."),
    out: Optional[Path] = output_file(
        None,
        "--out",
        help="Output file (default export/<run name>.onnx, with -fp16 / -uint8 / -temperature for the variants; a default name holding another run's export is refused).",
    ),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18 or newer)."),
    fp16: bool = typer.Option(
        False, "--fp16", help="fp16 weights and arithmetic (for GPU serving); inputs and outputs stay float32."
    ),
    uint8: bool = typer.Option(False, "--uint8", help="Output uint8 images [B, H, W, 3] (no post-processing needed)."),
    temperature_input: bool = typer.Option(
        False, "--temperature-input", help="An extra float32 [1] input `temperature` that scales the prior's spread."
    ),
    encoder: bool = typer.Option(
        False,
        "--encoder",
        help="Also write the encoder (image + attributes -> z, fp32) as OUT-encoder.onnx, for editing photos.",
    ),
    int8: bool = typer.Option(
        False,
        "--int8",
        help="Also write OUT-int8.onnx: static int8 (QDQ) quantization for the CPU, calibrated on the run's training split.",
    ),
    classifier: Optional[Path] = typer.Option(
        None,
        "--classifier",
        help="With --int8: also bound the int8 file's attribute control score by the fp32 file's, judged by this classifier.",
    ),
) -> None:
    """Export a run's conditional decoder as a self-contained ONNX sampler (parity-checked)."""
    from toolkit.export import (
        PARITY_BATCHES,
        PARITY_TEMPERATURE,
        PARITY_TOLERANCE,
        check_default_outputs,
        default_path,
        export_onnx,
        parity_limit,
    )

    if not onnx:
        raise UserError("only --onnx export exists")
    named = out is not None
    out = check_output(out or default_path(run_dir, fp16, uint8, temperature_input))  # before the minutes of tracing
    if classifier is not None and not int8:
        raise UserError(
            "--classifier judges the --int8 file's control score: add --int8 (cvae-tk eval RUN --classifier DIR scores a run)"
        )
    if int8:
        from toolkit import quantize

        int8_out = quantize.check_request(run_dir, out, fp16, classifier)
        if not named:  # the decoder's first (export_onnx checks it and the encoder's too)
            check_default_outputs(run_dir, [out, int8_out])
    exported = export_onnx(
        run_dir,
        out if named else None,
        opset,
        fp16=fp16,
        uint8=uint8,
        temperature_input=temperature_input,
        encoder=encoder,
    )
    path, error = exported
    limit, measure = parity_limit(fp16, uint8)
    where = f"batch sizes {', '.join(map(str, PARITY_BATCHES))}" + (
        f", temperatures 1 and {PARITY_TEMPERATURE:g}" if temperature_input else ""
    )
    typer.echo(f"parity: {measure} = {error:.3g} (limit {limit:g}) at {where}")
    typer.echo(f"wrote {path} ({'fp16' if fp16 else 'fp32'}, {path.stat().st_size / 1e6:.1f} MB)")
    if exported.encoder is not None:
        typer.echo(
            f"encoder parity: max abs difference from the fp32 PyTorch outputs = {exported.encoder_error:.3g} "
            f"(limit {PARITY_TOLERANCE:g}) at batch sizes {', '.join(map(str, PARITY_BATCHES))}"
        )
        typer.echo(f"wrote {exported.encoder} (fp32, {exported.encoder.stat().st_size / 1e6:.1f} MB)")
    if int8:
        int8_path, levels, control = quantize.quantize_export(run_dir, path, int8_out, classifier=classifier)
        typer.echo(
            f"int8 parity: grey levels from the fp32 file: {quantize.describe(levels)} (limits: {quantize.limits()})"
        )
        if control:
            typer.echo(f"int8 control: {quantize.describe_control(control)}")
        typer.echo(f"wrote {int8_path} (int8, {int8_path.stat().st_size / 1e6:.1f} MB)")


@app.command("inspect")
def inspect_model(model: Path = typer.Argument(..., help="An ONNX file written by `cvae-tk export`.")) -> None:
    """Show an exported sampler's metadata, inputs, outputs, opset and size (the file is only read, never run)."""
    from toolkit.inspection import inspect_onnx

    for line in inspect_onnx(model):
        typer.echo(line)


def _assignments(items: List[str], option: str) -> dict[str, int]:
    """--attr / --set / --from-attr / --to-attr: ['digit_3=1', 'digit_8=0'] -> {'digit_3': 1, 'digit_8': 0}; anything but NAME=0|1 is a UserError."""
    mapping: dict[str, int] = {}
    for item in items:
        name, sep, value = item.rpartition("=")  # the last '=': a class folder's name may hold one ('a=b=1')
        if not sep or not name.strip() or value.strip() not in ("0", "1"):
            raise UserError(f"{option} expects NAME=0 or NAME=1, got '{item}'")
        if mapping.get(name.strip(), int(value)) != int(value):  # which one was meant cannot be told
            raise UserError(
                f"{option} sets {name.strip()} twice, to {mapping[name.strip()]} and to {int(value)}: give it once"
            )
        mapping[name.strip()] = int(value)
    return mapping


def _check_no_earlier_images(out_dir: Path) -> None:
    """`--out-dir` writes 00000.png, 00001.png, ...: a folder already holding such images (an earlier
    sample's, or the user's) is refused, so that no image is replaced and no two runs' images mix."""
    import re

    if not out_dir.is_dir():
        return
    with os.scandir(out_dir) as entries:
        numbered = sorted(entry.name for entry in entries if re.fullmatch(r"\d{5,}\.png", entry.name))
    if numbered:
        raise UserError(
            f"--out-dir {out_dir} already holds {len(numbered)} numbered image(s) ({numbered[0]} ...), an earlier sample's: "
            "these would replace or mix with them; choose an empty or new folder, or remove them"
        )


@app.command()
def sample(
    model: Path = typer.Argument(..., help="An ONNX file written by `cvae-tk export`."),
    attr: List[str] = typer.Option(
        [], "--attr", metavar="NAME=0|1", help="Repeat for several; unnamed attributes are 0."
    ),
    each_attribute: bool = typer.Option(
        False, "--each-attribute", help="One row per attribute, that attribute alone set."
    ),
    n: int = typer.Option(8, "-n", callback=_count(1), help="Images per condition."),
    seed: Optional[int] = typer.Option(None, "--seed", callback=_seed, help="Noise seed (same seed, same images)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Scale of the prior's spread (0: its mean)."),
    grid: Optional[Path] = output_file(
        None,
        "--grid",
        help="Write one grid image, one row per condition (the format from the extension: .png, .jpg, .webp...).",
    ),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Write one PNG per image."),
    device: str = typer.Option(
        "auto", "--device", help="auto | cpu | cuda | tensorrt (fp16 engines cached beside the model)"
    ),
) -> None:
    """Generate images with chosen attributes through ONNX Runtime (no torch needed)."""
    import numpy as np
    from PIL import Image

    from toolkit.atomic import check_writable_size, image_format, save_image
    from toolkit.memory import check_fits
    from toolkit.sampler import Sampler, grid_size, image_grid

    if grid is None and out_dir is None:
        raise UserError("say where the images go: --grid out.png or --out-dir DIR")
    if grid is not None:  # decided before any image is made
        image_format(grid)
        check_output(grid)
    if out_dir is not None:
        check_output(out_dir, folder=True)
        _check_no_earlier_images(out_dir)
    sampler = Sampler(model, device=device)
    if each_attribute:
        if attr:
            raise UserError("--each-attribute and --attr exclude each other")
        conditions = np.eye(len(sampler.attributes), dtype=np.float32)
    else:
        conditions = sampler.conditions(_assignments(attr, "--attr"))
    if grid is not None:  # the images, the grid array and its PIL copy are in memory at once
        height, width = sampler.image_size
        check_fits(
            3 * len(conditions) * n * (height + 2) * (width + 2) * 3,
            f"a grid of {len(conditions)} row(s) x {n} images of {width}x{height}",
            "ask for fewer images (-n)",
        )
        check_writable_size(  # the format must hold it (WebP: 16,383 pixels per side, JPEG: 65,500)
            grid,
            *grid_size(len(conditions) * n, n, height, width),  # one row per condition, n columns
            f"a grid of {len(conditions)} row(s) x {n} images of {width}x{height}",
            "fewer images (-n)",
            option="--grid",
        )
    images = sampler.sample(conditions, n=n, seed=seed, temperature=temperature)
    if grid is not None:
        grid.parent.mkdir(parents=True, exist_ok=True)
        save_image(Image.fromarray(image_grid(images, columns=n)), grid)
        typer.echo(f"wrote {grid} ({len(conditions)} row(s) x {n}, {sampler.provider})")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            save_image(Image.fromarray(image), out_dir / f"{index:05d}.png")
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
        None,
        "--classifier",
        help="An attribute classifier folder (default: RUN/../classifier or RUN/../<recipe>-classifier, if there).",
    ),
    shards: Optional[str] = typer.Option(
        None, "--shards", help="Shards to measure on (default: the run's data.shards)."
    ),
    seed: int = typer.Option(
        0, "--seed", callback=_seed, help="Seed of the posterior and prior noise and of the shuffled floor."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
) -> None:
    """Held-out metrics of a run (MSE, KL, diversity, attribute accuracy) -> a table and RUN/metrics.json."""
    from toolkit.evaluate import METRICS_FILE, evaluate_run

    if classifier is not None and not classifier.is_dir():
        raise UserError(f"classifier folder not found: {classifier}")
    if run_dir.is_dir():  # the report goes into the run folder: refuse a read-only one before measuring
        check_output(run_dir / METRICS_FILE)
    report = evaluate_run(run_dir, split=split, classifier=classifier, device=device, shards=shards, seed=seed)
    rows = list(report["metrics"].items())
    width = max(len(name) for name, _ in rows)
    typer.echo(f"{'metric'.ljust(width)}  value")
    for name, value in rows:
        typer.echo(f"{name.ljust(width)}  {_format_metric(value)}")
    if report["classifier"] is None and report["metrics"]["attr_acc"] is None:
        typer.echo(
            "(no attribute classifier: train one with `cvae-tk classifier train recipe=NAME`, or pass --classifier)"
        )
    if report.get("control"):
        per = report["control"]["per_attribute"]
        reliable = [name for name in report["control"]["reliable"] if name in per]
        shown = ", ".join(f"{name} {per[name]['control']:.2f}" for name in reliable) or "none"
        typer.echo(f"control of the attributes the classifier recognises reliably on real images: {shown}")
    typer.echo(f"wrote {Path(run_dir) / METRICS_FILE}")


classifier_app = typer.Typer(help="The attribute classifier that judges generated images.", no_args_is_help=True)
app.add_typer(classifier_app, name="classifier")


# The recipe keys `classifier train` reads; the options it has of its own for what else it could mean.
CLASSIFIER_KEYS = ("recipe", "data.shards", "seed", "batch_size", "data.num_workers")
CLASSIFIER_OPTIONS = {"lr": "--lr", "max_steps": "--steps", "model.width": "--width"}


def _refuse_unread_keys(args: List[str]) -> None:
    """A `key=value` the classifier does not read (lr=0.5 used to be accepted, and 1e-3 used) is refused;
    a key it takes as an option names the option, with dashes too (--max_steps 3: use --steps)."""
    for arg in args:
        written = arg.partition("=")[0].strip()
        key = written.lstrip("-")
        option = CLASSIFIER_OPTIONS.get(key)
        # other keys with dashes (--seed=1) are load_config's: 'a key is written without dashes'
        if option or ("=" in arg and key == written and key not in CLASSIFIER_KEYS):
            raise UserError(
                f"classifier train does not read the recipe key '{key}' ({arg}): "
                + (f"use {option}; " if option else "")
                + f"it takes {', '.join(CLASSIFIER_KEYS)} from the recipe, the rest from its options (see --help)"
            )


@classifier_app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def classifier_train(
    ctx: typer.Context,
    steps: Optional[int] = typer.Option(None, "--steps", callback=_count(1), help="Optimiser steps (default 2000)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default 1e-3)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/<recipe>-classifier)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    hflip: bool = typer.Option(
        False, "--hflip", help="Mirror a random half of each batch (faces, birds; not digits or text)."
    ),
    balanced: bool = typer.Option(
        False,
        "--balanced",
        help="Weigh each attribute's rare value up (BCE pos_weight) so rare attributes (Eyeglasses) are called present.",
    ),
    blur: float = typer.Option(
        0.0,
        "--blur",
        min=0.0,
        max=16.0,
        help="Blur a random half of each batch, sigma up to this many pixels (judging blurry samples).",
    ),
    width: Optional[int] = typer.Option(
        None, "--width", min=1, max=512, help="Channels of the first block (default 32)."
    ),
) -> None:
    """Train the attribute classifier on a recipe's shards: cvae-tk classifier train recipe=NAME [key=value ...].

    Uses the recipe's data.shards, seed, batch_size and data.num_workers; writes classifier.safetensors
    and classifier.json (with the accuracy on the real test images).
    """
    import math

    from toolkit.classifier import DEFAULTS, train_classifier
    from toolkit.config import load_config
    from toolkit.devices import resolve_device

    args = _key_values(ctx)
    _refuse_unread_keys(args)
    config = load_config(args)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr must be a finite number > 0, got {lr}")
    out = check_output(out or Path("runs") / f"{config.recipe}-classifier", folder=True)
    path = train_classifier(
        config.data.shards,
        out,
        steps=steps or DEFAULTS["steps"],
        batch_size=config.batch_size,
        lr=lr or DEFAULTS["lr"],
        seed=config.seed,
        device=str(resolve_device(device)),
        num_workers=config.data.num_workers,
        hflip=hflip,
        balanced=balanced,
        blur=blur,
        width=width or DEFAULTS["width"],
        log=typer.echo,
    )
    import json

    from toolkit.classifier import RELIABLE_BALANCED, reliable_attributes

    accuracy = json.loads((path.parent / "classifier.json").read_text())["test_accuracy"]
    top1 = f", top-1 {accuracy['top1']:.4f}" if accuracy["top1"] is not None else ""
    typer.echo(f"real test images: mean attribute accuracy {accuracy['mean']:.4f}{top1}")
    reliable = reliable_attributes(accuracy)
    shown = ", ".join(f"{name} {accuracy['balanced'][name]:.2f}" for name in reliable)
    typer.echo(
        f"recognised reliably (balanced accuracy >= {RELIABLE_BALANCED}): {len(reliable)} of {len(accuracy['balanced'])}: {shown or 'none'}"
    )
    typer.echo(f"wrote {path} and {path.parent / 'classifier.json'}")


EDIT_CLASSIFIER = typer.Option(
    None,
    "--classifier",
    help="Attribute classifier folder for images without --attr (default: RUN/../classifier or RUN/../<recipe>-classifier).",
)


@app.command("edit")
def edit_command(
    run_dir: Path = typer.Argument(..., help="A run folder written by `cvae-tk train`."),
    image: Path = typer.Argument(..., help="The image to edit (any format PIL reads, any size)."),
    set_: List[str] = typer.Option([], "--set", metavar="NAME=0|1", help="The change; repeat for several."),
    attr: List[str] = typer.Option(
        [],
        "--attr",
        metavar="NAME=0|1",
        help="The image's attributes, the full set (unnamed are 0); default: the classifier's prediction.",
    ),
    classifier: Optional[Path] = EDIT_CLASSIFIER,
    out: Optional[Path] = output_file(
        None, "--out", help="Output image: original | edit side by side (default <image stem>-edit.png here)."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
) -> None:
    """Edit a real image: encode it with its attributes, decode with --set applied, write original | edit."""
    from toolkit.edit import (
        ImageAttributes,
        check_output,
        check_pair,
        crop_box,
        describe_changes,
        edit_image,
        load_image,
        load_run_model,
        model_names,
        read_run_spec,
        run_crop,
        save_image,
        side_by_side,
    )

    changes, given = _assignments(set_, "--set"), _assignments(attr, "--attr")
    if not changes:
        raise UserError("say what to change: --set NAME=0|1 (repeat for several)")
    if given and classifier is not None:
        raise UserError("--classifier does nothing when --attr gives the image's attributes: leave one of them out")
    out = out or Path(f"{image.stem}-edit.png")
    check_output(out, inputs=[image])  # --out photo.png would replace the photo with the pair
    spec = read_run_spec(run_dir)  # names are checked before any image or weights are read
    names = list(spec.attributes)
    # the model's spelling of each name ('é' may be typed in either Unicode normalization); unknown names
    # and values fail before any classifier is looked for
    given, changes = model_names(names, given), model_names(names, changes)
    if given:
        same = [f"{name}={value}" for name, value in changes.items() if given.get(name, 0) == value]
        if same:
            raise UserError(
                f"--set {' '.join(same)} changes nothing: the image's attributes (--attr; unnamed are 0) already "
                f"have {' '.join(same)}; set only what should change"
            )
    original = load_image(image)
    # the pair is 2 W x H: a format (or a memory) that cannot hold it is refused before the model loads
    check_pair(out, original)
    crop = run_crop(run_dir, spec.image_size)
    crop_box(original, crop)  # a photo smaller than the crop the model was trained on
    model = load_run_model(run_dir, device)
    attributes, where = ImageAttributes(run_dir, model, classifier, crop=crop)(original, given)
    edited = edit_image(model, original, attributes, changes, crop)
    pair = side_by_side(original, edited)
    save_image(pair, out)
    typer.echo(f"attributes: {where}")
    typer.echo(f"changes: {describe_changes(names, attributes, changes)}")
    typer.echo(f"wrote {out} ({pair.width}x{pair.height}: original | edit)")


@app.command("interpolate")
def interpolate_command(
    run_dir: Path = typer.Argument(..., help="A run folder written by `cvae-tk train`."),
    from_image: Optional[Path] = typer.Option(None, "--from-image", help="First image (with --to-image)."),
    to_image: Optional[Path] = typer.Option(None, "--to-image", help="Last image (with --from-image)."),
    from_attr: List[str] = typer.Option(
        [],
        "--from-attr",
        metavar="NAME=0|1",
        help="Repeatable: the first attribute set (unnamed 0); with images, the first image's attributes.",
    ),
    to_attr: List[str] = typer.Option(
        [],
        "--to-attr",
        metavar="NAME=0|1",
        help="Repeatable: the last attribute set; with images, the last image's attributes.",
    ),
    classifier: Optional[Path] = EDIT_CLASSIFIER,
    steps: int = typer.Option(8, "--steps", callback=_count(2), help="Frames, both ends included (>= 2)."),
    seed: Optional[int] = typer.Option(
        None, "--seed", callback=_seed, help="Seed of the prior noise (attribute interpolation).  [default: 0]"
    ),
    out: Path = output_file(
        Path("interpolation.png"), "--out", help="Output image: one horizontal strip of the frames."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
) -> None:
    """Interpolate between two images (z and attributes) or two attribute sets (one prior sample) -> a strip."""
    from toolkit.edit import (
        ImageAttributes,
        attribute_vector,
        check_output,
        check_steps,
        check_strip,
        crop_box,
        describe,
        interpolate_attributes,
        interpolate_images,
        load_image,
        load_run_model,
        model_names,
        read_run_spec,
        run_crop,
        save_strip,
    )

    start, end = _assignments(from_attr, "--from-attr"), _assignments(to_attr, "--to-attr")
    check_steps(steps)
    with_images = from_image is not None or to_image is not None
    if with_images:
        if from_image is None or to_image is None:
            raise UserError("interpolating images needs both --from-image and --to-image")
        if seed is not None:
            raise UserError("--seed does nothing between two images (their z are the encoder's means): leave it out")
        if classifier is not None and start and end:
            raise UserError(
                "--classifier does nothing when --from-attr and --to-attr give both images' attributes: leave one out"
            )
    elif not start or not end:
        raise UserError(
            "say what to interpolate: --from-image A --to-image B, or --from-attr NAME=1 ... --to-attr NAME=1 ..."
        )
    elif classifier is not None:
        raise UserError("--classifier does nothing between two attribute sets (no image to predict them for)")
    check_output(out, inputs=[from_image, to_image])
    spec = read_run_spec(run_dir)  # names and sizes are checked before any image or weights are read
    names = list(spec.attributes)
    start, end = model_names(names, start), model_names(names, end)  # unknown names fail first; the model's spelling
    ya, yb = attribute_vector(names, start), attribute_vector(names, end)
    check_steps(steps, spec.image_size)  # the frames must fit in memory
    check_strip(out, steps, spec.image_size)  # the strip's format must hold it (WebP: 16,383 pixels wide)
    same_ends = "every frame would be the same image; change one end"
    if not with_images and bool((ya == yb).all()):
        raise UserError(f"--from-attr and --to-attr give the same attribute set ({describe(names, ya)}): {same_ends}")
    if with_images:
        images = load_image(from_image), load_image(to_image)
        # the same pixels with the same attributes (given alike, or both predicted alike) give one frame
        if start == end and images[0].size == images[1].size and images[0].tobytes() == images[1].tobytes():
            raise UserError(f"--from-image and --to-image are the same image, with the same attributes: {same_ends}")
        crop = run_crop(run_dir, spec.image_size)
        for photo in images:
            crop_box(photo, crop)
    model = load_run_model(run_dir, device)
    if with_images:
        source = ImageAttributes(run_dir, model, classifier, "--from-attr / --to-attr", crop)
        (ya, where_a), (yb, where_b) = source(images[0], start), source(images[1], end)
        frames = interpolate_images(model, images[0], ya, images[1], yb, steps, crop)
        typer.echo(f"from {from_image}: {where_a}")
        typer.echo(f"to {to_image}: {where_b}")
    else:
        seed = 0 if seed is None else seed
        frames = interpolate_attributes(model, start, end, steps, seed)
        typer.echo(f"from: {describe(names, ya)}  to: {describe(names, yb)}  (seed {seed})")
    save_strip(frames, out)
    height, width = spec.image_size
    typer.echo(f"wrote {out} ({steps} frames of {width}x{height}: {steps * width}x{height})")


@app.command("sweep", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep_command(
    ctx: typer.Context,
    out: Optional[Path] = typer.Option(
        None, "--out", help="Folder for the runs (OUT/beta-<b>) and the results (default runs/sweep-<recipe>)."
    ),
    classifier: Optional[Path] = typer.Option(
        None,
        "--classifier",
        help="Attribute classifier folder (default: OUT/classifier or OUT/<recipe>-classifier if there; else no accuracy).",
    ),
    launcher: Optional[str] = typer.Option(
        None,
        "--launcher",
        help='Prefix of each training process instead of `python`, e.g. "accelerate launch --multi_gpu --num_processes 8".',
    ),
    device: str = typer.Option("auto", "--device", help="Where evaluation and figures run: auto | cpu | cuda"),
    figure5_beta: Optional[float] = typer.Option(
        None, "--figure5-beta", help="The model of Figure 5 (default: the highest beta)."
    ),
    figure5_attributes: List[str] = typer.Option(
        [],
        "--figure5-attributes",
        metavar="A,B,...",
        help="Attributes Figure 5 changes: A,B,C, or repeated once per name; a value that is one attribute's name "
        "(a class named 'c,d') is that attribute (default: all if <= 16, else the 16 closest to 50% frequent).",
    ),
) -> None:
    """The paper's study: cvae-tk sweep recipe=NAME betas=[0.25,0.5,0.75,0.9] [key=value ...].

    Trains one run per beta (same recipe and overrides) into OUT/beta-<b>, each in its own process;
    reuses finished runs and resumes interrupted ones; evaluates them; writes OUT/table1.md,
    table1.csv, figure3.png (samples), figure4.png (reconstructions), figure5.png (attribute
    changes), loss_curves.png and sweep.json.
    """
    from toolkit.entry import SWEEP_AGAIN
    from toolkit.sweep import run_sweep

    try:
        run_sweep(
            _key_values(ctx),
            out=out,
            classifier=classifier,
            launcher=launcher,
            device=device,
            figure5_beta=figure5_beta,
            figure5_attributes=figure5_attributes or None,
            log=typer.echo,
        )
    except KeyboardInterrupt:  # one line saying how to go on (was 'aborted'): the training process said what it kept
        typer.echo(f"error: the sweep was interrupted (Ctrl-C): {SWEEP_AGAIN}", err=True)
        raise SystemExit(INTERRUPTED_EXIT) from None


def _os_error_line(error: OSError) -> str:
    """'<file>: No space left on device (ENOSPC); free some space or write elsewhere'."""
    from toolkit.atomic import describe_os_error

    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    hint = {
        errno.ENOSPC: "free some space or write elsewhere",
        errno.EDQUOT: "free some space or write elsewhere",
        errno.EROFS: "the folder is read-only: write elsewhere",
        errno.EACCES: "check its permissions or write elsewhere",
        errno.EPERM: "check its permissions or write elsewhere",
        errno.EISDIR: "it is a folder: give a file name",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.ENOENT: "no such file or folder",
    }.get(error.errno)
    return f"{where + ': ' if where else ''}{describe_os_error(error)}{'; ' + hint if hint else ''}"


@app.command("web")
def web_command(
    model: Path = typer.Argument(
        ..., help="An ONNX file written by `cvae-tk export` (its -encoder.onnx beside it is taken too)."
    ),
    out: Path = typer.Option(
        ..., "--out", callback=_output_folder, help="Folder to write the page into (host it as static files)."
    ),
    ort_dist: Optional[Path] = typer.Option(
        None,
        "--ort-dist",
        help="onnxruntime-web's dist/ folder (default: node_modules/onnxruntime-web/dist, installed by scripts/setup-js.sh).",
    ),
    serve: bool = typer.Option(False, "--serve", help="Then serve the page on 127.0.0.1 until Ctrl-C."),
    port: Optional[int] = typer.Option(
        None, "--port", min=0, max=65535, help="With --serve: the port (0: any free one).  [default: 8000]"
    ),
) -> None:
    """A static in-browser studio for an export (onnxruntime-web: WebGPU or wasm; works offline)."""
    from toolkit.web.build import bind, build_page, serve_forever

    if port is not None and not serve:
        raise UserError(f"--port {port} does nothing without --serve: add --serve, or leave --port out")
    # the port first: one in use (or below 1024 without root) is refused before the page is built
    server = bind(out, 8000 if port is None else port) if serve else None
    try:
        build_page(model, out, ort_dist=ort_dist)
        typer.echo(
            f"wrote {out / 'index.html'} (open it through a web server: cvae-tk web ... --serve, or any static host)"
        )
        if server is not None:
            serve_forever(out, server)
    finally:
        if server is not None:
            server.server_close()


def _key_values(ctx: typer.Context) -> List[str]:
    """The `key=value` arguments of a command that has options too: ignore_unknown_options passes a
    misspelt option (--step for --steps) on to them, where it read as a bad key; refused as click
    refuses one, with the options it resembles. A recipe key with dashes (--seed 1, which resembles
    --steps) and one that resembles no option are left to the keys' message: write seed=VALUE."""
    import difflib

    from toolkit.config import recipe_keys

    clicks = sys.modules[typer.BadParameter.__module__]
    options = [name for param in ctx.command.params for name in param.opts if name.startswith("--")]
    keys = set(recipe_keys())
    for arg in ctx.args:
        name = arg.partition("=")[0]
        is_option = arg.startswith("-") and name.lstrip("-") not in keys
        close = difflib.get_close_matches(name, options) if is_option else []
        if close:
            raise clicks.NoSuchOption(name, possibilities=close, ctx=ctx)
    return list(ctx.args)


def _refuse_empty_arguments(args: list[str]) -> None:
    """No option or argument takes an empty value, and typer reads `--out ""` as `.` (Path("")): an
    unset shell variable (`--out "$DIR"`) would write into the current folder."""
    for before, arg in zip(["", *args], args):
        if not arg.strip():
            where = f" after {before}" if before.startswith("-") else ""
            raise UserError(f"an empty argument{where}: expected a value (an unset shell variable?)")


def main() -> None:
    """The entry point: user mistakes, the file system's refusals and a lack of memory end in one line
    `error: ...` (exit 2; 1 for memory), never a traceback; anything else is a bug and keeps its traceback.
    A reader of stdout that goes away ends no command (toolkit.entry)."""
    begin()
    clicks = sys.modules[typer.BadParameter.__module__]  # click's exceptions, or the copy newer typer carries
    no_args_is_help = getattr(clicks, "NoArgsIsHelpError", ())  # click >= 8.2

    try:
        _refuse_empty_arguments(sys.argv[1:])
        code = app(standalone_mode=False)
        if code == INTERRUPTED_EXIT:  # typer's silent exit for a Ctrl-C outside a command (while it read the options)
            raise Interrupted
    except no_args_is_help as error:
        error.show()  # the help text, as `cvae-tk` alone has always printed
        code = error.exit_code
    except clicks.ClickException as error:  # a bad option: click's four lines made one
        where = f" (see {error.ctx.command_path} --help)" if getattr(error, "ctx", None) is not None else ""
        print(f"error: {one_line(error.format_message())}{where}", file=sys.stderr)
        code = error.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        code = 1
    except Interrupted:
        print(f"error: {interrupted_line()}", file=sys.stderr)
        code = INTERRUPTED_EXIT
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        code = 2
    except OSError as error:  # the boundary checks missed it: a disk that filled while writing, a vanished folder
        print(f"error: {one_line(_os_error_line(error))}", file=sys.stderr)
        code = 2
    except MemoryError:
        print(
            "error: out of memory: ask for less (fewer images, smaller sizes or batches), or free some memory",
            file=sys.stderr,
        )
        code = 1
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
