"""What a cvae-tk ONNX file claims, and whether its graph agrees (see toolkit/export.py for the formats).

Two formats: `sampler/1` (the decoder: attributes + noise -> images) and `encoder/1` (images +
attributes -> the posterior mean of z, written beside it by `cvae-tk export --encoder`). One check
for every reader: `toolkit.export` before it writes a file, `toolkit.sampler.Sampler` before it
runs one, `cvae-tk inspect` before it describes one. Each gives the metadata_props and the graph's
declared inputs and outputs (names, element types, shapes); `read_contract` (sampler) and
`read_encoder_contract` return the parsed claims or raise one UserError naming the file and what
was expected. Standard library only, so the sampler needs neither torch nor onnx.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from toolkit.errors import UserError
from toolkit.formats import (
    CONFIG,
    PRIORS,  # noqa: F401 (re-exported)
)

FORMAT = "sampler/1"
ENCODER_FORMAT = "encoder/1"
FORMAT_VERSION = 1  # of both formats; also the files' ModelProto.model_version
FLOAT_OUTPUT, UINT8_OUTPUT = "float32_nchw", "uint8_nhwc"
PRECISIONS = ("fp32", "fp16", "int8")
INPUTS = ("attributes", "noise", "temperature")
ENCODER_INPUTS = ("images", "attributes")
# The encoder's outputs, all float32 [batch, Z]: the posterior's mean and log-variance given the
# image and its attributes, and for a learned prior also the prior's, p(z | attributes), which a
# client needs to turn a z into the decoder's `noise` input (see toolkit.sampler.Sampler.edit).
ENCODER_OUTPUTS = ("mean", "logvar")
PRIOR_OUTPUTS = ("prior_mean", "prior_logvar")
RESIZE, VALUE_RANGE, LAYOUT, CHANNELS = "bilinear", [0, 1], "NCHW", "RGB"
# Sanity limits for what a file may declare: far beyond any real model, small enough that a
# hostile or broken file is refused before it asks for terabytes.
MAX_SIDE = 8192
MAX_WIDTH = 65536  # attributes or latent units


@dataclass(frozen=True)
class Tensor:
    """A graph input or output as the file declares it. dtype: numpy's name (float32, uint8...);
    shape: one entry per axis, an int for a fixed size, a str or None for a dynamic one; None when
    the file declares no shape (then only running the graph tells)."""

    name: str
    dtype: str
    shape: tuple | None


@dataclass(frozen=True)
class Contract:
    attributes: tuple[str, ...]
    latent_dim: int
    image_size: tuple[int, int]
    output: str  # FLOAT_OUTPUT or UINT8_OUTPUT
    precision: str
    inputs: tuple[str, ...]
    prior: str = "standard"
    weights_sha256: str | None = None

    @property
    def uint8(self) -> bool:
        return self.output == UINT8_OUTPUT

    @property
    def temperature_input(self) -> bool:
        return "temperature" in self.inputs

    @property
    def image_dims(self) -> tuple[int, int, int]:
        """The output's per-image shape: (H, W, 3) for uint8, (3, H, W) for float32."""
        height, width = self.image_size
        return (height, width, 3) if self.uint8 else (3, height, width)

    @property
    def output_dtype(self) -> str:
        return "uint8" if self.uint8 else "float32"


@dataclass(frozen=True)
class Preprocessing:
    """How an image is prepared for the encoder, as the run's shards were made: crop (None; an int,
    the side of a centred square; or "bbox", a box around the object that only the data set knows,
    so a client must give the photo already cropped), then a bilinear resize to size (H, W), values
    in [0, 1], RGB, NCHW."""

    crop: int | str | None
    size: tuple[int, int]


@dataclass(frozen=True)
class EncoderContract:
    attributes: tuple[str, ...]
    latent_dim: int
    image_size: tuple[int, int]
    precision: str
    prior: str
    outputs: tuple[str, ...]
    preprocessing: Preprocessing
    weights_sha256: str | None


