"""What a cvae-tk sampler file claims, and whether its graph agrees (see toolkit/export.py for the format).

One check for every reader: `toolkit.export` before it writes a file, `toolkit.sampler.Sampler`
before it runs one, `cvae-tk inspect` before it describes one. Each gives the metadata_props and the
graph's declared inputs and outputs (names, element types, shapes); `read_contract` returns the
parsed claims or raises one UserError naming the file and what was expected. Standard library only,
so the sampler needs neither torch nor onnx.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from toolkit.errors import UserError

FORMAT = "sampler/1"
FORMAT_VERSION = 1
FLOAT_OUTPUT, UINT8_OUTPUT = "float32_nchw", "uint8_nhwc"
PRECISIONS = ("fp32", "fp16")
INPUTS = ("attributes", "noise", "temperature")
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


def _json(meta: Mapping[str, str], key: str, path):
    try:
        return json.loads(meta[key])
    except ValueError as error:
        raise UserError(f"{path}: metadata '{key}' is not valid JSON ({error}): {meta[key][:80]!r}") from None


def _integer(value, path, what: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise UserError(f"{path}: metadata declares {what} = {value!r}, expected an integer in 1..{limit}")
    return value


def _check_format(meta: Mapping[str, str], path) -> None:
    found = meta.get("cvae_tk.format")
    if found == FORMAT:
        return
    if found is None:
        raise UserError(f"{path} is an ONNX model but not a cvae-tk sampler export (no cvae_tk.format metadata)")
    newer = re.fullmatch(r"sampler/(\d+)", found.strip())
    if newer and int(newer.group(1)) > FORMAT_VERSION:
        by = f" (written by cvae-tk {meta['toolkit_version']})" if meta.get("toolkit_version") else ""
        raise UserError(f"{path} is a cvae-tk sampler of format {found}{by}, newer than this cvae-tk reads ({FORMAT}): upgrade cvae-tk")
    raise UserError(f"{path}: unknown cvae_tk.format {found[:40]!r}, expected {FORMAT}")


def read_contract(path, meta: Mapping[str, str], inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> Contract:
    """The file's claims, checked against each other and against its declared graph."""
    _check_format(meta, path)
    for key in ("attributes", "latent_dim", "image_size"):
        if key not in meta:
            raise UserError(f"{path}: metadata has no '{key}' (every {FORMAT} export records it)")

    attributes = _json(meta, "attributes", path)
    if not isinstance(attributes, list) or not attributes:
        raise UserError(f"{path}: metadata 'attributes' must be a non-empty JSON list of names, got {meta['attributes'][:80]!r}")
    if not all(isinstance(name, str) and name.strip() for name in attributes):
        raise UserError(f"{path}: metadata 'attributes' must be non-empty names (text), got {attributes[:5]!r}...")
    repeated = sorted({name for name in attributes if attributes.count(name) > 1})
    if repeated:
        raise UserError(f"{path}: metadata attributes must be distinct names, but {', '.join(map(repr, repeated[:5]))} {'appears' if len(repeated) == 1 else 'appear'} more than once")
    _integer(len(attributes), path, "attributes", MAX_WIDTH)

    if not re.fullmatch(r"[0-9]+", meta["latent_dim"].strip()):
        raise UserError(f"{path}: metadata declares latent_dim = {meta['latent_dim'][:40]!r}, expected an integer in 1..{MAX_WIDTH}")
    latent_dim = _integer(int(meta["latent_dim"]), path, "latent_dim", MAX_WIDTH)

    size = _json(meta, "image_size", path)
    if not isinstance(size, list) or len(size) != 2:
        raise UserError(f"{path}: metadata 'image_size' must be [height, width], got {meta['image_size'][:80]!r}")
    image_size = (_integer(size[0], path, "image height", MAX_SIDE), _integer(size[1], path, "image width", MAX_SIDE))

    output = meta.get("output", FLOAT_OUTPUT)  # files from before --uint8 existed have no 'output'
    if output not in (FLOAT_OUTPUT, UINT8_OUTPUT):
        raise UserError(f"{path}: metadata output = {output[:40]!r}, expected {FLOAT_OUTPUT} or {UINT8_OUTPUT}")
    precision = meta.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise UserError(f"{path}: metadata precision = {precision[:40]!r}, expected {' or '.join(PRECISIONS)}")
    if "value_range" in meta and _json(meta, "value_range", path) != [0, 1]:
        raise UserError(f"{path}: metadata value_range = {meta['value_range'][:40]}, expected [0, 1] (the only range cvae-tk samplers produce)")

    names = [tensor.name for tensor in inputs]
    if names[:2] != ["attributes", "noise"] or names[2:] not in ([], ["temperature"]):
        raise UserError(f"{path}: inputs {names}, expected attributes, noise (and optionally temperature)")
    if "inputs" in meta and _json(meta, "inputs", path) != names:
        raise UserError(f"{path}: metadata inputs = {meta['inputs'][:80]}, but the graph's inputs are {json.dumps(names)}")
    contract = Contract(tuple(attributes), latent_dim, image_size, output, precision, tuple(names))

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
    if shape is not None and (len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected))):
        raise UserError(
            f"{path}: output 'images' has shape {list(shape)}, expected [batch, {', '.join(map(str, expected))}] "
            f"(from the metadata: output={output}, image_size={list(image_size)})"
        )
    return contract
