"""toolkit.sessions: the file's metadata read before any session, the one session opened with the
options that metadata calls for, and the runners' agreement (test_sampler checks their images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit import sessions
from toolkit.sampler import Sampler
from toolkit.sessions import (
    CPU,
    CUDA,
    TENSORRT,
    BoundRun,
    GraphRun,
    PlainRun,
    engine_cache,
    file_metadata,
    session_plan,
)


def _onnx_metadata(path: Path) -> dict[str, str]:
    return {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.fixture(scope="module")
def variants(trained_run, exported, tmp_path_factory) -> dict[str, Path]:
    from toolkit.export import export_onnx

    folder = tmp_path_factory.mktemp("variants")
    fp16, _ = export_onnx(trained_run, folder / "digits-fp16.onnx", fp16=True)
    uint8, _ = export_onnx(trained_run, folder / "digits-uint8.onnx", uint8=True)
    export_onnx(trained_run, folder / "digits.onnx", encoder=True)
    return {"fp32": exported, "fp16": fp16, "uint8": uint8, "encoder": folder / "digits-encoder.onnx"}


def test_file_metadata_is_what_onnx_reads(variants):
    for name, path in variants.items():
        expected = _onnx_metadata(path)
        assert expected and file_metadata(path) == expected, name
    assert file_metadata(variants["fp16"])["precision"] == "fp16"
    assert file_metadata(variants["fp32"])["precision"] == "fp32"


def test_file_metadata_of_what_is_not_an_onnx_file_is_empty(exported, tmp_path):
    data = exported.read_bytes()
    cases = {
        "empty": b"",
        "text": b"hello, this is not protobuf\n",
        "truncated": data[: len(data) // 2],
        "one byte short": data[:-1],
        "long varint": b"\xff" * 20,
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(content)
        assert file_metadata(path) == {}, name
    assert file_metadata(tmp_path / "missing.onnx") == {}
    assert file_metadata(tmp_path) == {}  # a folder


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_file_metadata_never_raises_on_any_bytes(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("bytes") / "x.onnx"
    path.write_bytes(content)
    result = file_metadata(path)
    assert isinstance(result, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in result.items())


def test_the_plan_follows_the_device_and_the_files_precision(variants, monkeypatch):
    assert session_plan(variants["fp16"], "cpu").providers == [CPU]
    monkeypatch.setattr(sessions, "wants_cuda", lambda device: True)
    assert session_plan(variants["fp32"], "cuda").providers == [(CUDA, {}), CPU]
    assert session_plan(variants["fp16"], "cuda").providers == [(CUDA, {"prefer_nhwc": "1"}), CPU]
    graph = session_plan(variants["fp16"], "cuda", graph_batch=8)
    assert graph.providers == [(CUDA, {"enable_cuda_graph": "1", "prefer_nhwc": "1"}), CPU]
    assert graph.graph_batch == 8 and graph.cuda


def test_a_sampler_opens_one_session_with_the_planned_options(variants, monkeypatch):
    # As on a GPU machine (CUDA wanted), but each session really opened on the CPU: what was asked
    # for is recorded. An fp16 file must get its channels-last option in its one and only session.
    opened = []
    real = ort.InferenceSession

    def recording(path, options=None, providers=None, **kwargs):
        opened.append((Path(path).name, providers))
        return real(path, options, providers=[CPU], **kwargs)

    monkeypatch.setattr(sessions, "wants_cuda", lambda device: True)
    monkeypatch.setattr(sessions.ort, "InferenceSession", recording)
    Sampler(variants["fp16"], device="auto")
    assert opened == [("digits-fp16.onnx", [(CUDA, {"prefer_nhwc": "1"}), CPU])]
    opened.clear()
    Sampler(variants["fp32"], device="auto")
    assert opened == [(variants["fp32"].name, [(CUDA, {}), CPU])]


def test_the_three_runners_give_the_same_output(exported):
    rows = 10
    session = ort.InferenceSession(str(exported), providers=[CPU])
    meta = session.get_modelmeta().custom_metadata_map
    width, latent = len(json.loads(meta["attributes"])), int(meta["latent_dim"])
    image_dims = (3, *json.loads(meta["image_size"]))
    rng = np.random.default_rng(0)
    feed = {
        "attributes": (rng.random((rows, width)) > 0.5).astype(np.float32),
        "noise": rng.standard_normal((rows, latent), dtype=np.float32),
    }
    if "temperature" in [i.name for i in session.get_inputs()]:
        feed["temperature"] = np.ones(1, np.float32)
    plain = PlainRun(session)(feed)
    assert plain.shape == (rows, *image_dims)
    np.testing.assert_array_equal(BoundRun(session, "cpu")(feed), plain)
    graph = GraphRun(session, "cpu", 16, image_dims, "float32")
    np.testing.assert_array_equal(graph(feed), plain)  # padded from 10 to 16 rows, the padding dropped
    short = {name: array if name == "temperature" else array[:3] for name, array in feed.items()}
    np.testing.assert_array_equal(graph(short), plain[:3])  # the same buffers, refilled


# -- TensorRT: what can be checked without a GPU (the engine itself: tests/test_sampler.py, GPU only) --


def test_the_tensorrt_plan_caches_engines_beside_the_file_per_weights(variants):
    path = variants["fp16"]
    meta = file_metadata(path)
    plan = session_plan(path, "tensorrt", max_batch=64)
    (first, trt_options), (second, cuda_options), third = plan.providers
    assert (first, second, third) == (TENSORRT, CUDA, CPU)  # what TensorRT cannot take runs on CUDA
    assert cuda_options == {"prefer_nhwc": "1"}
    cache = path.parent / "digits-fp16.trt" / f"{meta['weights_sha256'][:16]}-b64"
    assert plan.engine_cache == cache and engine_cache(path, meta, 64) == cache
    assert trt_options["trt_fp16_enable"] == "1" and trt_options["trt_engine_cache_path"] == str(cache)
    width, latent = len(json.loads(meta["attributes"])), int(meta["latent_dim"])
    assert trt_options["trt_profile_min_shapes"] == f"attributes:1x{width},noise:1x{latent}"
    assert trt_options["trt_profile_max_shapes"] == f"attributes:64x{width},noise:64x{latent}"
    assert not cache.exists()  # a plan makes nothing
    # other weights or a larger batch, other engines: an export replaced under the same name, or opened
    # for larger batches, never reuses old ones; a file without weights_sha256 is told by size and time
    assert engine_cache(path, {**meta, "weights_sha256": "0" * 64}, 64) != cache
    assert engine_cache(path, meta, 256) != cache
    unnamed = engine_cache(path, {}, 64)
    assert unnamed.parent == cache.parent and unnamed.name.startswith(f"file-{path.stat().st_size}-")


@pytest.mark.skipif("__import__('toolkit.sessions').sessions.cuda_device_present()", reason="this machine has a GPU")
def test_tensorrt_without_a_gpu_or_its_libraries_is_one_error_and_leaves_nothing(exported, tmp_path, monkeypatch):
    import shutil

    from toolkit.errors import UserError

    path = tmp_path / "digits.onnx"
    shutil.copy(exported, path)
    with pytest.raises(UserError, match="device='tensorrt' needs an NVIDIA GPU"):
        Sampler(path, device="tensorrt")
    with pytest.raises(UserError, match="cuda_graph=True needs device='cuda'.*TensorRT runs its own"):
        Sampler(path, device="tensorrt", cuda_graph=True)
    # A GPU machine without TensorRT's libraries: ONNX Runtime falls back to another provider, which
    # is refused (a user who asked for TensorRT must not silently get something else), and the
    # engine cache folder made for the attempt is removed again.
    monkeypatch.setattr(sessions, "cuda_device_present", lambda: True)
    with pytest.raises(UserError, match="cannot use TensorRT on this machine.*cvae-tk\\[tensorrt\\]"):
        Sampler(path, device="tensorrt", batch_size=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.onnx"]


def test_an_unknown_device_names_the_four(exported):
    from toolkit.errors import UserError

    with pytest.raises(UserError, match="device must be auto, cpu, cuda or tensorrt, got 'gpu'"):
        Sampler(exported, device="gpu")


@pytest.mark.skipif("__import__('toolkit.sessions').sessions.cuda_device_present()", reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_cvae_tk_sample_on_a_gpu_device_without_a_gpu_is_one_line(exported, tmp_path, device):
    from tests.test_cli import assert_user_error, run_cli

    # one line: ONNX Runtime is not asked (it would print its own failed library loads first)
    result = run_cli(["sample", exported, "--device", device, "--grid", "g.png"], tmp_path)
    assert_user_error(result, f"device='{device}' needs an NVIDIA GPU, and this machine has none")
    assert not (tmp_path / "g.png").exists()


def test_cuda_from_an_onnxruntime_without_its_provider_is_one_error(exported, monkeypatch):
    from toolkit.errors import UserError

    monkeypatch.setattr(sessions, "cuda_device_present", lambda: True)
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UserError, match="device='cuda' needs onnxruntime-gpu"):
        Sampler(exported, device="cuda")


def test_file_metadata_passes_over_a_field_14_of_another_wire_type(tmp_path):
    # protobuf's own parser treats these as unknown fields: ONNX Runtime never sees them as metadata
    for content in (b"\x71" + b"\x0a\x01A\x12\x03fp1", b"\x75\x0a\x00\x12\x00"):
        path = tmp_path / "wire.onnx"
        path.write_bytes(content)
        assert file_metadata(path) == {}


_REAL_SESSION = ort.InferenceSession


class _AsIfTensorRT:
    """A CPU session that says it runs on TensorRT: the Sampler's checks after opening, without a GPU."""

    def __init__(self, path, options=None, providers=None, **kwargs):
        self._session = _REAL_SESSION(path, options, providers=[CPU])

    def get_providers(self):
        return [TENSORRT, CPU]

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_the_engine_cache_stays_for_a_file_that_serves_and_goes_for_one_refused(exported, tmp_path, monkeypatch):
    import shutil

    from toolkit.errors import UserError

    monkeypatch.setattr(sessions, "cuda_device_present", lambda: True)
    monkeypatch.setattr(sessions, "preload_tensorrt", lambda: None)
    monkeypatch.setattr(sessions.ort, "InferenceSession", _AsIfTensorRT)
    good = tmp_path / "good" / "digits.onnx"
    good.parent.mkdir()
    shutil.copy(exported, good)
    sampler = Sampler(good, device="tensorrt", batch_size=8)
    assert sampler.provider == TENSORRT and sampler.io_binding
    assert [p.name for p in (good.parent / "digits.trt").iterdir()] == [
        f"{file_metadata(good)['weights_sha256'][:16]}-b8"
    ]
    # refused after opening (its metadata disagrees with its graph): nothing of it stays
    model = onnx.load(str(exported))
    for entry in model.metadata_props:
        if entry.key == "latent_dim":
            entry.value = "17"
    bad = tmp_path / "bad" / "digits.onnx"
    bad.parent.mkdir()
    onnx.save(model, str(bad))
    with pytest.raises(UserError, match="input 'noise' has shape"):
        Sampler(bad, device="tensorrt", batch_size=8)
    assert sorted(p.name for p in bad.parent.iterdir()) == ["digits.onnx"]

    # stopped while the engine builds (Ctrl-C): nothing half-built stays either
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sessions.ort, "InferenceSession", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Sampler(bad, device="tensorrt", batch_size=8)
    assert sorted(p.name for p in bad.parent.iterdir()) == ["digits.onnx"]
