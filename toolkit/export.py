"""Export a trained run's conditional decoder as a complete ONNX sampler (and its encoder, for editing).

    cvae-tk export --onnx runs/digits                      -> export/digits.onnx
    cvae-tk export --onnx runs/digits --fp16 --uint8       -> export/digits-fp16-uint8.onnx
    cvae-tk export --onnx runs/digits --encoder            -> export/digits.onnx and export/digits-encoder.onnx

The graph (the contract that `toolkit.sampler` and any application rely on):
    inputs   attributes  float32 [B, A]  0/1 per attribute, in the order of the metadata's names
             noise       float32 [B, Z]  standard normal, whatever the model's prior: with the learned
                                         prior the graph computes z = mu_p(x) + exp(0.5 logvar_p(x)) * noise
             temperature float32 [1]     only with --temperature-input: the graph uses noise * temperature
                                         (it scales the prior's standard deviation; 0 gives the prior's mean)
    output   images      float32 [B, 3, H, W] in [0, 1], or with --uint8
                         uint8 [B, H, W, 3] = round(clip(x, 0, 1) * 255)
B is dynamic. With --fp16 the weights and the arithmetic are float16; inputs and outputs keep the
types above (the casts are inside the graph). One self-contained file. metadata_props (all strings;
JSON where noted):
    cvae_tk.format = "sampler/1", attributes (JSON list), latent_dim, image_size (JSON [H, W]),
    value_range (JSON [0, 1]), recipe, step, beta, arch, prior (standard | learned), toolkit_version,
    precision (fp32 | fp16), output (float32_nchw | uint8_nhwc), inputs (JSON list of input names, in
    order), weights_sha256 (of the run's model.safetensors bytes), opset, and run_id (the run's random
    identity, 32 hex digits, kept by every resume of it; absent for a run trained before identities).

Parity with the fp32 PyTorch model is checked on ONNX Runtime's CPU provider at batch sizes 1, 3 and
17 (and at temperatures 1 and 0.7 when the graph takes one) before the file is written: it goes to a
temporary name and is renamed only once the check passes. Limits: max abs difference < 1e-4 (fp32),
< 1e-2 (fp16); uint8 output: at most 1 grey level from the quantized PyTorch output (fp16: 3).

The encoder (--encoder: OUT-encoder.onnx beside OUT.onnx; always fp32, whatever the decoder's
variant, since editing is a one-image job and its outputs feed the decoder's noise):
    inputs   images      float32 [B, 3, H, W]  RGB in [0, 1], prepared as `preprocessing` says
             attributes  float32 [B, A]        the image's attributes, 0/1
    outputs  mean, logvar float32 [B, Z]       the posterior q(z | image, attributes)
             prior_mean, prior_logvar [B, Z]   learned prior only: p(z | attributes)
metadata_props: the decoder's keys with cvae_tk.format = "encoder/1", precision fp32, output "mean",
inputs ["images", "attributes"], outputs (JSON list), and preprocessing (JSON: crop null |
{"kind": "center", "side": N} | "bbox", size [H, W], resize "bilinear", value_range [0, 1], layout
"NCHW", channels "RGB"), read from the build options in the manifest of the run's shards (data.shards
of RUN/recipe.yaml). Parity as the decoder's fp32 check (every output, < 1e-4, batches 1, 3, 17).
Both files are made and checked before either is written, so a failing encoder leaves the old
files as they were.

The default names (`default_path`, and the encoder and int8 files beside it) belong to the run of a
folder name, but two runs may share one (runs/a/digits, runs/b/digits): a default name that holds an
export of another run (its run_id) is refused before any work (`check_default_outputs`), so that one
run's model is never lost to the other's. The same run exported again replaces its files, as an
older export without a run_id is replaced; --out replaces whatever it names.

Every file is one that generic ONNX tools take: no stale shape entries (graph.value_info) for the
weights, which onnxruntime.quantization's quantize_dynamic tripped over, and ModelProto.model_version
is the format version (1): it says which contract the file follows, which is what a tool or server
that reads only the ModelProto can act on (the toolkit version, "0.1.0", fits no int64; the run's
step is in the metadata).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.torch import save

import toolkit
from toolkit.atomic import atomic_path, check_output, describe_os_error, hidden_beside, through_link
from toolkit.contract import (
    ENCODER_FORMAT,
    ENCODER_INPUTS,
    FLOAT_OUTPUT,
    FORMAT_VERSION,
    UINT8_OUTPUT,
    encoder_beside,
    encoder_outputs,
    preprocessing_dict,
)
from toolkit.data.stream import read_manifest
from toolkit.errors import UserError, cut, one_line, printable
from toolkit.evaluate import run_shards
from toolkit.formats import RUN_ID
from toolkit.images import to_uint8
from toolkit.inspection import check_contract
from toolkit.model import CONFIG, CVAE, WEIGHTS, PaperEncoder, load_model, read_spec
from toolkit.paths import as_path
from toolkit.sessions import file_metadata

OPSET = 18
MIN_OPSET = 18  # torch's exporter writes opset 18+; its down-conversion breaks graphs (e.g. Split)
FORMAT = "sampler/1"
PARITY_BATCHES = (1, 3, 17)
PARITY_TEMPERATURE = 0.7  # checked as well as 1 when the graph takes a temperature
PARITY_TOLERANCE = 1e-4  # fp32, float output: max abs difference (strictly below)
FP16_TOLERANCE = 1e-2  # fp16, float output
UINT8_LEVELS = {"fp32": 1, "fp16": 3}  # uint8 output: grey levels (at most) from the quantized fp32 output

quantize = to_uint8  # float [B, 3, H, W] -> uint8 [B, H, W, 3], as the --uint8 graph does (toolkit.sampler)


class SamplerGraph(torch.nn.Module):
    """What is exported: (attributes, noise[, temperature]) -> images, sampling z from the model's
    prior (learned prior included) via CVAE.generate. Inputs are cast to the model's dtype (a
    `.half()` model computes in fp16) and the images back to float32, or with `uint8` quantized to
    uint8 NHWC."""

    def __init__(self, model: CVAE, uint8: bool = False):
        super().__init__()
        self.model = model
        self.uint8 = uint8
        self.dtype = next(model.parameters()).dtype

    def forward(
        self, attributes: torch.Tensor, noise: torch.Tensor, temperature: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.dtype != torch.float32:
            attributes, noise = attributes.to(self.dtype), noise.to(self.dtype)
            if temperature is not None:
                temperature = temperature.to(self.dtype)
        images = self.model.generate(attributes, noise, 1.0 if temperature is None else temperature)
        if self.dtype != torch.float32:
            images = images.float()
        if self.uint8:
            images = torch.round(images.clamp(0.0, 1.0) * 255.0).to(torch.uint8).permute(0, 2, 3, 1)
        return images


class EncoderGraph(torch.nn.Module):
    """What --encoder exports: (images, attributes) -> (mean, logvar) of q(z | x, y), plus
    (prior_mean, prior_logvar) of p(z | y) for a learned prior.

    The paper encoder's first convolution takes the attributes as a per-sample 3x3 kernel
    (PaperEncoder.first_conv): a Conv whose weight is computed, which tools that rewrite weights
    (onnxruntime.quantization: "Expected view to be an initializer") cannot take. Exported, that part
    is two MatMuls with constant weights instead: per sample, the kernel's 9 taps V = y @ W (W: the
    attribute channels' weights), and since the convolved map is all ones with zero padding, the
    result at each pixel is the sum of the taps that fall inside the image, V @ M (M: 9 constant
    0/1 masks of H x W). The same numbers (the parity check compares with PyTorch's own path)."""

    def __init__(self, model: CVAE):
        super().__init__()

        self.model = model
        self.paper = isinstance(model.encoder, PaperEncoder)
        if self.paper:
            weight = model.encoder.conv1.weight.detach()  # [O, 3 + A, 3, 3]
            out_channels, kernel = weight.shape[0], weight.shape[-2:]
            height, width = model.spec.image_size
            self.register_buffer(
                "taps", weight[:, 3:].permute(1, 0, 2, 3).reshape(weight.shape[1] - 3, -1).contiguous()
            )
            one_hot = torch.zeros(kernel.numel(), 1, kernel[0], kernel[1])
            one_hot.view(kernel.numel(), -1).fill_diagonal_(1.0)
            # mask t: where tap t of the kernel lands inside the image (conv of a map of ones with a one-hot kernel)
            masks = torch.nn.functional.conv2d(torch.ones(1, 1, height, width), one_hot, padding=1)[0]
            self.register_buffer("masks", masks.reshape(kernel.numel(), height * width))
            self.out_channels = out_channels

    def first_conv(self, images: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
        encoder = self.model.encoder
        batch, _, height, width = images.shape
        x = torch.nn.functional.conv2d(images, encoder.conv1.weight[:, :3], encoder.conv1.bias, padding=1)
        taps = (attributes @ self.taps).reshape(batch * self.out_channels, -1)  # [B * O, 9]
        return x + (taps @ self.masks).reshape(batch, self.out_channels, height, width)

    def forward(self, images: torch.Tensor, attributes: torch.Tensor):
        encoder = self.model.encoder
        if self.paper:
            x = torch.nn.functional.max_pool2d(torch.relu(self.first_conv(images, attributes)), 2)
            x = torch.nn.functional.max_pool2d(torch.relu(encoder.conv2(x)), 2).flatten(1)
            mean, logvar = encoder.mu(x), encoder.logvar(x)
        else:
            mean, logvar = encoder(images, attributes)
        prior = self.model.prior(attributes)
        return (mean, logvar) if prior is None else (mean, logvar, *prior)


def input_names(temperature_input: bool = False) -> list[str]:
    return ["attributes", "noise", "temperature"] if temperature_input else ["attributes", "noise"]


def weights_sha256(model: CVAE) -> str:
    """SHA-256 of the model.safetensors bytes that `save_model` writes for `model` (for a model that
    is not read from a run folder; `export_onnx` hashes the run's file itself)."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    return hashlib.sha256(save(state, metadata={"format": "pt"})).hexdigest()


def metadata(
    model: CVAE,
    *,
    fp16: bool = False,
    uint8: bool = False,
    temperature_input: bool = False,
    weights: str | None = None,
    opset: int = OPSET,
) -> dict[str, str]:
    """The metadata_props of an export (all strings); `weights` is the SHA-256 of model.safetensors
    (default: that of `model`'s weights as save_model writes them)."""
    spec = model.spec
    extra = spec.extra or {}
    run = {RUN_ID: str(extra[RUN_ID])} if extra.get(RUN_ID) else {}  # a run from before identities has none
    return {
        "cvae_tk.format": FORMAT,
        "attributes": json.dumps(list(spec.attributes)),
        "latent_dim": str(spec.latent_dim),
        "image_size": json.dumps(list(spec.image_size)),
        "value_range": json.dumps([0, 1]),
        "arch": spec.arch,
        "prior": spec.prior,
        "recipe": str(extra.get("recipe", "")),
        "step": str(extra.get("step", "")),
        "beta": str(extra.get("beta", "")),
        "toolkit_version": toolkit.__version__,
        "precision": "fp16" if fp16 else "fp32",
        "output": UINT8_OUTPUT if uint8 else FLOAT_OUTPUT,
        "inputs": json.dumps(input_names(temperature_input)),
        "weights_sha256": weights if weights is not None else weights_sha256(model),
        "opset": str(opset),
        **run,
    }


def encoder_metadata(
    model: CVAE, preprocessing: dict, *, weights: str | None = None, opset: int = OPSET
) -> dict[str, str]:
    """The encoder file's metadata_props: the decoder's (fp32), format encoder/1, its own inputs and
    outputs, and `preprocessing` (toolkit.contract.preprocessing_dict)."""
    meta = metadata(model, weights=weights, opset=opset)
    meta.update(
        {
            "cvae_tk.format": ENCODER_FORMAT,
            "output": "mean",
            "inputs": json.dumps(list(ENCODER_INPUTS)),
            "outputs": json.dumps(list(encoder_outputs(model.spec.prior))),
            "preprocessing": json.dumps(preprocessing),
        }
    )
    return meta


def _finish(proto, meta: dict[str, str]):
    """Metadata, producer and model_version in; the weights' stale value_info entries out (the
    exporter records each initializer's shape there too; tools that rewrite a weight, such as
    quantize_dynamic transposing a Gemm's, then meet an entry that contradicts it)."""
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "cvae-tk"
    proto.producer_version = toolkit.__version__
    proto.model_version = FORMAT_VERSION
    initializers = {init.name for init in proto.graph.initializer}
    kept = [value for value in proto.graph.value_info if value.name not in initializers]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _export_program(graph, example: tuple, names: list[str], outputs: list[str], dynamic_shapes: dict, opset: int):
    with warnings.catch_warnings():
        # torch warns that several inputs' batch axes share one name: that is the intent
        warnings.filterwarnings("ignore", message=".*axis name.*")
        program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            input_names=names,
            output_names=outputs,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    produced = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)
    if produced != opset:
        raise UserError(
            f"ONNX opset {opset} was asked for, but the exporter could only produce opset {produced}; try --opset {OPSET}"
        )
    initializers = {init.name for init in proto.graph.initializer}
    found = [value.name for value in proto.graph.input if value.name not in initializers]
    if found != names:
        raise RuntimeError(f"the exported graph's inputs are {found}, expected {names}")
    return proto


def encoder_to_onnx(model: CVAE, preprocessing: dict, opset: int = OPSET, *, weights: str | None = None) -> bytes:
    """The serialized ONNX encoder (fp32) of `model`, metadata included, not yet parity-checked."""
    check_opset(opset)
    if weights is None:
        weights = weights_sha256(model)
    spec = model.spec
    height, width = spec.image_size
    # batch >= 2: a dynamic dim
    example = (
        torch.rand(2, 3, height, width),
        (torch.rand(2, spec.num_attributes) > 0.5).float(),
    )
    batch = torch.export.Dim("batch")
    proto = _export_program(
        EncoderGraph(model).eval(),
        example,
        list(ENCODER_INPUTS),
        list(encoder_outputs(spec.prior)),
        {"images": {0: batch}, "attributes": {0: batch}},
        opset,
    )
    _finish(proto, encoder_metadata(model, preprocessing, weights=weights, opset=opset))
    check_contract("the exported encoder", proto)
    return proto.SerializeToString()


def to_onnx(
    model: CVAE,
    opset: int = OPSET,
    *,
    fp16: bool = False,
    uint8: bool = False,
    temperature_input: bool = False,
    weights: str | None = None,
) -> bytes:
    """The serialized ONNX sampler for the fp32 `model` (metadata included), not yet parity-checked.
    `weights`: the SHA-256 recorded as weights_sha256 (default: computed from `model`)."""
    check_opset(opset)
    if weights is None:
        weights = weights_sha256(model)
    graph = SamplerGraph(copy.deepcopy(model).half() if fp16 else model, uint8=uint8).eval()
    spec = model.spec
    names = input_names(temperature_input)
    example = [torch.zeros(2, spec.num_attributes), torch.randn(2, spec.latent_dim)]  # batch >= 2: a dynamic dim
    batch = torch.export.Dim("batch")
    dynamic_shapes = {"attributes": {0: batch}, "noise": {0: batch}}
    if temperature_input:
        example.append(torch.full((1,), PARITY_TEMPERATURE))
        dynamic_shapes["temperature"] = None  # static [1]
    proto = _export_program(graph, tuple(example), names, ["images"], dynamic_shapes, opset)
    _finish(
        proto,
        metadata(model, fp16=fp16, uint8=uint8, temperature_input=temperature_input, weights=weights, opset=opset),
    )
    check_contract("the exported graph", proto)  # what every reader checks, so a file no reader takes is never written
    return proto.SerializeToString()


def check_opset(opset: int) -> None:
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise UserError(
            f"ONNX opset {opset} is not supported: use {MIN_OPSET} to {newest} (the exporter builds opset {MIN_OPSET}+ graphs; "
            f"converting them to older opsets is unreliable)"
        )


def check_out(out: Path) -> None:
    """Refuse, before any work, an output the export could not write (toolkit.atomic.check_output: a
    folder, a path under a file, a folder that is not writable) or that is not named .onnx."""
    check_output(out)
    if out.name == ".onnx":
        raise UserError(f"cannot write {out}: expected a name before .onnx (such as digits.onnx)")
    if out.suffix != ".onnx":  # `.ONNX` too: `cvae-tk web` takes NAME.onnx only, and the encoder goes beside it
        raise UserError(
            f"cannot write {out}: expected a file name ending in .onnx, got {out.suffix or 'no extension'!r}"
        )


def _check_session(onnx_bytes: bytes):
    """An ONNX Runtime CPU session of a graph about to be checked; one that ONNX Runtime cannot load
    (an opset newer than it supports) is a UserError."""
    try:
        return ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    except Exception as error:
        message = one_line(error)
        message = message[message.find("ONNX Runtime only") :] if "ONNX Runtime only" in message else message
        raise UserError(
            f"ONNX Runtime {ort.__version__} cannot load the exported graph, so it cannot be checked: {message}"
        ) from None


def parity_error(
    model: CVAE, onnx_bytes: bytes, batch_sizes=PARITY_BATCHES, seed: int = 0, temperatures=None
) -> float:
    """Worst difference between ONNX Runtime (CPU provider) and the fp32 PyTorch `model` over the
    given batch sizes: max abs difference for a float output, grey levels from the quantized PyTorch
    output for a uint8 one. A graph with a `temperature` input is run at each of `temperatures`
    (default 1 and PARITY_TEMPERATURE)."""
    session = _check_session(onnx_bytes)
    has_temperature = "temperature" in [value.name for value in session.get_inputs()]
    uint8 = session.get_outputs()[0].type == "tensor(uint8)"
    if temperatures is None:
        temperatures = (1.0, PARITY_TEMPERATURE) if has_temperature else (1.0,)
    elif not has_temperature and any(t != 1.0 for t in temperatures):
        raise ValueError("this graph has no temperature input")
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for temperature in temperatures:
        for size in batch_sizes:
            attributes = (torch.rand(size, model.spec.num_attributes, generator=generator) > 0.5).float()
            noise = torch.randn(size, model.spec.latent_dim, generator=generator)
            with torch.no_grad():
                expected = model.generate(attributes, noise, temperature).float().numpy()
            feed = {"attributes": attributes.numpy(), "noise": noise.numpy()}
            if has_temperature:
                feed["temperature"] = np.array([temperature], np.float32)
            (got,) = session.run(["images"], feed)
            if uint8:
                expected = quantize(expected)
                got, expected = got.astype(np.int16), expected.astype(np.int16)
            if got.shape != expected.shape:
                raise RuntimeError(f"ONNX output shape {got.shape} != PyTorch {expected.shape} at batch {size}")
            if not np.isfinite(expected).all():  # max() would skip a NaN: a broken model must never pass
                raise UserError(
                    "the model's images hold NaN or infinite values (are its weights finite?); nothing was written"
                )
            error = np.abs(got - expected).max()
            worst = max(worst, float(error) if np.isfinite(error) else float("inf"))
    return worst


def encoder_parity_error(model: CVAE, onnx_bytes: bytes, batch_sizes=PARITY_BATCHES, seed: int = 0) -> float:
    """Worst max abs difference between the ONNX encoder (CPU provider) and the fp32 PyTorch `model`
    over every output and the given batch sizes (random images in [0, 1], random 0/1 attributes)."""
    session = _check_session(onnx_bytes)
    names = [value.name for value in session.get_outputs()]
    generator = torch.Generator().manual_seed(seed)
    height, width = model.spec.image_size
    worst = 0.0
    for size in batch_sizes:
        images = torch.rand(size, 3, height, width, generator=generator)
        attributes = (torch.rand(size, model.spec.num_attributes, generator=generator) > 0.5).float()
        with torch.no_grad():
            mean, logvar = model.eval().encoder(images, attributes)
            expected = [tensor.float().numpy() for tensor in (mean, logvar, *(model.prior(attributes) or ()))]
        got = session.run(names, {"images": images.numpy(), "attributes": attributes.numpy()})
        for name, ours, theirs in zip(names, got, expected):
            if ours.shape != theirs.shape:
                raise RuntimeError(
                    f"ONNX encoder output {name} has shape {ours.shape}, PyTorch {theirs.shape} at batch {size}"
                )
            if not np.isfinite(theirs).all():
                raise UserError(
                    f"the model's encoder gives NaN or infinite values for '{name}' (are its weights finite?); nothing was written"
                )
            error = np.abs(ours - theirs).max()
            worst = max(worst, float(error) if np.isfinite(error) else float("inf"))
    return worst


def run_preprocessing(run_dir: str | Path, image_size, shards: str | Path | None = None) -> dict:
    """How the run's images were prepared (toolkit.contract.preprocessing_dict), from the build
    options in the train manifest of its shards (`shards`, default data.shards of RUN/recipe.yaml).
    Shards written without build options (the test fixtures' write_split) were neither cropped nor
    resized: crop null."""
    try:
        return shards_preprocessing(str(shards) if shards is not None else run_shards(run_dir), image_size)
    except UserError as error:
        raise UserError(
            f"cannot state how the encoder's images are prepared (the crop and size the shards were built with): "
            f"{error}; nothing was written"
        ) from None


def shards_preprocessing(shards: str, image_size) -> dict:
    """preprocessing_dict of the images in `shards` (the build options of its train manifest); a
    manifest that cannot be read, or holds images of another size than `image_size`, is a UserError."""
    manifest = read_manifest(shards, "train")
    build = manifest.get("build") if isinstance(manifest.get("build"), dict) else {}
    image = build.get("image") if isinstance(build.get("image"), dict) else {}
    crop = (
        image.get("crop") if isinstance(image.get("crop"), int) and not isinstance(image.get("crop"), bool) else None
    )
    if build.get("bbox_crop"):
        crop = "bbox"  # a box per image from the data set's own files: the client must crop the photo
    if manifest.get("image_size") not in (None, list(image_size)):
        raise UserError(
            f"the shards {shards} hold {manifest['image_size']} images, the model {list(image_size)}: "
            f"they are not the shards it was trained on"
        )
    return preprocessing_dict(crop, image_size)


class Exported(tuple):
    """(path, parity error) of the decoder, as export_onnx always returned; with --encoder also
    .encoder (its path) and .encoder_error (its parity error), else None."""

    def __new__(cls, path: Path, error: float, encoder: Path | None = None, encoder_error: float | None = None):
        self = super().__new__(cls, (path, error))
        self.encoder, self.encoder_error = encoder, encoder_error
        return self


def parity_limit(fp16: bool = False, uint8: bool = False) -> tuple[float, str]:
    """(limit, how the error is measured) of an export's parity check; see `parity_passes`."""
    precision = "fp16" if fp16 else "fp32"
    if uint8:
        return float(UINT8_LEVELS[precision]), "max grey-level difference from the quantized fp32 PyTorch output"
    return (FP16_TOLERANCE if fp16 else PARITY_TOLERANCE), "max abs difference from the fp32 PyTorch output"


def parity_passes(error: float, fp16: bool = False, uint8: bool = False) -> bool:
    """uint8: at most the limit in grey levels; float: strictly below the limit."""
    limit, _ = parity_limit(fp16, uint8)
    return error <= limit if uint8 else error < limit


def default_path(
    run_dir: str | Path, fp16: bool = False, uint8: bool = False, temperature_input: bool = False
) -> Path:
    """export/<run name>.onnx, with -fp16 / -uint8 / -temperature for the variants (so a variant
    never replaces the plain export)."""
    tags = [tag for tag, on in (("fp16", fp16), ("uint8", uint8), ("temperature", temperature_input)) if on]
    return Path("export") / ("-".join([Path(run_dir).resolve().name, *tags]) + ".onnx")


def _provenance(recipe, step, run_id) -> str:
    """'recipe digits, step 60, run 1a2b3c4d': a run in a message (the file's text shown as text)."""
    words = [f"recipe {printable(cut(str(recipe), 40))}", f"step {printable(cut(str(step), 20))}"]
    return ", ".join(words + ([f"run {printable(str(run_id)[:8])}"] if run_id else []))


def check_default_outputs(run_dir: str | Path, paths) -> None:
    """Refuse to write the export of `run_dir` to default names (`paths`, the decoder's first) where
    one holds an export of another run: its metadata's run_id is not this run's (config.json's). Not
    an export, an export without a run_id (older) or one of this run: replaced, as before. Reads only
    the files' metadata."""
    paths, ours = [Path(path) for path in paths], None
    for path in paths:
        meta = file_metadata(path) if path.is_file() else {}  # is_file: opening a pipe would wait
        theirs = meta.get(RUN_ID)
        if not theirs:
            continue
        if ours is None:
            ours = read_spec(run_dir).extra or {}  # config.json's faults are said as load_model says them
        if theirs == ours.get(RUN_ID):
            continue
        this = _provenance(ours.get("recipe", "?"), ours.get("step", "?"), ours.get(RUN_ID))
        raise UserError(
            f"{path} holds the export of another run of the same folder name "
            f"({_provenance(meta.get('recipe', '?'), meta.get('step', '?'), theirs)}), not of {run_dir} ({this}): "
            f"pass --out to write this one elsewhere (--out {paths[0]} replaces that one)"
        )


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(
    run_dir: str | Path,
    out: str | Path | None = None,
    opset: int = OPSET,
    fp16: bool = False,
    uint8: bool = False,
    temperature_input: bool = False,
    encoder: bool = False,
    shards: str | Path | None = None,
) -> Exported:
    """Export `run_dir` to `out` (default `default_path`, refused where it holds another run's export:
    `check_default_outputs`); returns (path written, parity error, in the units of `parity_limit`),
    with `encoder` also the encoder (`encoder_beside(out)`; see Exported).
    `shards`: where the encoder's preprocessing is read (default the run's data.shards)."""
    run_dir = as_path(run_dir, "export_onnx(run_dir): expected the run folder")
    named = bool(out)
    out = (
        as_path(out, "export_onnx(out=): expected the .onnx file to write")
        if named
        else default_path(run_dir, fp16, uint8, temperature_input)
    )
    check_opset(opset)  # user mistakes first, before the minutes a large model takes
    check_out(out)
    encoder_out = encoder_beside(out) if encoder else None
    if encoder_out is not None:
        check_out(encoder_out)
    if not named:  # a name the user gave replaces what is there; a default one never another run's export
        check_default_outputs(run_dir, [out, encoder_out] if encoder_out else [out])
    # the files the model is built from, hashed before and after loading: a training that finishes
    # meanwhile replaces both (the step and provenance in the metadata come from config.json)
    read = [Path(run_dir) / WEIGHTS, Path(run_dir) / CONFIG]
    hashes = [_sha256_of(path) if path.is_file() else None for path in read]
    weights = hashes[0]
    model = load_model(run_dir)  # a missing or unreadable file is its UserError
    encoder_bytes = encoder_error = None
    if encoder:  # before the decoder, so that missing shards cost no export
        preprocessing = run_preprocessing(run_dir, model.spec.image_size, shards)
        encoder_bytes = encoder_to_onnx(model, preprocessing, opset, weights=weights)
        encoder_error = encoder_parity_error(model, encoder_bytes)
        if not encoder_error < PARITY_TOLERANCE:
            raise UserError(
                f"export of {run_dir}'s encoder failed its parity check: max abs difference from the fp32 PyTorch outputs = "
                f"{encoder_error:.3g} (limit {PARITY_TOLERANCE:g}, batches {PARITY_BATCHES}); nothing was written"
            )
    onnx_bytes = to_onnx(model, opset, fp16=fp16, uint8=uint8, temperature_input=temperature_input, weights=weights)
    error = parity_error(model, onnx_bytes)
    if not parity_passes(error, fp16, uint8):
        limit, measure = parity_limit(fp16, uint8)
        temperatures = f", temperatures 1 and {PARITY_TEMPERATURE:g}" if temperature_input else ""
        raise UserError(
            f"export of {run_dir} ({'fp16' if fp16 else 'fp32'}, {UINT8_OUTPUT if uint8 else FLOAT_OUTPUT}) failed its "
            f"parity check: {measure} = {error:.3g} (limit {limit:g}, batches {PARITY_BATCHES}{temperatures}); nothing was written"
        )
    for path, before in zip(read, hashes):
        if _sha256_of(path) != before:
            raise UserError(
                f"{path} changed while it was being exported (is a training run writing it?); nothing was written"
            )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write(out, onnx_bytes, encoder_out, encoder_bytes)
    except OSError as failure:  # a disk that filled up, a folder made read-only meanwhile: nothing is left behind
        both = f" and {encoder_out.name}" if encoder_out else ""
        raise UserError(f"could not write {out}{both}: {describe_os_error(failure)}; nothing was written") from None
    return Exported(out, error, encoder_out, encoder_error)


def _write(out: Path, onnx_bytes: bytes, encoder_out: Path | None, encoder_bytes: bytes | None) -> None:
    """Both files under temporary names first; then the encoder is renamed, then the decoder. Should
    that last rename fail, the new encoder is removed and the old one (kept aside meanwhile) put back:
    a decoder is never left beside an encoder of other weights, nor loses the encoder it had. Names
    that are links are written through (their targets replaced, the links kept)."""
    if encoder_out is None:
        with atomic_path(out) as tmp:
            tmp.write_bytes(onnx_bytes)
        return
    encoder_out = through_link(encoder_out)  # what is kept aside and put back is the file, not the link
    previous = hidden_beside(encoder_out, ".previous")
    kept = placed = False
    try:
        with atomic_path(out) as tmp:
            tmp.write_bytes(onnx_bytes)
            with atomic_path(encoder_out) as encoder_tmp:
                encoder_tmp.write_bytes(encoder_bytes)
                if encoder_out.exists():
                    os.replace(encoder_out, previous)
                    kept = True
            placed = True
    except BaseException:
        if placed:
            encoder_out.unlink(missing_ok=True)
        if kept:
            os.replace(previous, encoder_out)
        raise
    if kept:
        previous.unlink(missing_ok=True)
