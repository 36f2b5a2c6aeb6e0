"""`cvae-tk inspect MODEL.onnx`: what an exported sampler (or encoder) holds, read from the file without running it.

Imports onnx only (no torch, no onnxruntime): the file is parsed, never executed, and external data
is not followed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from toolkit.contract import (
    ENCODER_FORMAT,
    Contract,
    EncoderContract,
    Tensor,
    check_model_file,
    read_contract,
    read_encoder_contract,
)
from toolkit.errors import UserError, one_line, printable

SHOWN_ATTRIBUTES = 5  # names listed after the attributes count
MAX_PROTOBUF = 2**31 - 1  # bytes: the most a protobuf message, so an ONNX file, can hold
SHOWN_CHARACTERS = 300  # of a metadata value: a file may carry megabytes of text in one


def _size(size: int) -> str:
    """'268029 bytes (261.7 KiB)'."""
    human, unit = float(size), "bytes"
    for bigger in ("KiB", "MiB", "GiB"):
        if human < 1024:
            break
        human, unit = human / 1024, bigger
    return f"{size} bytes" if unit == "bytes" else f"{size} bytes ({human:.1f} {unit})"


def _dtype(elem_type: int) -> str:
    from onnx import TensorProto, helper

    try:
        return helper.tensor_dtype_to_np_dtype(elem_type).name  # float32, float16, uint8...
    except Exception:
        return (
            TensorProto.DataType.Name(elem_type).lower()
            if elem_type in TensorProto.DataType.values()
            else f"type {elem_type}"
        )


def _value(value_info) -> str:
    """'float32 [batch, 10]': element type and shape, a dynamic dim by its name ('?' when unnamed)."""
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        return kind or "unknown type"
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return f"{_dtype(tensor.elem_type)} (shape unknown)"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return f"{_dtype(tensor.elem_type)} [{', '.join(dims)}]"


def _tensor(value_info) -> Tensor:
    """A graph input or output for the contract check (a dynamic dim by its name or None)."""
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        return Tensor(value_info.name, kind or "unknown type", None)
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return Tensor(value_info.name, _dtype(tensor.elem_type), None)
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    return Tensor(value_info.name, _dtype(tensor.elem_type), dims)


def _cut(text: str) -> str:
    return f"{text[:SHOWN_CHARACTERS]}... ({len(text):,} characters)" if len(text) > SHOWN_CHARACTERS else text


def _attributes(text: str) -> str:
    try:
        names = json.loads(text)
        if not isinstance(names, list):
            raise ValueError
    except ValueError:
        return text
    shown = ", ".join(map(str, names[:SHOWN_ATTRIBUTES])) + (", ..." if len(names) > SHOWN_ATTRIBUTES else "")
    return f"{len(names)} ({shown})"


def check_contract(path, proto) -> Contract | EncoderContract:
    """The file's claims (toolkit.contract: a sampler/1 file, or an encoder/1 one), checked against
    the types and shapes its graph computes (ONNX shape inference: the graph is not run), not only
    those it declares."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as error:  # InferenceError, or a ValidationError for a graph onnx cannot read
        message = one_line(error).replace("[ShapeInferenceError] Inference error(s): ", "")
        raise UserError(
            f"{path}: the graph computes other types or shapes than it declares: {message[:300]}"
        ) from None
    initializers = {init.name for init in inferred.graph.initializer}
    inputs = [_tensor(value) for value in inferred.graph.input if value.name not in initializers]
    meta = {entry.key: entry.value for entry in proto.metadata_props}
    # any version: its reader says which it takes
    encoder = str(meta.get("cvae_tk.format", "")).startswith(ENCODER_FORMAT.split("/")[0] + "/")
    read = read_encoder_contract if encoder else read_contract
    return read(path, meta, inputs, [_tensor(value) for value in inferred.graph.output])


def load_checked(path: Path):
    """(ModelProto, its checked contract: `check_contract`) of a cvae-tk ONNX file (sampler or
    encoder); a missing file, a file that is not ONNX or one that breaks the contract is one
    UserError. External data is not followed."""
    import onnx

    check_model_file(path)
    size = path.stat().st_size
    if size > MAX_PROTOBUF:  # said before the whole file is read into memory (it took 30 s and 3 GB for 3 GB)
        raise UserError(
            f"{path} is not an ONNX model: it is {_size(size)}, and an ONNX file holds at most 2 GiB "
            "(protobuf's limit: larger models keep their weights in external data files)"
        )
    try:
        # by its content: onnx.load would take a file named .json or .txt for its text formats
        proto = onnx.load(str(path), format="protobuf", load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends
        raise UserError(f"{path} is not an ONNX model: {one_line(error) or type(error).__name__}") from None
    if not proto.HasField("graph") or not proto.ir_version:
        # protobuf parses some non-ONNX bytes (an empty file, say) into an empty message
        raise UserError(f"{path} is not an ONNX model (no graph in it)")
    return proto, check_contract(path, proto)


def inspect_onnx(path: str | os.PathLike) -> list[str]:
    """The lines `cvae-tk inspect` prints: `key: value` each (a sampler or an encoder file). A file
    that is not ONNX, an ONNX model without cvae-tk metadata, or one whose graph disagrees with its metadata is a UserError (the
    graph is not run; the Sampler also runs it once)."""
    path = Path(path)
    proto, _ = load_checked(path)
    meta = {entry.key: entry.value for entry in proto.metadata_props}
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]

    opsets = {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}
    others = "".join(f", {domain} {version}" for domain, version in sorted(opsets.items()) if domain != "ai.onnx")
    lines = [
        f"file: {path}",  # printable below: bytes that are not UTF-8 as \\xNN
        f"file size: {_size(path.stat().st_size)}",
        f"graph opset: {opsets.get('ai.onnx', '?')}{others}",
        f"producer: {' '.join(filter(None, (proto.producer_name, proto.producer_version))) or '?'}",
        f"model_version: {proto.model_version}",
    ]
    for key, value in meta.items():
        lines.append(f"{_cut(key)}: {_cut(_attributes(value) if key == 'attributes' else value)}")
    for value in inputs:
        lines.append(f"input {value.name}: {_value(value)}")
    for value in proto.graph.output:
        lines.append(f"output {value.name}: {_value(value)}")
    return [printable(line) for line in lines]  # a file's own text: no forged lines, no terminal escapes
