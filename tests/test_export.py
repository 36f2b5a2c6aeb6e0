"""The ONNX export: parity with PyTorch, the metadata contract, and nothing written on failure."""

from __future__ import annotations

import json
import shutil

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
    spec = ModelSpec([f"a{i}" for i in range(NUM_ATTRIBUTES)], (SIZE, SIZE), LATENT_DIM, arch, prior=prior, options=options)
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
