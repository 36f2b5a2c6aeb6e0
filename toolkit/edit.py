"""Editing real images with a trained CVAE: encode, change attributes, decode; and interpolations.

    model = load_model("runs/digits")
    image = load_image("three.png")                              # any PIL format, any size
    edited = edit_image(model, image, {"digit_3": 1}, {"digit_3": 0, "digit_8": 1})   # PIL image, image's size
    frames = interpolate_attributes(model, {"digit_1": 1}, {"digit_7": 1}, steps=8, seed=0)  # list of PIL images
    save_strip(frames, "strip.png")

How an edit works: the image is prepared as the shard builder prepared the training images (and
as the ONNX Sampler and the web page prepare a photo): the centre crop the shards were built with
(`--crop center:N`; `run_crop` reads it from the run's shards), resized (bilinear) to the model's
H x W; it is encoded with its attributes y to the posterior mean z = mu(x, y); z is decoded with y'
(y with the changes applied) and the result is resized back to the crop and laid over it, so the
edit has the input's size (outside the crop it is the input). y is the image's full
attribute vector: given (a mapping: unnamed attributes are 0) or predicted by an attribute
classifier (`predict_attributes`: logit > 0, or the arg-max for a classifier trained on one-hot
vectors such as the digits). How well z separates "style" from the attributes is the model's
business: a short-trained model may keep some of the old attribute.

Interpolations: between two images, both are encoded (posterior means z_a, z_b) and
(1 - t) z_a + t z_b is decoded with (1 - t) y_a + t y_b, t = 0, 1/(steps-1), ..., 1, so the first
and last frames are exactly the decodings of the two endpoints. Between two attribute sets, one
prior noise vector (standard normal, seeded) is decoded while the attribute vector moves linearly
from one set to the other (through the model's prior, so a learned prior moves with it).
Frames have the model's size.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from toolkit.atomic import check_output as check_writable
from toolkit.atomic import check_writable_size, image_format
from toolkit.atomic import save_image as save_atomically
from toolkit.classifier import check_image_size, columns_for, load_classifier
from toolkit.devices import resolve_device
from toolkit.errors import UserError, check_seed, dimensions
from toolkit.evaluate import find_classifier
from toolkit.formats import RECIPE, attribute_columns, attribute_index
from toolkit.images import ImageError, centre_crop, open_image, to_uint8
from toolkit.memory import check_fits
from toolkit.model import ModelSpec, load_model, read_spec
from toolkit.paths import as_path

AttributeLike = Mapping[str, int] | Sequence[float] | np.ndarray | torch.Tensor


# --- attribute vectors ----------------------------------------------------------------------------


def unknown_attribute(name: str, names: Sequence[str]) -> UserError:
    """The sampler's message: close matches, then the valid names."""
    close = difflib.get_close_matches(name, list(names), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UserError(f"unknown attribute '{name}': {hint}valid attributes: {', '.join(names)}")


def _check_value(name: str, value) -> float:
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, (int, float, np.integer, np.floating)) or value not in (0, 1):
        raise UserError(f"attribute '{name}' must be 0 or 1, got {value!r}")
    return float(value)


def model_names(names: Sequence[str], mapping: Mapping[str, int]) -> dict[str, int]:
    """{name as given: 0 | 1} -> {the model's name: 0 | 1}: a name matches in either Unicode normalization
    ('é' as one code point or as 'e' + a combining accent, toolkit.formats.attribute_column), and is then
    spelled as the model spells it. Unknown names and values other than 0/1 are UserErrors, and so is one
    attribute given twice (two spellings) with two values."""
    names = list(names)
    columns = attribute_columns(
        attribute_index(names),
        mapping,
        lambda name: unknown_attribute(str(name), names),
        lambda name, value: int(_check_value(name, value)),
    )
    return {names[column]: value for column, value in columns.items()}


