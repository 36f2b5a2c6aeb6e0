"""The pictures of a beta sweep (the paper's Figures 3-5) and its loss curves.

    image, layout = samples_figure(models, shards)          # Figure 3: one row per beta, same conditions and noise
    image, layout = reconstruction_figure(models, shards)   # Figure 4: ground truth, then one row per beta
    image, layout = attribute_figure(model, shards)         # Figure 5: a base attribute set, then one change per row
    loss_curves({0.5: "runs/sweep/beta-0.5", ...}, "loss_curves.png")
    save_png(image, "figure3.png")                          # through a temporary name + rename

`models` maps a label (e.g. "beta=0.9") to a loaded CVAE; every model must share the attributes,
image size and latent size (a sweep's models do). Every grid has a label column on the left (PIL's
default font), PAD pixels between cells, and images scaled up by an integer factor when small
(`scale_for`), so a figure is `label_width + columns * (W * s + PAD) + PAD` wide and
`rows * (H * s + PAD) + PAD` high (`layout` records all of these).
"""

from __future__ import annotations

import functools
import math
from itertools import islice
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from toolkit.atomic import atomic_path
from toolkit.data.stream import eval_batches
from toolkit.errors import UserError, cut, printable
from toolkit.formats import LOGS, attribute_column, attribute_index
from toolkit.images import to_uint8

PAD = 2
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
MIN_CELL = 64  # images smaller than this (on their short side) are scaled up by an integer factor
COLUMNS = 8  # samples per row in Figure 5; test images in Figure 4
NOISE_SEED = 0
ONE_HOT_LIMIT = 16  # at most this many attributes and one-hot data: conditions are the classes themselves
EDIT_LIMIT = 16  # Figure 5 changes at most this many attributes unless told which
FREQUENCY_BATCHES = 4  # test batches of 256 whose attribute frequencies choose them
LABEL_CHARS = 40  # a longer row label (an attribute's name) is cut, so the label column stays narrow


def scale_for(image_size) -> int:
    """The integer factor images are enlarged by: small images (the 32x32 digits) become >= MIN_CELL."""
    return max(1, math.ceil(MIN_CELL / max(1, min(image_size))))


@functools.cache
def _font_file() -> tuple[str | None, frozenset[int]]:
    """(DejaVu Sans, which matplotlib ships, and the characters it draws: accented Latin, Greek,
    Cyrillic, symbols); without it (None, printable ASCII): PIL's default font draws a box for é."""
    import matplotlib
    from fontTools.ttLib import TTFont  # a dependency of matplotlib

    path = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return str(path), frozenset(TTFont(path).getBestCmap())
    except Exception:  # moved or unreadable: the default font
        return None, frozenset(range(32, 127))


def _font(size: int):
    path, _ = _font_file()
    if path is not None:
        return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (FreeType): scalable
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _to_uint8(images: torch.Tensor):
    """[N, 3, H, W] in [0, 1] -> numpy uint8 [N, H, W, 3], the sampler's grey levels."""
    return to_uint8(images.detach().float().cpu().numpy())


def label_text(label) -> str:
    """A row label as one line of at most LABEL_CHARS characters, whatever the attribute's name holds:
    characters that do not print (a newline: PIL refuses to measure multiline text) or that the font
    has no glyph for (it would draw a box) escaped as \\n, \\u65e5; a long name cut with '...'
    (the layout keeps the whole)."""
    _, drawn = _font_file()
    text = printable(str(label), keep=lambda c: c.isprintable() and ord(c) in drawn)
    return cut(text, LABEL_CHARS - 3) if len(text) > LABEL_CHARS else text


