"""The ONNX export: parity with PyTorch, the metadata contract, and nothing written on failure."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import toolkit
from toolkit.errors import UserError

NUM_ATTRIBUTES, LATENT_DIM, SIZE = 10, 16, 32  # the digits recipe


@pytest.fixture(scope="module")
def session(exported):
    import onnxruntime as ort

    return ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model(trained_run):
    from toolkit.model import load_model

    return load_model(trained_run)


@pytest.fixture(scope="module")
def proto(exported):
    import onnx

    return onnx.load(str(exported), load_external_data=False)


@pytest.mark.parametrize("batch", [1, 3, 5, 17])
def test_exported_file_matches_pytorch(session, model, batch):
    import torch

    rng = np.random.default_rng(batch)
    attributes = (rng.random((batch, NUM_ATTRIBUTES)) > 0.5).astype(np.float32)
    noise = rng.standard_normal((batch, LATENT_DIM), dtype=np.float32)
    (got,) = session.run(["images"], {"attributes": attributes, "noise": noise})
    with torch.no_grad():
        expected = model.generate(torch.from_numpy(attributes), torch.from_numpy(noise)).numpy()
    assert got.shape == (batch, 3, SIZE, SIZE)
    assert got.dtype == np.float32
    assert expected.shape == got.shape
    assert float(np.abs(got - expected).max()) < 1e-4
    # the output is a sigmoid: a real image, not a constant
    assert 0.0 <= got.min() and got.max() <= 1.0
    assert got.std() > 1e-3


def test_parity_error_of_the_real_bytes_is_small(model, exported):
    from toolkit.export import parity_error

    error = parity_error(model, exported.read_bytes())
    assert 0.0 <= error < 1e-4


def test_parity_error_sees_a_different_model(model, trained_run, exported):
    """parity_error is a real check: a model with other weights does not match the file."""
    import torch

    from toolkit.export import parity_error
    from toolkit.model import load_model

    other = load_model(trained_run)
    with torch.no_grad():
        other.decoder.fc.bias.add_(1.0)
    assert parity_error(other, exported.read_bytes()) > 1e-3


def test_metadata_contract(proto):
    meta = {entry.key: entry.value for entry in proto.metadata_props}
    assert meta["cvae_tk.format"] == "sampler/1"
    assert json.loads(meta["attributes"]) == [f"digit_{i}" for i in range(10)]
    assert meta["latent_dim"] == str(LATENT_DIM)
    assert meta["image_size"] == "[32, 32]"
    assert json.loads(meta["image_size"]) == [32, 32]
    assert json.loads(meta["value_range"]) == [0, 1]
    assert meta["recipe"] == "digits"
    assert meta["step"] == "60"
    assert meta["toolkit_version"] == toolkit.__version__
    assert meta["arch"] == "paper"
    assert re.fullmatch(r"[0-9a-f]{32}", meta["run_id"])  # the run's identity: no path (exports are shared)
    assert all(isinstance(value, str) for value in meta.values())


def _dims(value_info):
    return list(value_info.type.tensor_type.shape.dim)


def test_graph_inputs_outputs_and_dynamic_batch(proto):
    graph = proto.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    assert [i.name for i in inputs] == ["attributes", "noise"]
    assert [o.name for o in graph.output] == ["images"]

    attributes, noise = inputs
    (images,) = graph.output
    for value, rest in ((attributes, [NUM_ATTRIBUTES]), (noise, [LATENT_DIM]), (images, [3, SIZE, SIZE])):
        dims = _dims(value)
        assert len(dims) == 1 + len(rest), value.name
        batch = dims[0]
        assert batch.WhichOneof("value") == "dim_param", f"{value.name}: batch axis is fixed ({batch})"
        assert batch.dim_param
        assert [d.dim_value for d in dims[1:]] == rest, value.name
    # the two inputs share one batch axis
    assert _dims(attributes)[0].dim_param == _dims(noise)[0].dim_param


def test_exported_file_is_self_contained(exported, proto):
    from onnx.external_data_helper import uses_external_data

    assert [p.name for p in exported.parent.iterdir()] == [exported.name]
    assert proto.graph.initializer, "the weights should be in the graph"
    assert not any(uses_external_data(init) for init in proto.graph.initializer)
    # loading with external data from an unrelated folder still works: nothing is referenced outside
    import onnxruntime as ort

    session = ort.InferenceSession(exported.read_bytes(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["attributes", "noise"]


def test_failed_parity_check_writes_nothing(trained_run, tmp_path, monkeypatch):
    import toolkit.export

    monkeypatch.setattr(toolkit.export, "parity_error", lambda *args, **kwargs: 0.5)
    with pytest.raises(UserError) as caught:
        toolkit.export.export_onnx(trained_run, tmp_path / "x.onnx")
    assert "0.5" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_run_folder_missing_a_file(trained_run, tmp_path, missing):
    from toolkit.export import export_onnx

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.safetensors"):
        if name != missing:
            shutil.copy(trained_run / name, run / name)
    out = tmp_path / "out" / "x.onnx"
    with pytest.raises(UserError) as caught:
        export_onnx(run, out)
    assert missing in str(caught.value)
    assert not out.parent.exists()
    assert sorted(p.name for p in run.iterdir()) == sorted({"config.json", "model.safetensors"} - {missing})


# --- every architecture and prior, from tiny random models (no training run needed) ---------------


@pytest.mark.parametrize("arch", ["paper", "resnet"])
@pytest.mark.parametrize("prior", ["standard", "learned"])
def test_export_of_each_arch_and_prior(tmp_path, arch, prior):
    import onnxruntime as ort
    import torch

    from toolkit.export import export_onnx
    from toolkit.model import CVAE, ModelSpec, save_model

    torch.manual_seed(0)
    options = {"width": 16, "levels": 2, "embed_dim": 16} if arch == "resnet" else {}
    spec = ModelSpec(
        [f"a{i}" for i in range(NUM_ATTRIBUTES)], (SIZE, SIZE), LATENT_DIM, arch, prior=prior, options=options
    )
    model = CVAE(spec).eval()
    with torch.no_grad():  # move the zero-initialised layers (residual branches, prior head) off zero
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.spec.extra = {"recipe": "tiny", "step": 0, "beta": 0.5}
    save_model(model, tmp_path / "run")

    path, error = export_onnx(tmp_path / "run", tmp_path / "out" / "tiny.onnx")
    assert error < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert (meta["arch"], meta["prior"], meta["latent_dim"]) == (arch, prior, str(LATENT_DIM))
    assert meta["cvae_tk.format"] == "sampler/1" and json.loads(meta["image_size"]) == [SIZE, SIZE]

    rng = np.random.default_rng(0)
    for batch in (1, 3, 17):
        attributes = (rng.random((batch, NUM_ATTRIBUTES)) > 0.5).astype(np.float32)
        noise = rng.standard_normal((batch, LATENT_DIM), dtype=np.float32)
        (got,) = session.run(["images"], {"attributes": attributes, "noise": noise})
        with torch.no_grad():
            expected = model.generate(torch.from_numpy(attributes), torch.from_numpy(noise)).numpy()
            from_noise = model.decoder(torch.from_numpy(noise), torch.from_numpy(attributes)).numpy()
        assert got.shape == (batch, 3, SIZE, SIZE)
        assert float(np.abs(got - expected).max()) < 1e-4
        # the learned prior is inside the graph: noise is not decoded as z directly
        assert (float(np.abs(got - from_noise).max()) > 1e-3) == (prior == "learned")


# --- the export variants: fp16, uint8 output, temperature input (every combination) ----------------

PAPER_SIZE = (24, 32)  # H != W: a swapped axis in the uint8 NHWC output shows
FLAGS = [
    dict(fp16=fp16, uint8=uint8, temperature_input=temperature)
    for fp16 in (False, True)
    for uint8 in (False, True)
    for temperature in (False, True)
]


def _flag_id(flags: dict) -> str:
    return "-".join(name for name, on in flags.items() if on) or "default"


def _tiny_run(folder: Path, arch: str, prior: str, size) -> Path:
    import torch

    from toolkit.model import CVAE, ModelSpec, save_model

    torch.manual_seed(1)
    options = {"width": 8, "levels": 2, "embed_dim": 16} if arch == "resnet" else {}
    spec = ModelSpec(
        [f"attr_{i}" for i in range(NUM_ATTRIBUTES)], size, LATENT_DIM, arch, prior=prior, options=options
    )
    model = CVAE(spec).eval()
    with torch.no_grad():  # move the zero-initialised layers (residual branches, prior head) off zero
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.spec.extra = {"recipe": "tiny", "step": 7, "beta": 0.25}
    save_model(model, folder)
    return folder


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-runs")
    return {
        "paper": _tiny_run(root / "paper", "paper", "standard", PAPER_SIZE),
        "resnet": _tiny_run(root / "resnet", "resnet", "learned", (32, 32)),
    }


@pytest.fixture(scope="module")
def variant(tiny_runs, tmp_path_factory):
    """variant(kind, **flags) -> (path, parity error, fp32 model), each export made once per module."""
    from toolkit.export import export_onnx
    from toolkit.model import load_model

    out, cache = tmp_path_factory.mktemp("variants"), {}

    def get(kind: str, fp16: bool = False, uint8: bool = False, temperature_input: bool = False):
        flags = dict(fp16=fp16, uint8=uint8, temperature_input=temperature_input)
        key = (kind, _flag_id(flags))
        if key not in cache:
            path, error = export_onnx(tiny_runs[kind], out / f"{kind}-{key[1]}.onnx", **flags)
            cache[key] = (path, error, load_model(tiny_runs[kind]))
        return cache[key]

    return get


def _run(session, attributes, noise, temperature=None):
    feed = {"attributes": attributes, "noise": noise}
    if temperature is not None:
        feed["temperature"] = np.array([temperature], np.float32)
    return session.run(["images"], feed)[0]


def _check_variant(variant, tiny_runs, kind: str, flags: dict):
    import hashlib

    import onnxruntime as ort
    import torch

    from toolkit.export import quantize

    path, error, model = variant(kind, **flags)
    fp16, uint8, temperature_input = flags["fp16"], flags["uint8"], flags["temperature_input"]
    height, width = model.spec.image_size
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    names = ["attributes", "noise"] + (["temperature"] if temperature_input else [])
    assert [i.name for i in session.get_inputs()] == names
    assert all(i.type == "tensor(float)" for i in session.get_inputs())
    if temperature_input:
        assert session.get_inputs()[2].shape == [1]
    (output,) = session.get_outputs()
    assert output.name == "images"
    assert output.type == ("tensor(uint8)" if uint8 else "tensor(float)")

    meta = session.get_modelmeta().custom_metadata_map
    assert meta["cvae_tk.format"] == "sampler/1"
    assert meta["precision"] == ("fp16" if fp16 else "fp32")
    assert meta["output"] == ("uint8_nhwc" if uint8 else "float32_nchw")
    assert json.loads(meta["inputs"]) == names
    assert meta["weights_sha256"] == hashlib.sha256((tiny_runs[kind] / "model.safetensors").read_bytes()).hexdigest()
    assert meta["opset"] == "18"
    assert (meta["arch"], meta["prior"], meta["step"], meta["beta"]) == (
        model.spec.arch,
        model.spec.prior,
        "7",
        "0.25",
    )
    assert json.loads(meta["attributes"]) == model.spec.attributes
    assert json.loads(meta["image_size"]) == [height, width]

    limit = (3 if fp16 else 1) if uint8 else (1e-2 if fp16 else 1e-4)
    rng = np.random.default_rng(3)
    worst = 0.0
    for temperature in (1.0, 0.7) if temperature_input else (None,):
        for batch in (1, 3, 17):
            attributes = (rng.random((batch, NUM_ATTRIBUTES)) > 0.5).astype(np.float32)
            noise = rng.standard_normal((batch, LATENT_DIM), dtype=np.float32)
            got = _run(session, attributes, noise, temperature)
            with torch.no_grad():
                expected = model.generate(
                    torch.from_numpy(attributes), torch.from_numpy(noise), temperature or 1.0
                ).numpy()
            if uint8:
                assert got.dtype == np.uint8 and got.shape == (batch, height, width, 3)
                difference = np.abs(got.astype(np.int16) - quantize(expected).astype(np.int16)).max()
                assert difference <= limit, (temperature, batch, difference)
            else:
                assert got.dtype == np.float32 and got.shape == (batch, 3, height, width)
                difference = float(np.abs(got - expected).max())
                assert difference < limit, (temperature, batch, difference)
            worst = max(worst, float(difference))
    assert 0.0 <= error <= limit
    if temperature_input:  # the temperature changes the images
        attributes = np.ones((2, NUM_ATTRIBUTES), np.float32)
        noise = rng.standard_normal((2, LATENT_DIM), dtype=np.float32)
        assert (
            np.abs(
                _run(session, attributes, noise, 1.0).astype(np.float32) - _run(session, attributes, noise, 0.3)
            ).max()
            > 0
        )
    return path


@pytest.mark.parametrize("flags", FLAGS, ids=_flag_id)
def test_paper_export_variants(variant, tiny_runs, flags):
    _check_variant(variant, tiny_runs, "paper", flags)


@pytest.mark.parametrize(
    "flags",
    [dict(fp16=True, uint8=True, temperature_input=True), dict(fp16=False, uint8=False, temperature_input=True)],
    ids=_flag_id,
)
def test_resnet_learned_export_variants(variant, tiny_runs, flags):
    _check_variant(variant, tiny_runs, "resnet", flags)


def test_fp16_export_is_about_half_the_size(variant):
    fp32, _, _ = variant("paper")
    fp16, _, _ = variant("paper", fp16=True)
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size


def test_temperature_zero_standard_prior_ignores_the_noise(variant):
    import onnxruntime as ort

    path, _, _ = variant("paper", temperature_input=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    attributes = np.repeat((rng.random((1, NUM_ATTRIBUTES)) > 0.5).astype(np.float32), 4, axis=0)
    noise = 3 * rng.standard_normal((4, LATENT_DIM), dtype=np.float32)
    cold = _run(session, attributes, noise, 0.0)
    assert np.abs(cold - cold[:1]).max() == 0.0  # the same image, whatever the noise
    assert np.abs(cold - _run(session, attributes, np.zeros_like(noise), 1.0)).max() < 1e-6  # = decoding z = 0
    warm = _run(session, attributes, noise, 1.0)
    assert np.abs(warm - warm[:1]).max() > 1e-3


@pytest.mark.parametrize("flags", [dict(), dict(fp16=True, uint8=True)], ids=["fp32", "fp16-uint8"])
def test_temperature_zero_learned_prior_decodes_the_prior_mean(variant, flags):
    import onnxruntime as ort
    import torch

    from toolkit.export import quantize

    path, _, model = variant("resnet", temperature_input=True, **flags)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(6)
    attributes = (rng.random((3, NUM_ATTRIBUTES)) > 0.5).astype(np.float32)
    noise = 3 * rng.standard_normal((3, LATENT_DIM), dtype=np.float32)
    cold = _run(session, attributes, noise, 0.0)
    with torch.no_grad():
        prior_mu, _ = model.prior(torch.from_numpy(attributes))
        assert prior_mu.abs().max() > 1e-2  # a real test: the prior's mean is not 0
        mean_image = model.decoder(prior_mu, torch.from_numpy(attributes)).numpy()
    if flags:
        assert np.abs(cold.astype(np.int16) - quantize(mean_image).astype(np.int16)).max() <= 3
    else:
        assert np.abs(cold - mean_image).max() < 1e-4
    assert np.array_equal(cold, _run(session, attributes, np.zeros_like(noise), 0.0))


def test_failed_fp16_parity_check_writes_nothing(tiny_runs, tmp_path, monkeypatch):
    import re

    import toolkit.export

    monkeypatch.setattr(toolkit.export, "FP16_TOLERANCE", 1e-9)  # the real fp16 error (~1e-3) misses it
    out = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        toolkit.export.export_onnx(tiny_runs["paper"], out / "x.onnx", fp16=True)
    message = str(caught.value)
    assert "fp16" in message and "limit 1e-09" in message and "nothing was written" in message
    missed = float(re.search(r"= ([0-9.e+-]+) \(limit", message).group(1))
    assert 1e-9 < missed < 1e-2
    assert not out.exists() or list(out.iterdir()) == []


def test_default_export_names_of_the_variants(tmp_path):
    from toolkit.export import default_path

    assert default_path(tmp_path / "digits") == Path("export/digits.onnx")
    assert default_path(tmp_path / "digits", fp16=True, uint8=True) == Path("export/digits-fp16-uint8.onnx")
    assert default_path(tmp_path / "digits", temperature_input=True) == Path("export/digits-temperature.onnx")


def _copy_run(trained_run, folder: Path, run_id: str | None, step: int) -> Path:
    """A copy of the trained run, as another run (`run_id`; None: one from before run identities)."""
    shutil.copytree(trained_run, folder, ignore=shutil.ignore_patterns("checkpoints", "logs", "samples"))
    config = json.loads((folder / "config.json").read_text())
    config["extra"].pop("run_id", None)
    config["extra"].update({"step": step, **({"run_id": run_id} if run_id else {})})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_default_export_never_replaces_one_of_another_run_of_the_same_folder_name(
    trained_run, tmp_path, monkeypatch, capsys
):
    # runs/a/digits and runs/b/digits both export to export/digits.onnx: the second replaced the
    # first's model silently
    from tests.faults.test_user_mistakes import assert_one_line
    from tests.test_edit import cli
    from toolkit.export import export_onnx
    from toolkit.sessions import file_metadata

    monkeypatch.chdir(tmp_path)
    a = _copy_run(trained_run, tmp_path / "a" / "digits", "a" * 32, 5)
    b = _copy_run(trained_run, tmp_path / "b" / "digits", "b" * 32, 9)
    old = _copy_run(trained_run, tmp_path / "old" / "digits", None, 3)
    default, encoder = Path("export/digits.onnx"), Path("export/digits-encoder.onnx")

    def run_of(path: Path) -> str | None:
        return file_metadata(path).get("run_id")

    export_onnx(a, encoder=True)
    assert run_of(default) == run_of(encoder) == "a" * 32
    export_onnx(a, encoder=True)  # the same run again (after more training, say): replaced as before
    kept = default.read_bytes()
    with pytest.raises(UserError) as caught:
        export_onnx(b)
    assert str(caught.value) == (
        "export/digits.onnx holds the export of another run of the same folder name (recipe digits, step 5, "
        f"run aaaaaaaa), not of {b} (recipe digits, step 9, run bbbbbbbb): pass --out to write this one "
        "elsewhere (--out export/digits.onnx replaces that one)"
    )
    assert default.read_bytes() == kept
    # the command: one line, before the export's work; a run from before identities is not the file's run either
    assert_one_line(cli(["export", "--onnx", b], monkeypatch, capsys, tmp_path), "not of", "pass --out")
    assert_one_line(
        cli(["export", "--onnx", old], monkeypatch, capsys, tmp_path), f"not of {old} (recipe digits, step 3)"
    )
    assert default.read_bytes() == kept
    # a variant's name, and the encoder beside a decoder of this run
    export_onnx(a, fp16=True)
    with pytest.raises(UserError, match="export/digits-fp16.onnx holds the export of another run"):
        export_onnx(b, fp16=True)
    export_onnx(b, default)  # --out: what the user named is replaced
    assert run_of(default) == "b" * 32
    with pytest.raises(UserError, match="export/digits-encoder.onnx holds .* replaces that one"):
        export_onnx(b, encoder=True)
    assert run_of(encoder) == "a" * 32
    export_onnx(b, default, encoder=True)
    assert run_of(encoder) == "b" * 32
    # a file that records no run (an older export) tells nothing: replaced as before
    export_onnx(old, default)
    assert run_of(default) is None
    export_onnx(a)
    assert run_of(default) == "a" * 32
    # --int8's file beside the default name (its metadata is the fp32 file's, run_id included)
    export_onnx(b, default)
    shutil.copyfile(tmp_path / "export" / "digits-fp16.onnx", tmp_path / "export" / "digits-int8.onnx")  # a's
    result = cli(["export", "--onnx", b, "--int8"], monkeypatch, capsys, tmp_path)
    assert_one_line(result, "export/digits-int8.onnx holds the export of another run", "--out export/digits.onnx")


def test_opset_older_than_18_is_refused(tiny_runs, tmp_path):
    from toolkit.export import export_onnx

    with pytest.raises(UserError, match="opset 17"):
        export_onnx(tiny_runs["paper"], tmp_path / "x.onnx", opset=17)
    assert list(tmp_path.iterdir()) == []


def test_generate_temperature_default_and_tensor():
    """CVAE.generate's temperature: 1.0 changes nothing; a float or a [1] tensor scales the noise."""
    import torch

    from toolkit.model import CVAE, ModelSpec

    torch.manual_seed(0)
    model = CVAE(ModelSpec(["a", "b"], (8, 8), 4)).eval()
    attributes, noise = torch.tensor([[1.0, 0.0]]), torch.randn(1, 4)
    with torch.no_grad():
        base = model.generate(attributes, noise)
        assert torch.equal(model.generate(attributes, noise, 1.0), base)
        assert torch.allclose(model.generate(attributes, noise, 0.5), model.generate(attributes, 0.5 * noise))
        assert torch.allclose(
            model.generate(attributes, noise, torch.tensor([0.5])), model.generate(attributes, 0.5 * noise)
        )