def attribute_vector(
    names: Sequence[str], attributes: AttributeLike, changes: Mapping[str, int] | None = None
) -> torch.Tensor:
    """A float32 0/1 vector [A] from a mapping (unnamed attributes 0) or a vector [A], with `changes`
    (a mapping) applied on top. Names are matched as `model_names` does; unknown names and values other
    than 0/1 are UserErrors."""
    names = list(names)
    column = {name: i for i, name in enumerate(names)}
    if isinstance(attributes, Mapping):
        vector = torch.zeros(len(names))
        for name, value in model_names(names, attributes).items():
            vector[column[name]] = value
    else:
        vector = torch.as_tensor(np.asarray(attributes, dtype=np.float32)).flatten().clone()
        if vector.numel() != len(names):
            raise UserError(
                f"attribute vector has {vector.numel()} values, the model {len(names)} attributes ({', '.join(names[:5])}...)"
            )
        if not bool(((vector == 0) | (vector == 1)).all()):
            raise UserError("attribute vector values must be 0 or 1")
    for name, value in model_names(names, changes or {}).items():
        vector[column[name]] = value
    return vector


def describe(names: Sequence[str], vector) -> str:
    """'digit_3' / 'Smiling, Young' / 'none': the attributes set to 1."""
    present = [name for name, value in zip(names, np.asarray(vector).tolist()) if value >= 0.5]
    return ", ".join(present) if present else "none"


# --- images -----------------------------------------------------------------------------------------


def load_image(path: str | Path) -> Image.Image:
    """An image file as RGB, as an image viewer shows it (toolkit.images: EXIF orientation, colour
    profile, transparency on white, 16-bit); a missing or unreadable file is a UserError."""
    path = as_path(path, "load_image(path): expected the image file")
    try:
        return open_image(path)
    except ImageError as error:
        raise UserError(str(error)) from None


def crop_box(image: Image.Image, crop: int | None) -> tuple[float, float, float, float]:
    """The region of `image` the model sees: the centre square of side `crop`, or all of it (None).
    An image smaller than the crop is a UserError (the Sampler's rule: no silent smaller crop)."""
    box = (0.0, 0.0, float(image.width), float(image.height))
    if crop is None:
        return box
    if crop > min(image.size):
        raise UserError(
            f"the image is {dimensions(image.width, image.height)}, smaller than the centre crop of {crop} the model's shards "
            f"were made with: give a photo framed as the data set's (at least {crop}x{crop})"
        )
    return centre_crop(box, crop)


def _to_tensor(image: Image.Image, size: tuple[int, int], crop: int | None = None) -> torch.Tensor:
    """PIL image -> [1, 3, H, W] in [0, 1] at size (H, W): the crop resized in one step (PIL's
    bilinear, the box in sub-pixel precision), as the shard builder does."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    height, width = size
    box = crop_box(image, crop)
    if image.size != (width, height) or crop is not None:
        image = image.resize((width, height), Image.BILINEAR, box=box)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def _to_images(batch: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> B PIL RGB images."""
    return [Image.fromarray(item) for item in to_uint8(batch.detach().float().cpu().numpy())]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def strip_size(steps: int, image_size: Sequence[int]) -> tuple[int, int]:
    """(width, height) of the strip save_strip makes of `steps` frames of the model's (H, W)."""
    height, width = image_size
    return int(steps) * int(width), int(height)


def check_strip(path: str | Path, steps: int, image_size: Sequence[int], option: str = "--out") -> None:
    """A UserError, before any frame is decoded, unless `path`'s format holds the strip of `steps`
    frames of (H, W) (WebP: 16,383 pixels per side, JPEG: 65,500)."""
    width, height = strip_size(steps, image_size)
    frame = dimensions(int(image_size[1]), int(image_size[0]))
    check_writable_size(path, width, height, f"a strip of {steps} frames of {frame}", "fewer --steps", option=option)


def side_by_side(original: Image.Image, edited: Image.Image) -> Image.Image:
    """original | edited (edit_image gives the original's size): (2 W) x H, RGB."""
    pair = Image.new("RGB", (2 * original.width, original.height))
    pair.paste(original if original.mode == "RGB" else original.convert("RGB"), (0, 0))
    pair.paste(edited if edited.mode == "RGB" else edited.convert("RGB"), (original.width, 0))
    return pair


# Copies of an RGB image of the input's size alive at once while `cvae-tk edit` works (measured: the
# original, the edit, the pair of two, and what the PNG encoder holds: 5 for 12000x12000, 3 GB)
EDIT_COPIES = 6


def check_pair(path: str | Path, image: Image.Image, option: str = "--out") -> None:
    """A UserError, before the model is loaded, unless `path`'s format holds side_by_side's pair for
    `image` and the memory available holds the edit's images."""
    what = f"the original | edit pair ({dimensions(image.width, image.height)} each)"
    check_writable_size(path, 2 * image.width, image.height, what, "a smaller image", option=option)
    check_fits(
        EDIT_COPIES * 3 * image.width * image.height,
        f"editing an image {dimensions(image.width, image.height)}",
        "give a smaller image",
    )