def check_model_file(path: Path, what: str = "model") -> None:
    """A UserError unless `path` is a regular file: missing, a folder and a device or pipe (which
    would read as nothing, or block) each said as such."""
    if path.is_file():
        return
    if not path.exists():
        raise UserError(f"{what} file not found: {path}")
    kind = "a folder" if path.is_dir() else "not a regular file (a device, a pipe or a socket)"
    hint = f"; it is a run: export it with `cvae-tk export --onnx {path}`" if (path / CONFIG).is_file() else ""
    raise UserError(f"{path} is {kind}: expected an ONNX file written by `cvae-tk export`{hint}")


def _json(meta: Mapping[str, str], key: str, path):
    try:
        return json.loads(meta[key])
    except ValueError as error:
        raise UserError(f"{path}: metadata '{key}' is not valid JSON ({error}): {meta[key][:80]!r}") from None


def _integer(value, path, what: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise UserError(f"{path}: metadata declares {what} = {value!r}, expected an integer in 1..{limit}")
    return value


def _check_format(meta: Mapping[str, str], path, expected: str = FORMAT) -> None:
    found = meta.get("cvae_tk.format")
    if found == expected:
        return
    kind = expected.split("/")[0]
    if found is None:
        raise UserError(f"{path} is an ONNX model but not a cvae-tk {kind} export (no cvae_tk.format metadata)")
    if found in (FORMAT, ENCODER_FORMAT):  # the other file of an export
        if expected == FORMAT:
            name = Path(path).name
            decoder = Path(path).with_name(
                name[: -len("-encoder.onnx")] + ".onnx" if name.endswith("-encoder.onnx") else "OUT.onnx"
            )
            raise UserError(
                f"{path} is a cvae-tk encoder ({found}), not a sampler: open the decoder beside it, {decoder} "
                f"(`cvae-tk sample {decoder}`, or Sampler('{decoder}'), which finds the encoder itself)"
            )
        raise UserError(
            f"{path} is a cvae-tk sampler ({found}), not an encoder: `cvae-tk export --onnx RUN --encoder` writes one"
        )
    newer = re.fullmatch(rf"{kind}/(\d+)", found.strip())
    if newer and int(newer.group(1)) > FORMAT_VERSION:
        by = f" (written by cvae-tk {meta['toolkit_version']})" if meta.get("toolkit_version") else ""
        raise UserError(
            f"{path} is a cvae-tk {kind} of format {found}{by}, newer than this cvae-tk reads ({expected}): upgrade cvae-tk"
        )
    raise UserError(f"{path}: unknown cvae_tk.format {found[:40]!r}, expected {expected}")


def _model_claims(meta: Mapping[str, str], path, expected: str) -> tuple[list[str], int, tuple[int, int], str, str]:
    """(attributes, latent_dim, image_size, precision, prior): what both formats record alike."""
    _check_format(meta, path, expected)
    for key in ("attributes", "latent_dim", "image_size"):
        if key not in meta:
            raise UserError(f"{path}: metadata has no '{key}' (every {expected} export records it)")

    attributes = _json(meta, "attributes", path)
    if not isinstance(attributes, list) or not attributes:
        raise UserError(
            f"{path}: metadata 'attributes' must be a non-empty JSON list of names, got {meta['attributes'][:80]!r}"
        )
    if not all(isinstance(name, str) and name.strip() for name in attributes):
        raise UserError(f"{path}: metadata 'attributes' must be non-empty names (text), got {attributes[:5]!r}...")
    repeated = sorted({name for name in attributes if attributes.count(name) > 1})
    if repeated:
        raise UserError(
            f"{path}: metadata attributes must be distinct names, but {', '.join(map(repr, repeated[:5]))} {'appears' if len(repeated) == 1 else 'appear'} more than once"
        )
    _integer(len(attributes), path, "attributes", MAX_WIDTH)

    if not re.fullmatch(r"[0-9]+", meta["latent_dim"].strip()):
        raise UserError(
            f"{path}: metadata declares latent_dim = {meta['latent_dim'][:40]!r}, expected an integer in 1..{MAX_WIDTH}"
        )
    latent_dim = _integer(int(meta["latent_dim"]), path, "latent_dim", MAX_WIDTH)

    size = _json(meta, "image_size", path)
    if not isinstance(size, list) or len(size) != 2:
        raise UserError(f"{path}: metadata 'image_size' must be [height, width], got {meta['image_size'][:80]!r}")
    image_size = (_integer(size[0], path, "image height", MAX_SIDE), _integer(size[1], path, "image width", MAX_SIDE))

    precision = meta.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise UserError(f"{path}: metadata precision = {precision[:40]!r}, expected {' or '.join(PRECISIONS)}")
    if "value_range" in meta and _json(meta, "value_range", path) != [0, 1]:
        raise UserError(
            f"{path}: metadata value_range = {meta['value_range'][:40]}, expected [0, 1] (the only range cvae-tk samplers produce)"
        )
    prior = meta.get("prior", "standard")
    if prior not in PRIORS:
        raise UserError(f"{path}: metadata prior = {prior[:40]!r}, expected {' or '.join(PRIORS)}")
    return attributes, latent_dim, image_size, precision, prior


def read_contract(path, meta: Mapping[str, str], inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> Contract:
    """The file's claims, checked against each other and against its declared graph."""
    attributes, latent_dim, image_size, precision, prior = _model_claims(meta, path, FORMAT)
    output = meta.get("output", FLOAT_OUTPUT)  # files from before --uint8 existed have no 'output'
    if output not in (FLOAT_OUTPUT, UINT8_OUTPUT):
        raise UserError(f"{path}: metadata output = {output[:40]!r}, expected {FLOAT_OUTPUT} or {UINT8_OUTPUT}")

    names = [tensor.name for tensor in inputs]
    if names[:2] != ["attributes", "noise"] or names[2:] not in ([], ["temperature"]):
        raise UserError(f"{path}: inputs {names}, expected attributes, noise (and optionally temperature)")
    if "inputs" in meta and _json(meta, "inputs", path) != names:
        raise UserError(
            f"{path}: metadata inputs = {meta['inputs'][:80]}, but the graph's inputs are {json.dumps(names)}"
        )
    contract = Contract(
        tuple(attributes), latent_dim, image_size, output, precision, tuple(names), prior, meta.get("weights_sha256")
    )

    widths = {"attributes": len(attributes), "noise": latent_dim}
    for tensor in inputs:
        if tensor.dtype != "float32":
            raise UserError(f"{path}: input '{tensor.name}' is {tensor.dtype}, expected float32")
        if tensor.shape is None:
            continue
        if tensor.name == "temperature":
            if list(tensor.shape) != [1]:
                raise UserError(f"{path}: input 'temperature' has shape {list(tensor.shape)}, expected [1]")
        elif len(tensor.shape) != 2 or (isinstance(tensor.shape[1], int) and tensor.shape[1] != widths[tensor.name]):
            raise UserError(
                f"{path}: input '{tensor.name}' has shape {list(tensor.shape)}, expected [batch, {widths[tensor.name]}] (from the metadata)"
            )

    images = next((tensor for tensor in outputs if tensor.name == "images"), None)
    if images is None:
        raise UserError(f"{path}: no output named 'images' (outputs: {', '.join(t.name for t in outputs) or 'none'})")
    if images.dtype != contract.output_dtype:
        raise UserError(
            f"{path}: output 'images' is {images.dtype}, but the metadata says output={output} ({contract.output_dtype})"
        )
    expected = list(contract.image_dims)
    shape = images.shape
    if shape is not None and (
        len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected))
    ):
        raise UserError(
            f"{path}: output 'images' has shape {list(shape)}, expected [batch, {', '.join(map(str, expected))}] "
            f"(from the metadata: output={output}, image_size={list(image_size)})"
        )
    return contract