def _readme_example() -> str:
    text = (Path(__file__).resolve().parent.parent / "export" / "README.md").read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_embedding_example_runs(exported, tmp_path, monkeypatch):
    from PIL import Image

    code = _readme_example()
    assert len(code.strip().splitlines()) <= 16
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("export/digits.onnx", str(exported)), "README.md", "exec"), {})
    with Image.open(tmp_path / "sevens.png") as picture:
        assert picture.size == (8 * SIZE, SIZE)


def test_readme_embedding_example_with_a_uint8_temperature_export(variant, tmp_path, monkeypatch):
    """The README's note: for --uint8 skip the post-processing line, for --temperature-input feed a temperature."""
    from PIL import Image

    path, _, _ = variant("paper", uint8=True, temperature_input=True)
    code = _readme_example().replace("export/digits.onnx", str(path)).replace('"digit_7"', '"attr_7"')
    code = "\n".join("pixels = images" if line.startswith("pixels = ") else line for line in code.splitlines())
    code = code.replace('"noise": noise}', '"noise": noise, "temperature": np.array([0.7], np.float32)}')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    with Image.open(tmp_path / "sevens.png") as picture:
        assert picture.size == (8 * PAPER_SIZE[1], PAPER_SIZE[0])


def test_paths_as_python_file_apis_take_them(tmp_path):
    import os

    from toolkit.export import export_onnx

    with pytest.raises(TypeError, match=r"^export_onnx\(run_dir\): expected the run folder as .*, got NoneType$"):
        export_onnx(None)
    with pytest.raises(TypeError, match=r"^export_onnx\(out=\): .*, got int$"):
        export_onnx(tmp_path, out=3)
    # bytes pass the door and reach the run folder's own check
    with pytest.raises(UserError, match=f"{tmp_path / 'run'} is not a trained run"):
        export_onnx(os.fsencode(tmp_path / "run"), out=os.fsencode(tmp_path / "run.onnx"))