def save_strip(images: Sequence[Image.Image], path: str | Path) -> Path:
    """Paste images left to right (no padding) and save; the strip is sum(widths) x max(heights)."""
    path = as_path(path, "save_strip(images, path): expected the image file to write")
    strip = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
    left = 0
    for image in images:
        strip.paste(image.convert("RGB"), (left, 0))
        left += image.width
    return save_image(strip, path)


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save through a temporary name + rename (toolkit.atomic), the format from `path`'s extension."""
    path = as_path(path, "save_image(image, path): expected the image file to write")
    check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_atomically(image, path)


def check_output(path: str | Path, inputs=()) -> None:
    """A UserError unless `path` can take an image: an extension the toolkit writes (IMAGE_FORMATS),
    not a folder, in a folder that exists or can be made and is writable, none of the command's
    `inputs` (checked before any work is done)."""
    image_format(path)
    check_writable(path, inputs=inputs)


# --- attributes from a classifier -------------------------------------------------------------------


@torch.no_grad()
def attribute_probabilities(classifier, model, image: Image.Image, crop: int | None = None) -> dict[str, float]:
    """The classifier's probability of each of the model's attributes for `image` (prepared as for the model: `crop`)."""
    names = list(model.spec.attributes)
    columns = columns_for(classifier, names, "the model")
    check_image_size(classifier, model.spec.image_size, "the model")
    device = next(classifier.parameters()).device
    logits = classifier.eval()(_to_tensor(image, model.spec.image_size, crop).to(device))[0, columns.to(device)]
    return dict(zip(names, torch.sigmoid(logits.float()).cpu().tolist()))


def predict_attributes(
    classifier, model, image: Image.Image, one_hot: bool | None = None, crop: int | None = None
) -> dict[str, int]:
    """The image's attribute set as the classifier sees it: {name: 0 | 1} for every model attribute.

    Present = probability > 0.5; with `one_hot` exactly the most probable attribute is 1. one_hot=None
    takes it from the classifier's record: trained on one-hot vectors (classifier.json has a top-1
    test accuracy, e.g. the digits) -> True.
    """
    probabilities = attribute_probabilities(classifier, model, image, crop)
    if one_hot is None:
        one_hot = (getattr(classifier, "meta", None) or {}).get("test_accuracy", {}).get("top1") is not None
    if one_hot:
        best = max(probabilities, key=probabilities.get)
        return {name: int(name == best) for name in probabilities}
    return {name: int(p > 0.5) for name, p in probabilities.items()}


# --- editing and interpolation ----------------------------------------------------------------------


@torch.no_grad()
def encode(model, image: Image.Image, attributes: AttributeLike, crop: int | None = None) -> torch.Tensor:
    """The posterior mean z = mu(x, y) [Z] of `image` (its centre `crop`, resized to the model's size) with attributes y."""
    vector = attribute_vector(model.spec.attributes, attributes)
    device = _device(model)
    mu, _ = model.eval().encoder(_to_tensor(image, model.spec.image_size, crop).to(device), vector[None].to(device))
    return mu[0].float()


@torch.no_grad()
def edit_image(
    model,
    image: Image.Image,
    attributes: AttributeLike,
    changes: Mapping[str, int] | None = None,
    crop: int | None = None,
) -> Image.Image:
    """`image` re-drawn with `changes` applied to its `attributes`, at the input's size.

    attributes: the image's full set, a mapping (unnamed 0) or a 0/1 vector [A]; changes: {name: 0 | 1}.
    crop: the side of the centre crop the model's shards were built with (`run_crop`), None for the
    whole image; the edit of the crop is laid over it, the rest of the image is kept.
    No changes gives the model's reconstruction. The model stays on its device.
    """
    names = list(model.spec.attributes)
    before = attribute_vector(names, attributes)
    after = attribute_vector(names, before, changes)
    box = crop_box(image, crop)
    z = encode(model, image, before, crop)
    device = _device(model)
    decoded = _to_images(model.decoder(z[None].to(device), after[None].to(device)))[0]
    if crop is None:
        return decoded if decoded.size == image.size else decoded.resize(image.size, Image.BICUBIC)
    edited = image.convert("RGB") if image.mode != "RGB" else image.copy()
    edited.paste(decoded.resize((crop, crop), Image.BICUBIC), (round(box[0]), round(box[1])))
    return edited


