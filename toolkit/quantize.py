"""INT8 exports for the CPU: static QDQ quantization of a parity-checked fp32 sampler.

    cvae-tk export --onnx runs/digits --int8      -> export/digits.onnx and export/digits-int8.onnx

`quantize_export` takes the fp32 export of a run (the file `cvae-tk export` has just written) and
writes OUT-int8.onnx beside it (or `out`):
- the convolutions and linear layers (QUANTIZED_OPS) with int8 weights per output channel and
  uint8 activations (ONNX Runtime's recommended pair), weights in 7 bits (reduce_range: exact also
  on x86 CPUs without VNNI, whose kernels saturate with 8-bit weights), in QDQ format
  (QuantizeLinear / DequantizeLinear around float ops: any ONNX tool reads it, ONNX Runtime fuses
  it into QLinearConv / QGemm kernels); the rest stays float;
- calibrated (min / max of every activation) on the run's own conditions: CALIBRATION_SAMPLES
  attribute vectors from the training split of its shards (data.shards of RUN/recipe.yaml), each
  with prior noise (standard normal, seeded), at temperature 1 where the graph takes one (the widest
  spread; smaller temperatures stay inside its ranges);
- the last layer (the one with 3 output channels), the final Sigmoid and what follows it stay
  float: 256 levels over a logit range of ~30 are ~0.12 apart, which the Sigmoid's slope (up to
  1/4) would turn into steps of up to ~7 grey levels;
- the fp32 file's metadata, with precision = int8 and `quantization` (JSON: how it was made);
- parity-checked against the fp32 export before it is written (`parity_levels`): training-split
  conditions drawn again and other noise, at batch sizes 1 and 64, the images of both files in
  grey levels (round(clip(x, 0, 1) * 255)); it must meet MEAN_LEVELS, P99_LEVELS and MAX_LEVELS
  (see there). Otherwise nothing is written;
- with a judge (`classifier`: `cvae-tk export --int8 --classifier DIR`, an attribute classifier
  trained on the run's shards), also bounded by what matters to a user, the attribute control score
  (toolkit.evaluate.attribute_control: the judge's balanced accuracy at telling images made with an
  attribute from images made without it, same noise), of both files on the test split's first
  CONTROL_CONDITIONS vectors, over the attributes the judge sees reliably on the real test images:
  the int8 file's may be at most CONTROL_DROP below the fp32 file's. Both scores go into the
  metadata (`quantization.control`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from toolkit.atomic import atomic_path, describe_os_error
from toolkit.classifier import check_image_size, classifier_accuracy, columns_for, load_classifier, reliable_attributes
from toolkit.contract import UINT8_OUTPUT, EncoderContract
from toolkit.data.stream import attribute_vectors, read_manifest
from toolkit.errors import UserError, one_line
from toolkit.evaluate import CONTROL_CONDITIONS, attribute_control, run_shards, split_attributes
from toolkit.export import check_out
from toolkit.images import to_uint8
from toolkit.inspection import check_contract, load_checked

CALIBRATION_SAMPLES = 512
CALIBRATION_BATCH = 64
CALIBRATION_SEED = 0
PARITY_SEED = 1  # other conditions and noise than the calibration's
PARITY_BATCHES = (1, 64)
PARITY_IMAGES = 64
# The bound, in grey levels (0..255) between the int8 and fp32 files' images on the same inputs, at
# each batch size. Measured (PARITY_IMAGES images, 6 parity seeds) on trained digits models, a paper
# decoder (300 steps) and a resnet one (width 16, learned prior, 150 steps), correctly quantized:
# mean 0.68-0.76, 99th percentile 3-4, max 8-10 (one noise draw in a few hundred: 41), the same at
# batch 1 and 64. Calibrations made wrong on purpose (noise x0.1 or x4: ranges too narrow or too
# wide; 8 samples; for the resnet also one condition only and all-zero attributes): mean 0.94-41,
# 99th percentile 9-183, max 22-233, each breaking at least one limit (noise x0.5 on the resnet,
# mean 0.79, 99th percentile 7, max 31, passes: a mild error). The mean catches a shift of every
# pixel; the 99th percentile a coarser quantization that the mean averages away (noise x4 on the
# resnet: mean 1.65, 99th percentile 10); the max, loose because of that rare noise draw, a few
# ruined pixels.
# The control bound: 0.02 of balanced accuracy. The two files decode the same conditions and noise,
# so the judge's calls differ only where quantization moved an image across its threshold. Measured
# on celeba-laptop trained on the 1,600-face CelebA sample (16 reliable attributes, 200 test
# conditions): fp32 0.616, int8 0.617, per attribute -0.003 to +0.005 (bench/RESULTS.md).
CONTROL_DROP = 0.02
MEAN_LEVELS = 2.0
P99_LEVELS = 8
MAX_LEVELS = 64
PRECISION = "int8"
# The layers ONNX Runtime's CPU provider runs in int8 (QDQ around them fuses into QLinearConv,
# QGemm, MatMulInteger). Everything else stays float: ConvTranspose has no int8 CPU kernel (it runs
# as DequantizeLinear -> float ConvTranspose; quantizing it made the paper decoder 0.87x as fast),
# and Q/DQ pairs around norms and activations only add work.
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


def default_path(fp32_path: str | Path) -> Path:
    """OUT-int8.onnx beside the fp32 export OUT.onnx."""
    fp32_path = Path(fp32_path)
    return fp32_path.with_name(f"{fp32_path.stem}-int8.onnx")


def check_request(
    run_dir: str | Path, fp32_out: str | Path, fp16: bool = False, classifier: str | Path | None = None
) -> Path:
    """What `cvae-tk export --int8` checks before any work: an fp32 export to start from, an int8
    output that can be written, shards to calibrate on, a judge (if given) that knows the shards'
    attributes and image size; returns the int8 output path."""
    if fp16:
        raise UserError("--int8 is quantized from the fp32 export: drop --fp16")
    out = default_path(fp32_out)
    check_out(out)
    shards = run_shards(run_dir)
    if classifier is not None:
        judge, manifest = load_classifier(classifier), read_manifest(shards, "test")
        try:
            columns_for(judge, list(manifest["attributes"]), f"{shards}")
            check_image_size(judge, manifest["image_size"], f"{shards}")
        except UserError as error:
            raise UserError(f"--classifier {classifier}: {error}") from None
    return out


def calibration_conditions(shards: str, count: int, seed: int = CALIBRATION_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sets of up to `count` attribute vectors each, drawn at random from the whole
    training split (a split stored in class order, as CUB's, is covered end to end): the first
    calibrates, the second serves the parity checks. A split of fewer than 2 x `count` vectors is
    halved."""
    vectors = attribute_vectors(shards, "train").astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(vectors))
    if len(vectors) < 2:
        return vectors, vectors
    half = min(count, len(vectors) // 2)
    return vectors[order[:half]], vectors[order[half : 2 * half]]


def _pick(attributes: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` rows of `attributes`, drawn at random (all rows, shuffled, and repeated if too few)."""
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.permutation(len(attributes)) for _ in range(-(-count // len(attributes)))])[:count]
    return attributes[rows]


def _inputs(session) -> tuple[list[str], int]:
    names = [value.name for value in session.get_inputs()]
    noise = next(value for value in session.get_inputs() if value.name == "noise")
    return names, int(noise.shape[1])


def feeds(names: list[str], attributes: np.ndarray, latent_dim: int, batch: int, seed: int) -> list[dict]:
    """The graph's inputs for these conditions in batches of `batch`: prior noise from `seed`,
    temperature 1 where the graph takes one."""
    noise = np.random.default_rng(seed).standard_normal((len(attributes), latent_dim), dtype=np.float32)
    batches = []
    for start in range(0, len(attributes), batch):
        feed = {"attributes": attributes[start : start + batch], "noise": noise[start : start + batch]}
        if "temperature" in names:
            feed["temperature"] = np.ones(1, np.float32)
        batches.append(feed)
    return batches


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, batches: list[dict]):
        self._batches = iter(batches)

    def get_next(self):
        return next(self._batches, None)

    def __iter__(self):
        return self._batches

    def __next__(self):
        return next(self._batches)


def _float_tail(model) -> list[str]:
    """The nodes that stay float: walking back from the output 'images' to the last weighted layer
    (the final Sigmoid, what follows it -- a crop, the --uint8 graph's scaling, rounding, cast and
    transpose -- and that layer, 3 output channels: float costs little). See the module doc."""
    producers = {output: node for node in model.graph.node for output in node.output}
    names, tensor = [], "images"
    while tensor in producers:
        node = producers[tensor]
        names.append(node.name)
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            break
        tensor = node.input[0]
    return names


def quantize_bytes(fp32_bytes: bytes, calibration: list[dict], per_channel: bool = True) -> bytes:
    """The QDQ int8 model of `fp32_bytes`, calibrated on `calibration` (feeds), without metadata changes."""
    model = onnx.load_from_string(fp32_bytes)
    # Exports from before cvae-tk dropped them (toolkit.export._finish) carry stale value_info
    # entries for weights, which the quantizer trips over; ONNX Runtime infers every shape anyway.
    del model.graph.value_info[:]
    for index, node in enumerate(model.graph.node):
        if not node.name:  # the quantizer names what it inserts after the nodes
            node.name = f"{node.op_type}_{index}"
    excluded = _float_tail(model)
    # The quantizer logs advice on the root logger ("consider pre-processing"): not the user's concern.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return _quantize_static(model, calibration, per_channel, excluded)
    except Exception as error:
        # onnxruntime.quantization's own failures: say which tool failed (ours keep their traceback)
        raise UserError(
            f"onnxruntime.quantization could not quantize the export: {one_line(error)[:300]}; nothing was written"
        ) from None
    finally:
        logging.disable(previous)


def _quantize_static(model, calibration: list[dict], per_channel: bool, excluded: list[str]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="cvae-tk-int8-") as folder:
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(model.SerializeToString())
        quantize_static(
            str(source),
            str(target),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            # 7-bit weights: x86 CPUs without VNNI (AVX2 only) add pairs of uint8 x int8 products in
            # int16, which full-range weights overflow. Measured on an AVX2-only EPYC (digits, 60 steps):
            # 8-bit weights gave mean 2.69 / max 120 grey levels through the fused kernels, 0.80 / 12 as
            # written; 7-bit gives 0.89 / 13 both ways, and the same file serves every x86 CPU.
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=excluded,
        )
        return target.read_bytes()


def grey_levels(images: np.ndarray) -> np.ndarray:
    """Images as the grey levels a user sees (a --uint8 graph's output already is)."""
    if images.dtype == np.uint8:
        return images.astype(np.int16)
    return to_uint8(images).astype(np.int16)


def parity_levels(
    fp32_bytes: bytes, int8_bytes: bytes, attributes: np.ndarray, seed: int = PARITY_SEED
) -> dict[int, dict]:
    """Grey-level differences between the int8 and the fp32 file's images on the same inputs:
    PARITY_IMAGES conditions drawn from `attributes` with prior noise (both from `seed`), run at each
    batch size of PARITY_BATCHES; per batch size the mean, 99th percentile and max over every pixel
    and channel. The int8 file runs twice, with ONNX Runtime's fused integer kernels (what a reader
    gets) and with its QDQ nodes as written (the file's meaning); each figure is the worse of the two,
    so that a file whose kernels saturate on some CPU (see _quantize_static) is not passed."""
    fp32 = ort.InferenceSession(fp32_bytes, providers=["CPUExecutionProvider"])
    as_written = ort.SessionOptions()
    as_written.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    int8_sessions = [
        ort.InferenceSession(int8_bytes, providers=["CPUExecutionProvider"]),
        ort.InferenceSession(int8_bytes, as_written, providers=["CPUExecutionProvider"]),
    ]
    names, latent_dim = _inputs(fp32)
    rows = _pick(attributes, PARITY_IMAGES, seed)
    found = {}
    for batch in PARITY_BATCHES:
        differences = [[] for _ in int8_sessions]
        for feed in feeds(names, rows, latent_dim, batch, seed):  # the same noise at every batch size
            reference = grey_levels(fp32.run(["images"], feed)[0])
            for session, found_here in zip(int8_sessions, differences):
                int8 = grey_levels(session.run(["images"], feed)[0])
                if reference.shape != int8.shape:
                    raise RuntimeError(
                        f"the int8 graph's images have shape {int8.shape}, the fp32 graph's {reference.shape}"
                    )
                found_here.append(np.abs(int8 - reference).ravel())
        worst = [np.concatenate(pieces) for pieces in differences]
        found[batch] = {
            "mean": max(float(d.mean()) for d in worst),
            "p99": max(float(np.percentile(d, 99)) for d in worst),
            "max": max(int(d.max()) for d in worst),
        }
    return found


def parity_passes(levels: dict[int, dict]) -> bool:
    return all(v["mean"] <= MEAN_LEVELS and v["p99"] <= P99_LEVELS and v["max"] <= MAX_LEVELS for v in levels.values())


def limits() -> str:
    return f"mean {MEAN_LEVELS:g}, 99th percentile {P99_LEVELS:g}, max {MAX_LEVELS}"


def describe(levels: dict[int, dict]) -> str:
    return "; ".join(
        f"batch {b}: mean {v['mean']:.2f}, 99th percentile {v['p99']:.0f}, max {v['max']}" for b, v in levels.items()
    )


class OnnxImages:
    """An ONNX sampler file as the `model` that toolkit.evaluate.attribute_control judges: `spec`
    (attributes, image_size, latent_dim from its metadata) and `generate(attributes, noise)` ->
    float images [B, 3, H, W] in [0, 1] (a --uint8 file's pixels / 255), temperature 1."""

    def __init__(self, data: bytes):
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.names, latent_dim = _inputs(self.session)
        self.uint8 = meta.get("output") == UINT8_OUTPUT
        self.spec = SimpleNamespace(
            attributes=json.loads(meta["attributes"]),
            image_size=tuple(json.loads(meta["image_size"])),
            latent_dim=latent_dim,
        )

    def generate(self, attributes, noise):
        feed = feeds(
            self.names, attributes.cpu().numpy().astype(np.float32), self.spec.latent_dim, len(attributes), 0
        )[0]
        feed["noise"] = noise.cpu().numpy().astype(np.float32)
        images = self.session.run(["images"], feed)[0]
        if self.uint8:
            images = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
        return torch.from_numpy(np.ascontiguousarray(images))


def control_scores(fp32_bytes: bytes, int8_bytes: bytes, classifier_dir: str | Path, shards: str) -> dict:
    """Both files' attribute control score, judged by the classifier in `classifier_dir`, on the test
    split of `shards` (see the module doc): {"fp32", "int8" (means over the reliable attributes),
    "attributes" (their names), "per_attribute" {name: [fp32, int8]}, "classifier", "conditions"}."""
    classifier = load_classifier(classifier_dir)
    files = {"fp32": OnnxImages(fp32_bytes), "int8": OnnxImages(int8_bytes)}
    reliable = reliable_attributes(classifier_accuracy(classifier, shards, "test"))
    if not reliable:
        raise UserError(
            f"the classifier {classifier_dir} recognises no attribute reliably on the test images of {shards} "
            f"(balanced accuracy >= 0.75 with 5 images each way): it cannot judge control; train it longer or drop --classifier"
        )
    vectors = split_attributes(shards, "test")[:CONTROL_CONDITIONS]
    scores = {kind: attribute_control(classifier, model, vectors, names=reliable) for kind, model in files.items()}
    scored = [name for name in reliable if name in scores["fp32"]]
    return {
        **{kind: sum(scores[kind][name]["control"] for name in scored) / len(scored) for kind in files},
        "attributes": scored,
        "per_attribute": {name: [scores["fp32"][name]["control"], scores["int8"][name]["control"]] for name in scored},
        "classifier": str(classifier_dir),
        "conditions": len(vectors),
    }


def describe_control(control: dict) -> str:
    return (
        f"control score fp32 {control['fp32']:.3f}, int8 {control['int8']:.3f} over {len(control['attributes'])} reliable "
        f"attribute(s), {control['conditions']} test conditions (limit: at most {CONTROL_DROP:g} lower)"
    )


def with_metadata(int8_bytes: bytes, fp32_bytes: bytes, quantization: dict) -> bytes:
    """The int8 model carrying the fp32 file's metadata (precision = int8, plus `quantization`) and
    its model fields (producer, version, doc string)."""
    fp32, int8 = onnx.load_from_string(fp32_bytes), onnx.load_from_string(int8_bytes)
    meta = {entry.key: entry.value for entry in fp32.metadata_props}
    meta["precision"] = PRECISION
    meta["quantization"] = json.dumps(quantization, sort_keys=True)
    del int8.metadata_props[:]
    for key, value in meta.items():
        entry = int8.metadata_props.add()
        entry.key, entry.value = key, value
    int8.producer_name, int8.producer_version = fp32.producer_name, fp32.producer_version
    int8.model_version, int8.doc_string = fp32.model_version, fp32.doc_string
    return int8.SerializeToString()


def quantize_export(
    run_dir: str | Path,
    fp32_path: str | Path,
    out: str | Path | None = None,
    shards: str | None = None,
    samples: int = CALIBRATION_SAMPLES,
    classifier: str | Path | None = None,
) -> tuple[Path, dict[int, dict], dict | None]:
    """Write the int8 file of the fp32 export `fp32_path` of `run_dir` to `out` (default
    `default_path`), calibrated on the run's training split (`shards`, default data.shards of
    RUN/recipe.yaml); returns (path written, `parity_levels`, `control_scores` or None without a
    `classifier`). A parity check that fails, or a file no reader would take, writes nothing."""
    fp32_path = Path(fp32_path)
    out = Path(out) if out else default_path(fp32_path)
    check_out(out)
    if out.resolve() == fp32_path.resolve():
        raise UserError(f"the int8 file would replace the fp32 export {fp32_path}: choose another name")
    _, contract = load_checked(fp32_path)  # a sampler export (not an encoder, not any ONNX file)
    if isinstance(contract, EncoderContract):
        raise UserError(f"{fp32_path} is an encoder: --int8 quantizes the decoder (the sampler OUT.onnx)")
    if contract.precision != "fp32":
        raise UserError(
            f"{fp32_path} is a {contract.precision} export: int8 is quantized from an fp32 one (drop --fp16)"
        )
    fp32_bytes = fp32_path.read_bytes()
    shards = shards or run_shards(run_dir)
    calibrating, checking = calibration_conditions(shards, samples)
    names, latent_dim = list(contract.inputs), contract.latent_dim
    calibration = feeds(
        names, _pick(calibrating, samples, CALIBRATION_SEED), latent_dim, CALIBRATION_BATCH, CALIBRATION_SEED
    )
    int8_bytes = quantize_bytes(fp32_bytes, calibration)
    levels = parity_levels(fp32_bytes, int8_bytes, checking)
    if not parity_passes(levels):
        raise UserError(
            f"the int8 quantization of {fp32_path} failed its parity check against the fp32 file ({describe(levels)} grey levels; "
            f"limits: {limits()}); {out} was not written"
        )
    control = None
    if classifier is not None:
        control = control_scores(fp32_bytes, int8_bytes, classifier, shards)
        if control["int8"] < control["fp32"] - CONTROL_DROP:
            raise UserError(
                f"the int8 quantization of {fp32_path} loses attribute control: {describe_control(control)}; "
                f"{out} was not written"
            )
    quantization = {
        "format": "QDQ",
        "weights": "int8 in 7 bits (reduce_range), per channel",
        "activations": "uint8",
        "calibration": "MinMax",
        "calibration_samples": samples,
        "calibration_data": "train split attributes + standard normal noise",
        "seed": CALIBRATION_SEED,
        "parity_grey_levels": {str(b): v for b, v in levels.items()},
        **({"control": control} if control else {}),
    }
    int8_bytes = with_metadata(int8_bytes, fp32_bytes, quantization)
    check_contract("the int8 graph", onnx.load_from_string(int8_bytes))  # what every reader checks
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.write_bytes(int8_bytes)
    except OSError as failure:
        raise UserError(f"could not write {out}: {describe_os_error(failure)}; nothing was written") from None
    return out, levels, control
