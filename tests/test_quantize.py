"""`cvae-tk export --int8` (toolkit/quantize.py): a static QDQ int8 file that every reader takes, whose
images stay within the grey-level bound of the fp32 file's, and that is never written when it does not.
The control score on real faces is out of reach here (the tests have no real data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toolkit import quantize
from toolkit.errors import UserError


@pytest.fixture(scope="module")
def int8_file(trained_run, exported, tmp_path_factory):
    path, levels, control = quantize.quantize_export(
        trained_run, exported, tmp_path_factory.mktemp("int8") / "digits-int8.onnx"
    )
    assert control is None  # no judge given
    return path, levels


def test_the_int8_file_loads_in_the_sampler_says_int8_and_stays_within_the_bound(exported, int8_file):
    import onnx

    from toolkit.sampler import Sampler

    path, levels = int8_file
    assert set(levels) == {1, 64} and quantize.parity_passes(levels)
    fp32, int8 = Sampler(exported, device="cpu"), Sampler(path, device="cpu")
    assert int8.metadata["precision"] == "int8" and fp32.metadata["precision"] == "fp32"
    for key in ("cvae_tk.format", "attributes", "latent_dim", "image_size", "weights_sha256", "output", "inputs"):
        assert int8.metadata[key] == fp32.metadata[key], key
    recorded = json.loads(int8.metadata["quantization"])
    assert recorded["format"] == "QDQ" and recorded["calibration_samples"] == quantize.CALIBRATION_SAMPLES
    # really quantized: int8 weights behind DequantizeLinear, and its images are not the fp32 ones
    graph = onnx.load(path).graph
    int8_weights = [init for init in graph.initializer if init.data_type == onnx.TensorProto.INT8]
    assert int8_weights and any(node.op_type == "DequantizeLinear" for node in graph.node)
    conditions = [{f"digit_{d}": 1} for d in range(10)]
    a, b = (s.sample(conditions, n=8, seed=0).astype(np.int16) for s in (fp32, int8))
    difference = np.abs(a - b)
    assert 0 < difference.mean() <= quantize.MEAN_LEVELS, difference.mean()
    assert np.percentile(difference, 99) <= quantize.P99_LEVELS and difference.max() <= quantize.MAX_LEVELS
    # the condition still decides the image: each digit's int8 images are closest to that digit's fp32 ones
    means_a, means_b = a.reshape(10, 8, -1).mean(1), b.reshape(10, 8, -1).mean(1)
    nearest = np.argmin(((means_b[:, None] - means_a[None]) ** 2).sum(-1), axis=1)
    assert list(nearest) == list(range(10))


def test_the_fused_integer_kernels_give_the_images_the_file_describes(int8_file):
    """On x86 CPUs without VNNI, ONNX Runtime's fused uint8 x int8 kernels add pairs of products in
    int16, which 8-bit weights overflow: on an AVX2-only CPU such a file gave mean 2.69 / max 120 grey
    levels from the fp32 images through the fused kernels, 0.80 / 12 run as written. The 7-bit weights
    (reduce_range) make both runs agree on every CPU; on one with VNNI this holds either way."""
    import onnxruntime as ort

    path, _ = int8_file
    as_written = ort.SessionOptions()
    as_written.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(path), as_written, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {
        "attributes": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 64)],
        "noise": rng.standard_normal((64, 16), dtype=np.float32),
    }
    a, b = (quantize.grey_levels(session.run(["images"], feed)[0]) for session in (fused, reference))
    difference = np.abs(a - b)
    assert difference.mean() < 0.1 and difference.max() <= 2, (difference.mean(), difference.max())


def test_a_broken_calibration_fails_the_bound_and_writes_nothing(trained_run, exported, tmp_path, monkeypatch):
    real = quantize.quantize_bytes

    def narrow(fp32_bytes, calibration, **options):  # ranges from noise 10x too small: clipped activations
        return real(fp32_bytes, [dict(feed, noise=feed["noise"] * 0.1) for feed in calibration], **options)

    monkeypatch.setattr(quantize, "quantize_bytes", narrow)
    before = exported.read_bytes()
    out = tmp_path / "broken-int8.onnx"
    with pytest.raises(
        UserError, match="failed its parity check against the fp32 file .*broken-int8.onnx was not written"
    ):
        quantize.quantize_export(trained_run, exported, out)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary
    assert exported.read_bytes() == before


def test_uint8_and_temperature_exports_quantize_with_their_float_tail(trained_run, tmp_path):
    import onnx

    from toolkit.export import export_onnx
    from toolkit.sampler import Sampler

    fp32_path, _ = export_onnx(trained_run, tmp_path / "d.onnx", uint8=True, temperature_input=True)
    path, levels, _ = quantize.quantize_export(trained_run, fp32_path)
    assert path == tmp_path / "d-int8.onnx"
    # the tail stays float: from `images` back to the last layer, no Q/DQ node, and that layer's
    # weight is a float initializer, not a DequantizeLinear's output
    graph = onnx.load(path).graph
    producers = {output: node for node in graph.node for output in node.output}
    floats = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    tensor, walked = "images", []
    while tensor in producers and producers[tensor].op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        walked.append(producers[tensor].op_type)
        tensor = producers[tensor].input[0]
    last = producers[tensor]
    assert "Sigmoid" in walked and not {"QuantizeLinear", "DequantizeLinear"} & set(walked), walked
    assert (
        last.input[1] in floats
        and producers.get(last.input[0]) is None
        or producers[last.input[0]].op_type != "DequantizeLinear"
    )
    assert any(node.op_type == "DequantizeLinear" for node in graph.node)  # the layers before it are quantized
    fp32, int8 = Sampler(fp32_path, device="cpu"), Sampler(path, device="cpu")
    assert int8.metadata["output"] == "uint8_nhwc"
    a, b = (s.sample({"digit_7": 1}, n=16, seed=3, temperature=0.7).astype(np.int16) for s in (fp32, int8))
    assert np.abs(a - b).mean() <= quantize.MEAN_LEVELS


def test_an_fp16_export_or_a_bad_name_is_refused(trained_run, exported, tmp_path):
    from toolkit.export import export_onnx

    with pytest.raises(UserError, match="drop --fp16"):
        quantize.check_request(trained_run, tmp_path / "x.onnx", fp16=True)
    fp16_path, _ = export_onnx(trained_run, tmp_path / "h.onnx", fp16=True)
    with pytest.raises(UserError, match="int8 is quantized from an fp32 one"):
        quantize.quantize_export(trained_run, fp16_path)
    with pytest.raises(UserError, match="ending in .onnx"):
        quantize.quantize_export(trained_run, exported, tmp_path / "x.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.onnx"]


def test_cli_export_int8_writes_both_files(trained_run, tmp_path):
    from tests.test_cli import run_cli

    result = run_cli(["export", "--onnx", trained_run, "--out", tmp_path / "d.onnx", "--int8"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "int8 parity: grey levels from the fp32 file: batch 1: mean" in result.stdout
    assert "WARNING" not in result.stderr, result.stderr  # the quantizer's advice stays quiet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d-int8.onnx", "d.onnx"]
    refused = run_cli(
        ["export", "--onnx", trained_run, "--out", tmp_path / "h.onnx", "--int8", "--fp16"], cwd=tmp_path
    )
    assert (
        refused.returncode == 2
        and refused.stderr.strip() == "error: --int8 is quantized from the fp32 export: drop --fp16"
    )
    assert not (tmp_path / "h.onnx").exists()


# --- the control bound (a judge: the attribute classifier) -----------------------------------------


@pytest.fixture(scope="module")
def judge(digits_shards, tmp_path_factory) -> Path:
    from toolkit.classifier import train_classifier

    out = tmp_path_factory.mktemp("judge") / "digits-classifier"
    train_classifier(digits_shards, out, steps=300, batch_size=32, lr=3e-3, seed=0, width=16, depth=3)
    return out


def test_an_onnx_file_is_judged_as_its_pytorch_model(trained_run, exported, judge, digits_shards):
    """OnnxImages stands in for the model in attribute_control: the same scores as the PyTorch
    model's on the same conditions and noise (images equal to 1e-4; a call may flip only where the
    judge sits on its threshold)."""
    import torch

    from toolkit.classifier import load_classifier
    from toolkit.evaluate import attribute_control, split_attributes
    from toolkit.model import load_model

    classifier, vectors = load_classifier(judge), split_attributes(digits_shards, "test")[:64]
    onnx_file = quantize.OnnxImages(exported.read_bytes())
    model = load_model(trained_run).eval()
    assert (
        onnx_file.spec.attributes == list(model.spec.attributes) and onnx_file.spec.latent_dim == model.spec.latent_dim
    )
    noise = torch.randn(5, model.spec.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(onnx_file.generate(vectors[:5], noise), model.generate(vectors[:5], noise), atol=1e-4)
        torch_scores = attribute_control(classifier, model, vectors)
    onnx_scores = attribute_control(classifier, onnx_file, vectors)
    assert set(onnx_scores) == set(torch_scores)
    for name in torch_scores:
        assert abs(onnx_scores[name]["control"] - torch_scores[name]["control"]) <= 2 / torch_scores[name]["count"], (
            name
        )


def test_with_a_judge_the_int8_file_keeps_control_and_records_both_scores(trained_run, exported, judge, tmp_path):
    from toolkit.sampler import Sampler

    path, levels, control = quantize.quantize_export(trained_run, exported, tmp_path / "j-int8.onnx", classifier=judge)
    assert quantize.parity_passes(levels)
    assert control["attributes"] and set(control["per_attribute"]) == set(control["attributes"])
    assert control["int8"] >= control["fp32"] - quantize.CONTROL_DROP
    means = [sum(pair[i] for pair in control["per_attribute"].values()) / len(control["attributes"]) for i in (0, 1)]
    assert means == pytest.approx([control["fp32"], control["int8"]])
    recorded = json.loads(Sampler(path, device="cpu").metadata["quantization"])
    assert recorded["control"] == json.loads(json.dumps(control)) and recorded["control"]["classifier"] == str(judge)


def test_an_int8_file_that_loses_control_is_not_written(trained_run, exported, judge, tmp_path, monkeypatch):
    # any int8 file now "loses" control: the mechanism, not the numbers
    monkeypatch.setattr(quantize, "CONTROL_DROP", -1.0)
    with pytest.raises(
        UserError, match=r"loses attribute control: control score fp32 .*lost-int8.onnx was not written"
    ):
        quantize.quantize_export(trained_run, exported, tmp_path / "lost-int8.onnx", classifier=judge)
    assert list(tmp_path.iterdir()) == []


def test_a_judge_is_checked_before_any_work(trained_run, exported, judge, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="nowhere is not an attribute classifier"):
        quantize.check_request(trained_run, tmp_path / "x.onnx", classifier=tmp_path / "nowhere")
    real = quantize.load_classifier

    def other_names(folder):
        loaded = real(folder)
        loaded.attributes = [f"other_{i}" for i in range(len(loaded.attributes))]
        return loaded

    monkeypatch.setattr(quantize, "load_classifier", other_names)
    with pytest.raises(UserError, match=r"^--classifier .*does not know attribute"):
        quantize.check_request(trained_run, tmp_path / "x.onnx", classifier=judge)
    from tests.test_cli import run_cli

    alone = run_cli(
        ["export", "--onnx", trained_run, "--out", tmp_path / "c.onnx", "--classifier", judge], cwd=tmp_path
    )
    assert alone.returncode == 2 and alone.stderr.startswith(
        "error: --classifier judges the --int8 file's control score: add --int8"
    )
    assert list(tmp_path.iterdir()) == []


def test_calibration_draws_two_disjoint_sets_from_the_whole_split(digits_shards, tmp_path):
    """Shards keep the source's order (CUB's is by species): the conditions are drawn from every
    shard, and the parity check's are not the calibration's."""
    import torch

    from toolkit.data.digits import ATTRIBUTES, digit_samples
    from toolkit.data.shards import write_split
    from toolkit.data.stream import attribute_vectors
    from toolkit.evaluate import split_attributes

    vectors = attribute_vectors(digits_shards, "train")
    assert vectors.dtype == np.uint8 and torch.equal(
        torch.from_numpy(vectors).float(), split_attributes(digits_shards, "train")
    )
    # a split stored class after class, 100 images a shard, each vector made unique by a serial-number attribute
    samples = list(digit_samples("train", 32))
    by_class = [
        sample for digit in range(10) for sample in [s for s in samples if np.argmax(s.attributes) == digit][:100]
    ]
    for index, sample in enumerate(by_class):
        sample.attributes = np.concatenate([sample.attributes, [(index >> bit) & 1 for bit in range(10)]]).astype(
            np.uint8
        )
    names = list(ATTRIBUTES) + [f"bit_{bit}" for bit in range(10)]
    write_split(iter(by_class), tmp_path / "sorted", "train", names, (32, 32), "sorted digits", shard_size=100)
    calibrating, checking = quantize.calibration_conditions(str(tmp_path / "sorted"), 200)
    assert len(calibrating) == len(checking) == 200
    # every class, not the first shards' only
    assert calibrating[:, :10].sum(0).min() > 0 and checking[:, :10].sum(0).min() > 0
    assert not {row.tobytes() for row in calibrating} & {row.tobytes() for row in checking}  # disjoint
    few, _ = quantize.calibration_conditions(str(tmp_path / "sorted"), 10**6)  # more asked than there are: halved
    assert len(few) == 500


def test_only_a_sampler_export_is_quantized(trained_run, tmp_path):
    """The fp32 file is read through the contract every reader checks: an encoder or a file that is
    not a cvae-tk export is one line, and nothing is written."""
    from toolkit.export import export_onnx

    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    with pytest.raises(UserError, match="x.onnx is not an ONNX model"):
        quantize.quantize_export(trained_run, tmp_path / "x.onnx", tmp_path / "x-int8.onnx")
    export_onnx(trained_run, tmp_path / "d.onnx", encoder=True)
    with pytest.raises(UserError, match="d-encoder.onnx is an encoder: --int8 quantizes the decoder"):
        quantize.quantize_export(trained_run, tmp_path / "d-encoder.onnx", tmp_path / "e-int8.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d-encoder.onnx", "d.onnx", "x.onnx"]