DECODE_BATCH = 64  # frames decoded at once: the decoder's activations stay bounded for any --steps


def check_steps(steps: int, image_size: Sequence[int] | None = None) -> None:
    """steps >= 2; with the frames' (H, W), also that the frames and the strip fit in the memory
    available now (a UserError before anything is decoded)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise UserError(f"--steps must be an integer >= 2 (both ends are frames), got {steps!r}")
    if image_size is not None:
        height, width = image_size
        frame = height * width * 3  # uint8 RGB
        # the frames as images, the strip they are pasted into, and one decoded batch in float32
        needed = 2 * int(steps) * frame + DECODE_BATCH * frame * 4
        check_fits(
            needed, f"--steps {steps} (a strip of {steps} frames of {dimensions(width, height)})", "use fewer --steps"
        )


def _decode_frames(
    model, z: torch.Tensor | None, y: torch.Tensor, noise: torch.Tensor | None = None
) -> list[Image.Image]:
    """Decode frame by frame in batches of DECODE_BATCH: the posterior path (z) or the prior (noise)."""
    device = _device(model)
    frames: list[Image.Image] = []
    for start in range(0, len(y), DECODE_BATCH):
        part = slice(start, start + DECODE_BATCH)
        if z is not None:
            frames += _to_images(model.decoder(z[part].to(device), y[part].to(device)))
        else:
            frames += _to_images(model.eval().generate(y[part].to(device), noise[part].to(device)))
    return frames


@torch.no_grad()
def interpolate_images(
    model,
    image_a: Image.Image,
    attributes_a: AttributeLike,
    image_b: Image.Image,
    attributes_b: AttributeLike,
    steps: int = 8,
    crop: int | None = None,
) -> list[Image.Image]:
    """`steps` frames from image a to image b (their centre `crop`: see edit_image): z and the attribute
    vector both interpolated linearly. Frame 0 is the reconstruction of a, the last that of b (the model's size)."""
    check_steps(steps, model.spec.image_size)
    names = list(model.spec.attributes)
    ya, yb = attribute_vector(names, attributes_a), attribute_vector(names, attributes_b)
    za, zb = encode(model, image_a, ya, crop).cpu(), encode(model, image_b, yb, crop).cpu()
    t = torch.linspace(0, 1, steps)[:, None]
    return _decode_frames(model, (1 - t) * za + t * zb, (1 - t) * ya + t * yb)


@torch.no_grad()
def interpolate_attributes(
    model, start: AttributeLike, end: AttributeLike, steps: int = 8, seed: int = 0
) -> list[Image.Image]:
    """`steps` frames of one prior sample (noise: torch.randn(1, Z) of a CPU generator seeded with
    `seed`) while the attribute vector moves linearly from `start` to `end` (the model's size)."""
    check_steps(steps, model.spec.image_size)
    check_seed(seed)
    names = list(model.spec.attributes)
    ya, yb = attribute_vector(names, start), attribute_vector(names, end)
    noise = torch.randn(1, model.spec.latent_dim, generator=torch.Generator().manual_seed(int(seed)))
    t = torch.linspace(0, 1, steps)[:, None]
    return _decode_frames(model, None, (1 - t) * ya + t * yb, noise.expand(steps, -1))


# --- what the commands share ------------------------------------------------------------------------


def read_run_spec(run_dir: str | Path) -> ModelSpec:
    """The run's config.json (attribute names, image size): what the commands check before the
    model's weights are loaded. A path that is not a run folder is one UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.exists():
            raise UserError(
                f"{run_dir} is not a folder: expected a run folder written by `cvae-tk train` (an ONNX export "
                "edits photos through toolkit.sampler.Sampler.edit or `cvae-tk web`)"
            )
        raise UserError(f"run folder not found: {run_dir}")
    return read_spec(run_dir)


def load_run_model(run_dir: str | Path, device: str = "auto"):
    """load_model with a clear message for a path that is not a run folder; moved to the resolved device, eval mode."""
    read_run_spec(run_dir)
    model = load_model(run_dir)
    return model.to(resolve_device(device)).eval()


def run_crop(run_dir: str | Path, image_size: Sequence[int]) -> int | None:
    """The side of the centre crop the run's shards were built with (`--crop center:N`; from the
    train manifest of data.shards in RUN/recipe.yaml), None when they were not cropped, or when
    the images come with their own boxes (CUB's --bbox-crop: give the photo cropped). A run
    without recipe.yaml (a model saved by hand) has no shards: None. Shards that cannot be read
    give a warning and None (the photo is then resized whole)."""
    from toolkit.evaluate import run_shards
    from toolkit.export import shards_preprocessing

    if not (Path(run_dir) / RECIPE).is_file():
        return None
    try:
        crop = shards_preprocessing(run_shards(run_dir), image_size)["crop"]
    except UserError as error:
        print(
            f"warning: cannot tell how the training images were cropped ({error}); the image is resized whole",
            file=sys.stderr,
        )
        return None
    return crop["side"] if isinstance(crop, dict) else None


def find_run_classifier(run_dir: str | Path, model, folder: str | Path | None = None, attr_option: str = "--attr"):
    """(classifier, folder): `folder`, else the one `evaluate.find_classifier` finds for the run; loaded
    on the model's device and checked against its attributes and image size. None found is a UserError."""
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"classifier folder not found: {folder}")
    else:
        recipe = (model.spec.extra or {}).get("recipe")
        folder = find_classifier(run_dir, recipe)
        if folder is None:
            raise UserError(
                f"the image's attributes are needed and no attribute classifier was found for {run_dir} (looked for "
                f"RUN/../classifier{f' and RUN/../{recipe}-classifier' if recipe else ''}): pass them with {attr_option} NAME=1 "
                f"(the full set, unnamed are 0), or train a classifier with `cvae-tk classifier train recipe={recipe or 'NAME'}` "
                f"(or pass --classifier DIR)"
            )
    classifier = load_classifier(folder)
    try:
        columns_for(classifier, list(model.spec.attributes), "the model")
        check_image_size(classifier, model.spec.image_size, "the model")
    except UserError as error:
        raise UserError(f"classifier {folder}: {error}") from None
    return classifier.to(_device(model)), folder