def preprocessing_dict(crop: int | str | None, size: tuple[int, int]) -> dict:
    """The JSON of an encoder's `preprocessing` metadata (the encoder/1 contract)."""
    if isinstance(crop, int) and not isinstance(crop, bool):
        crop = {"kind": "center", "side": crop}
    return {
        "crop": crop,
        "size": [int(size[0]), int(size[1])],
        "resize": RESIZE,
        "value_range": list(VALUE_RANGE),
        "layout": LAYOUT,
        "channels": CHANNELS,
    }


def _preprocessing(meta: Mapping[str, str], path, image_size: tuple[int, int]) -> Preprocessing:
    if "preprocessing" not in meta:
        raise UserError(
            f"{path}: metadata has no 'preprocessing' (every {ENCODER_FORMAT} export records how its images are prepared)"
        )
    value = _json(meta, "preprocessing", path)
    shown = meta["preprocessing"][:120]
    if not isinstance(value, dict):
        raise UserError(f"{path}: metadata 'preprocessing' must be a JSON object, got {shown!r}")
    expected = {
        "resize": RESIZE,
        "value_range": VALUE_RANGE,
        "layout": LAYOUT,
        "channels": CHANNELS,
        "size": list(image_size),
    }
    for key, want in expected.items():
        if value.get(key) != want:
            raise UserError(
                f"{path}: metadata preprocessing {key} = {json.dumps(value.get(key))}, expected {json.dumps(want)}"
                f"{' (the image_size)' if key == 'size' else ''}"
            )
    crop = value.get("crop")
    if crop is None or crop == "bbox":
        return Preprocessing(crop, image_size)
    if isinstance(crop, dict) and crop.get("kind") == "center" and set(crop) == {"kind", "side"}:
        side = crop["side"]
        if not isinstance(side, bool) and isinstance(side, int) and 1 <= side <= 16 * MAX_SIDE:
            return Preprocessing(side, image_size)
    raise UserError(
        f'{path}: metadata preprocessing crop = {json.dumps(crop)[:80]}, expected null, "bbox" or '
        f'{{"kind": "center", "side": N}}'
    )