def test_a_folder_whose_name_is_not_utf8_holds_weights_and_exports_that_every_reader_opens(tmp_path):
    """safetensors' and ONNX Runtime's readers take UTF-8 paths only, and Linux names may hold other
    bytes (Python's surrogate escapes): files are read with Python and given to them as bytes, or,
    where a library must have the name, refused in one line that shows the bytes."""
    import onnx
    import torch

    from toolkit.classifier import AttributeClassifier, load_classifier, save_classifier
    from toolkit.export import export_onnx
    from toolkit.model import CVAE, ModelSpec, load_model, save_model
    from toolkit.safe_load import verify_checkpoint
    from toolkit.sampler import Sampler
    from toolkit.sessions import session_plan
    from toolkit.web import build as web_build

    folder = tmp_path / os.fsdecode(b"m\xffodel")
    try:
        folder.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    shown = r"m\xffodel"  # how the refusals print the folder

    torch.manual_seed(0)
    model = CVAE(ModelSpec(attributes=["a", "b", "c"], image_size=(8, 8), latent_dim=4))
    save_model(model, folder / "run")
    loaded = load_model(folder / "run")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    path, _ = export_onnx(folder / "run", folder / "tiny.onnx")  # reads the weights, writes beside them

    plain = tmp_path / "plain"  # the same file at a UTF-8 path: the same images
    plain.mkdir()
    shutil.copy(path, plain / "tiny.onnx")
    wanted = Sampler(plain / "tiny.onnx", device="cpu").sample({"a": 1}, n=3, seed=7)
    assert np.array_equal(Sampler(path, device="cpu").sample({"a": 1}, n=3, seed=7), wanted)

    save_classifier(AttributeClassifier(["a", "b"], (8, 8), width=4, depth=2), folder / "classifier")
    assert load_classifier(folder / "classifier").meta["attributes"] == ["a", "b"]

    dist = tmp_path / "dist"
    dist.mkdir()
    for name in web_build.ORT_FILES:
        (dist / name).write_text("// stand-in\n")
    page = web_build.build_page(path, folder / "page", ort_dist=dist)
    assert json.loads((page / "model.json").read_text())["decoder"]["file"] == "tiny.onnx"

    # Where a library must have the name: one line each, nothing half done.
    named = plain / os.fsdecode(b"n\xff.onnx")
    shutil.copy(path, named)
    with pytest.raises(UserError, match=r"n\\xff\.onnx: the file name is not valid UTF-8, and the page asks"):
        web_build.build_page(named, tmp_path / "page", ort_dist=dist)
    assert not (tmp_path / "page").exists()
    with pytest.raises(UserError, match=rf"{re.escape(shown)}/tiny.onnx: the path is not valid UTF-8, .*TensorRT"):
        session_plan(path, "tensorrt")
    shutil.copy(folder / "run" / "model.safetensors", folder / "checkpoint.safetensors")
    with pytest.raises(UserError, match=r"not valid UTF-8, and Accelerate's checkpoint loader \(safetensors\)"):
        verify_checkpoint(folder)  # Accelerate's load_state opens it by name

    # Weights in a file beside the model: ONNX Runtime finds them by the model's path only.
    external = dict(save_as_external_data=True, location="external.onnx.data")  # tensors over 1 KB
    onnx.save(onnx.load(str(path)), str(plain / "external.onnx"), **external)
    assert (plain / "external.onnx.data").stat().st_size > 1000
    for name in ("external.onnx", "external.onnx.data"):
        shutil.copy(plain / name, folder / name)  # (onnx's own writer of such files takes UTF-8 only too)
    assert np.array_equal(Sampler(plain / "external.onnx", device="cpu").sample({"a": 1}, n=3, seed=7), wanted)
    with pytest.raises(UserError, match=r"its weights are in files beside it, which bytes cannot point to"):
        Sampler(folder / "external.onnx", device="cpu")