class ImageAttributes:
    """An image's attribute set for the commands: the given mapping (the full set, unnamed 0), or else
    the classifier's prediction (`find_run_classifier`, loaded on first need and kept)."""

    def __init__(
        self,
        run_dir: str | Path,
        model,
        classifier_folder: str | Path | None = None,
        attr_option: str = "--attr",
        crop: int | None = None,
    ):
        self.run_dir, self.model, self.classifier_folder, self.attr_option, self.crop = (
            run_dir,
            model,
            classifier_folder,
            attr_option,
            crop,
        )
        if classifier_folder is not None and not Path(classifier_folder).is_dir():
            raise UserError(f"classifier folder not found: {classifier_folder}")
        self.classifier = None

    def __call__(self, image: Image.Image, given: Mapping[str, int] | None) -> tuple[dict[str, int], str]:
        """({name: 0 | 1} for every attribute, a one-line description of them and where they came from)."""
        names = list(self.model.spec.attributes)
        if given:
            vector = attribute_vector(names, given)
            return dict(zip(names, (int(v) for v in vector.tolist()))), f"{describe(names, vector)} (given)"
        if self.classifier is None:
            self.classifier, self.classifier_folder = find_run_classifier(
                self.run_dir, self.model, self.classifier_folder, self.attr_option
            )
        probabilities = attribute_probabilities(self.classifier, self.model, image, self.crop)
        predicted = predict_attributes(self.classifier, self.model, image, crop=self.crop)
        present = [f"{name} (p={probabilities[name]:.2f})" for name in names if predicted[name]]
        return predicted, f"{', '.join(present) or 'none'} (predicted by the classifier in {self.classifier_folder})"


def describe_changes(names: Sequence[str], attributes: Mapping[str, int], changes: Mapping[str, int]) -> str:
    """'digit_3 1 -> 0, digit_8 0 -> 1' (an unchanged value reads 'digit_3 stays 1')."""
    parts = []
    for name in names:
        if name in changes:
            old, new = int(attributes[name]), int(changes[name])
            parts.append(f"{name} {old} -> {new}" if old != new else f"{name} stays {new}")
    return ", ".join(parts) or "none"