def encoder_outputs(prior: str) -> tuple[str, ...]:
    return ENCODER_OUTPUTS + (PRIOR_OUTPUTS if prior == "learned" else ())


def read_encoder_contract(
    path, meta: Mapping[str, str], inputs: Sequence[Tensor], outputs: Sequence[Tensor]
) -> EncoderContract:
    """An encoder/1 file's claims, checked against each other and against its declared graph:
    inputs images float32 [batch, 3, H, W] and attributes float32 [batch, A], outputs float32
    [batch, Z] (`encoder_outputs` of its prior), preprocessing as `preprocessing_dict` writes it."""
    attributes, latent_dim, image_size, precision, prior = _model_claims(meta, path, ENCODER_FORMAT)
    preprocessing = _preprocessing(meta, path, image_size)

    names = [tensor.name for tensor in inputs]
    if names != list(ENCODER_INPUTS):
        raise UserError(f"{path}: inputs {names}, expected {', '.join(ENCODER_INPUTS)}")
    if "inputs" in meta and _json(meta, "inputs", path) != names:
        raise UserError(
            f"{path}: metadata inputs = {meta['inputs'][:80]}, but the graph's inputs are {json.dumps(names)}"
        )
    height, width = image_size
    shapes = {"images": [3, height, width], "attributes": [len(attributes)]}
    for tensor in inputs:
        if tensor.dtype != "float32":
            raise UserError(f"{path}: input '{tensor.name}' is {tensor.dtype}, expected float32")
        want = shapes[tensor.name]
        if tensor.shape is not None and (
            len(tensor.shape) != 1 + len(want)
            or any(isinstance(d, int) and d != e for d, e in zip(tensor.shape[1:], want))
        ):
            raise UserError(
                f"{path}: input '{tensor.name}' has shape {list(tensor.shape)}, expected [batch, {', '.join(map(str, want))}] (from the metadata)"
            )

    wanted = list(encoder_outputs(prior))
    found = [tensor.name for tensor in outputs]
    if found != wanted:
        raise UserError(f"{path}: outputs {found}, expected {', '.join(wanted)} (a {prior} prior's encoder)")
    if "outputs" in meta and _json(meta, "outputs", path) != found:
        raise UserError(
            f"{path}: metadata outputs = {meta['outputs'][:80]}, but the graph's outputs are {json.dumps(found)}"
        )
    for tensor in outputs:
        if tensor.dtype != "float32":
            raise UserError(f"{path}: output '{tensor.name}' is {tensor.dtype}, expected float32")
        if tensor.shape is not None and (
            len(tensor.shape) != 2 or (isinstance(tensor.shape[1], int) and tensor.shape[1] != latent_dim)
        ):
            raise UserError(
                f"{path}: output '{tensor.name}' has shape {list(tensor.shape)}, expected [batch, {latent_dim}] (latent_dim)"
            )
    return EncoderContract(
        tuple(attributes),
        latent_dim,
        image_size,
        precision,
        prior,
        tuple(found),
        preprocessing,
        meta.get("weights_sha256"),
    )