def labelled_grid(rows: list[torch.Tensor], labels: list[str], scale: int = 1):
    """Rows of images ([N_r, 3, H, W] each, N_r may differ) with a text label left of each row -> (PIL image, layout)."""
    if not rows or len(rows) != len(labels):
        raise ValueError("labelled_grid needs one label per row and at least one row")
    height, width = rows[0].shape[-2:]
    cell_h, cell_w = height * scale, width * scale
    font = _font(max(10, min(18, cell_h // 3)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    shown = [label_text(label) for label in labels]
    text_w = max(int(math.ceil(measure.textlength(label, font=font))) for label in shown)
    label_w = text_w + 4 * PAD if text_w else 0
    columns = max(len(row) for row in rows)
    size = (label_w + columns * (cell_w + PAD) + PAD, len(rows) * (cell_h + PAD) + PAD)
    canvas = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(rows, shown)):
        top = PAD + r * (cell_h + PAD)
        if label:
            box = draw.textbbox((0, 0), label, font=font)
            draw.text((2 * PAD, top + (cell_h - (box[3] - box[1])) // 2 - box[1]), label, fill=TEXT, font=font)
        for c, pixels in enumerate(_to_uint8(row)):
            tile = Image.fromarray(pixels)
            if scale != 1:
                tile = tile.resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + PAD + c * (cell_w + PAD), top))
    layout = {
        "rows": len(rows),
        "columns": columns,
        "labels": list(labels),
        "image_size": [int(height), int(width)],
        "scale": scale,
        "label_width": label_w,
        "size": list(size),
    }
    return canvas, layout


def _first(models: dict):
    if not models:
        raise ValueError("no models to draw")
    return next(iter(models.values()))


def is_one_hot(vectors: torch.Tensor) -> bool:
    return (
        bool(len(vectors)) and bool(((vectors == 0) | (vectors == 1)).all()) and bool((vectors.sum(dim=1) == 1).all())
    )


def split_classes(shards, num_attributes: int, limit: int, split: str = "test", **stream) -> list[int] | None:
    """One-hot data (a class label): the classes of `split` in order of first appearance, at most
    `limit`; None when the vectors are not one-hot. With few classes (the digits) every class; with
    many (CUB's 200 species, of which a sample may hold 8) the ones the split really has, read until
    `limit` are found, so a grid shows different birds rather than the first test images' species."""
    if num_attributes <= ONE_HOT_LIMIT:
        batches = islice(eval_batches(shards, split, batch_size=COLUMNS, **stream), 1)
    else:
        batches = eval_batches(shards, split, batch_size=256, **stream)
    classes: list[int] = []
    for _, vectors in batches:
        if not is_one_hot(vectors):
            return None
        for index in vectors.argmax(dim=1).tolist():
            if index not in classes:
                classes.append(index)
        if len(classes) >= limit:
            break
    if not classes:
        return None
    return list(range(num_attributes))[:limit] if num_attributes <= ONE_HOT_LIMIT else classes[:limit]


def sample_conditions(shards, attributes: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Figure 3's columns: each class alone for one-hot data (every class when there are few, such as
    the digits; else the first ONE_HOT_LIMIT classes the test split holds), else the attribute
    vectors of the first COLUMNS test images (real combinations)."""
    classes = split_classes(shards, len(attributes), ONE_HOT_LIMIT)
    if classes is not None:
        return torch.eye(len(attributes))[classes], [attributes[i] for i in classes]
    _, vectors = next(iter(eval_batches(shards, "test", batch_size=COLUMNS)))
    return vectors.float(), [f"test image {i}" for i in range(len(vectors))]


@torch.no_grad()
def samples_figure(models: dict, shards, seed: int = NOISE_SEED):
    """Figure 3: one row per model, each the same conditions decoded from the same prior noise."""
    model = _first(models)
    conditions, names = sample_conditions(shards, list(model.spec.attributes))
    noise = torch.randn(len(conditions), model.spec.latent_dim, generator=torch.Generator().manual_seed(seed))
    rows = [m.generate(conditions.to(_device(m)), noise.to(_device(m))).float().cpu() for m in models.values()]
    image, layout = labelled_grid(rows, list(models), scale_for(model.spec.image_size))
    layout.update(conditions=names, noise_seed=seed)
    return image, layout


@torch.no_grad()
def reconstruction_figure(models: dict, shards, count: int = COLUMNS):
    """Figure 4: the first `count` test images, then one row of reconstructions (posterior mean) per model."""
    model = _first(models)
    images, attributes = next(iter(eval_batches(shards, "test", batch_size=count)))
    rows = [images.float()]
    for m in models.values():
        device = _device(m)
        mu, _ = m.encoder(images.to(device), attributes.to(device))
        rows.append(m.decoder(mu, attributes.to(device)).float().cpu())
    image, layout = labelled_grid(rows, ["ground truth", *models], scale_for(model.spec.image_size))
    layout.update(test_images=len(images))
    return image, layout


def attribute_rows(
    base: torch.Tensor,
    names: list[str],
    only: list[str] | None = None,
    frequencies: torch.Tensor | None = None,
    classes: list[int] | None = None,
) -> tuple[torch.Tensor, list[str], str]:
    """Figure 5's conditions: the base vector, then one change per row. One-hot data (a class label):
    the active class switched to each other class (of `classes` when given: the classes the data
    holds, for many-class labels such as CUB's species). Multi-hot: each attribute of `only` added when
    absent, removed when present; by default all of them when there are at most EDIT_LIMIT, else the
    EDIT_LIMIT whose `frequencies` (in the data) are closest to one half (CelebA: Smiling, Male...;
    CUB: common parts and colours rather than one-in-200 species bits), in the data's order.
    Returns (vectors [R, A], labels, mode)."""
    base = base.float()
    if only:  # matched in either Unicode normalization, then spelled (and labelled) as the model spells them
        index = attribute_index(names)
        columns = [attribute_column(index, name) for name in only]
        unknown = [name for name, column in zip(only, columns) if column is None]
        if unknown:
            raise UserError(
                f"Figure 5: unknown attribute(s) {', '.join(unknown)}; the model has {', '.join(names[:8])}{'...' if len(names) > 8 else ''}"
            )
        only = list(dict.fromkeys(names[column] for column in columns))
    if is_one_hot(base[None]) and (len(names) <= ONE_HOT_LIMIT or classes is not None):
        active = int(base.argmax())
        vectors, labels = [base], [f"base: {names[active]}"]
        for index in (
            (names.index(n) for n in only) if only else (classes if classes is not None else range(len(names)))
        ):
            if index != active:
                vectors.append(torch.nn.functional.one_hot(torch.tensor(index), len(names)).float())
                labels.append(f"-> {names[index]}")
        return torch.stack(vectors), labels, "switch class"
    if only:
        chosen = [names.index(n) for n in only]
    elif len(names) <= EDIT_LIMIT or frequencies is None:
        chosen = list(range(min(len(names), EDIT_LIMIT)))
    else:
        balance = (frequencies.float() - 0.5).abs().tolist()
        chosen = sorted(sorted(range(len(names)), key=lambda i: (balance[i], i))[:EDIT_LIMIT])
    present = [names[i] for i in range(len(names)) if base[i] > 0.5]
    vectors = [base]
    labels = [
        "base: "
        + (
            ", ".join(present[:2]) + (f" +{len(present) - 2}" if len(present) > 2 else "")
            if present
            else "no attributes"
        )
    ]
    for index in chosen:
        vector = base.clone()
        vector[index] = 0.0 if base[index] > 0.5 else 1.0
        vectors.append(vector)
        labels.append(("- " if base[index] > 0.5 else "+ ") + names[index])
    return torch.stack(vectors), labels, "toggle attribute"


@torch.no_grad()
def attribute_figure(model, shards, columns: int = COLUMNS, seed: int = NOISE_SEED, only: list[str] | None = None):
    """Figure 5: the first test image's attribute vector, then rows with one attribute changed, every
    row decoded from the same `columns` noise vectors."""
    names = list(model.spec.attributes)
    frequencies, classes = None, None
    if len(names) > EDIT_LIMIT:
        classes = split_classes(shards, len(names), EDIT_LIMIT + 1)  # many classes: switch among those the data has
        if not only and classes is None:  # many attributes: change the most balanced ones
            seen = torch.cat([a for _, a in islice(eval_batches(shards, "test", batch_size=256), FREQUENCY_BATCHES)])
            frequencies = seen.float().mean(dim=0)
    _, attributes = next(iter(eval_batches(shards, "test", batch_size=1)))
    vectors, labels, mode = attribute_rows(attributes[0], names, only, frequencies, classes)
    noise = torch.randn(columns, model.spec.latent_dim, generator=torch.Generator().manual_seed(seed))
    device = _device(model)
    rows = [model.generate(v.expand(columns, -1).to(device), noise.to(device)).float().cpu() for v in vectors]
    image, layout = labelled_grid(rows, labels, scale_for(model.spec.image_size))
    layout.update(mode=mode, base=[n for n, v in zip(names, attributes[0].tolist()) if v > 0.5], noise_seed=seed)
    return image, layout


def _device(model) -> torch.device:
    return next(model.parameters()).device


# --- loss curves ------------------------------------------------------------------------------------

CURVES = ("train/loss", "train/mse", "train/kl")


def read_scalars(run_dir, tags=CURVES) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from RUN/logs (every event file under it, tensorboard's
    EventAccumulator); a step logged twice (a resumed run) keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    found: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    logs = Path(run_dir) / LOGS
    folders = sorted({p.parent for p in logs.rglob("events.out.tfevents.*")}) if logs.is_dir() else []
    for folder in folders:
        accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
        accumulator.Reload()
        available = set(accumulator.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                for event in sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time):
                    found[tag][int(event.step)] = float(event.value)
    return {tag: sorted(points.items()) for tag, points in found.items()}


def loss_curves(runs: dict, path, title: str = "") -> dict:
    """train/loss, train/mse and train/kl against the step, one line per run (label -> run folder), one
    panel per quantity (log scale when positive). Written through a temporary name. Returns
    {label: {tag: points read}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {label: read_scalars(run_dir) for label, run_dir in runs.items()}
    figure, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.8), constrained_layout=True)
    for axis, tag in zip(axes, CURVES):
        positive = True
        for label, series in curves.items():
            points = series[tag]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, label=label, linewidth=1.2)
                positive = positive and min(values) > 0
        if positive and any(series[tag] for series in curves.values()):
            axis.set_yscale("log")
        axis.set_title(tag)
        axis.set_xlabel("step")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(figure)
    return {label: {tag: len(points) for tag, points in series.items()} for label, series in curves.items()}


def save_png(image, path) -> None:
    """Save a PIL image as PNG through a temporary name + rename."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