def encoder_beside(decoder) -> Path:
    """OUT-encoder.onnx beside the decoder OUT.onnx: where `cvae-tk export --encoder` writes the
    encoder and where the Sampler and `cvae-tk web` look for it."""
    decoder = Path(decoder)
    return decoder.with_name(f"{decoder.stem}-encoder{decoder.suffix}")


INT8_SUFFIX = "-int8"  # `cvae-tk export --int8` writes OUT-int8.onnx beside the fp32 OUT.onnx (toolkit.quantize)


def _int8_source(decoder, contract: Contract) -> Path | None:
    """The fp32 export OUT.onnx an int8 file OUT-int8.onnx was quantized from (by its name), else None."""
    decoder = Path(decoder)
    if contract.precision != "int8" or not decoder.stem.endswith(INT8_SUFFIX) or decoder.stem == INT8_SUFFIX:
        return None
    return decoder.with_name(decoder.stem[: -len(INT8_SUFFIX)] + decoder.suffix)


def find_encoder(decoder, contract: Contract) -> Path:
    """Where the Sampler and `cvae-tk web` find a decoder's encoder: OUT-encoder.onnx beside it; for
    an int8 file OUT-int8.onnx, which has no encoder of its own (`cvae-tk export --int8 --encoder`
    writes OUT.onnx, OUT-encoder.onnx and OUT-int8.onnx), also the fp32 export's OUT-encoder.onnx
    (check_pair still requires the same weights). The first that exists, else OUT-encoder.onnx."""
    names = encoder_candidates(decoder, contract)
    return next((name for name in names if name.is_file()), names[0])


def encoder_candidates(decoder, contract: Contract) -> list[Path]:
    """The names find_encoder looks for, in its order: OUT-encoder.onnx, and for an int8 OUT-int8.onnx
    also OUT-encoder.onnx of its fp32 export (an error for a missing encoder names them all)."""
    names = [encoder_beside(decoder)]
    source = _int8_source(decoder, contract)
    if source is not None:
        names.append(encoder_beside(source))
    return names


def export_command(decoder, contract: Contract) -> str:
    """The `cvae-tk export` command that writes `decoder` again, as it is (its variant flags), with its
    encoder: advice that names only `--out decoder --encoder` would replace an fp16, uint8,
    temperature or int8 file with a plain fp32 one."""
    source = _int8_source(decoder, contract)
    if contract.precision == "int8" and source is None:  # renamed: which fp32 file it came from is not known
        return "`cvae-tk export --onnx RUN --int8 --encoder` (its fp32 export's encoder: pass encoder=PATH)"
    flags = [
        *(["--fp16"] if contract.precision == "fp16" else []),
        *(["--uint8"] if contract.uint8 else []),
        *(["--temperature-input"] if contract.temperature_input else []),
        *(["--int8"] if source is not None else []),
    ]
    return f"`cvae-tk export --onnx RUN --out {source or decoder} {' '.join([*flags, '--encoder'])}`"


def check_pair(decoder_path, decoder: Contract, encoder_path, encoder: EncoderContract) -> None:
    """Refuse an encoder that is not this decoder's: other attributes, latent_dim, image_size or
    prior, or other weights (weights_sha256, when both record it)."""
    ours = (decoder.attributes, decoder.latent_dim, decoder.image_size, decoder.prior)
    theirs = (encoder.attributes, encoder.latent_dim, encoder.image_size, encoder.prior)
    for what, mine, other in zip(("attributes", "latent_dim", "image_size", "prior"), ours, theirs):
        if mine != other:
            shown = lambda value: list(value) if isinstance(value, tuple) else value  # noqa: E731
            raise UserError(
                f"{encoder_path} is not the encoder of {decoder_path}: its {what} is {shown(other)}, the decoder's {shown(mine)}"
            )
    weights = decoder.weights_sha256
    if weights and encoder.weights_sha256 and weights != encoder.weights_sha256:
        raise UserError(
            f"{encoder_path} is not the encoder of {decoder_path}: they were exported from different weights "
            f"(weights_sha256 {encoder.weights_sha256[:12]}... vs {weights[:12]}...); export both again with "
            f"{export_command(decoder_path, decoder)}"
        )
