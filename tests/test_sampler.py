"""toolkit.sampler: runs without torch, draws reproducible noise, matches PyTorch, and rejects bad input clearly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from toolkit.errors import UserError
from toolkit.sampler import Sampler, image_grid
from toolkit.sessions import GraphRun

ROOT = Path(__file__).resolve().parent.parent
DIGITS = [f"digit_{i}" for i in range(10)]
LATENT_DIM = 16  # the digits recipe


@pytest.fixture(scope="module")
def sampler(exported) -> Sampler:
    return Sampler(exported, device="cpu")


def test_sampler_reads_the_metadata(sampler):
    assert sampler.attributes == DIGITS
    assert sampler.latent_dim == LATENT_DIM
    assert tuple(sampler.image_size) == (32, 32)
    assert sampler.provider == "CPUExecutionProvider"
    assert sampler.metadata["cvae_tk.format"] == "sampler/1"


BLOCKED_TORCH = textwrap.dedent(
    """
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test ({name})")
            return None

    sys.meta_path.insert(0, BlockTorch())
    try:
        import torch
    except ImportError:
        pass
    else:
        raise SystemExit("the torch blocker does not work")

    from toolkit.sampler import Sampler

    images = Sampler(sys.argv[1]).sample({"digit_3": 1}, n=4, seed=0)
    assert images.shape == (4, 32, 32, 3), images.shape
    assert images.dtype.name == "uint8", images.dtype
    assert "torch" not in sys.modules, "torch was imported"
    assert not any(name.startswith("torch.") for name in sys.modules), "a torch submodule was imported"
    print("sampled", images.shape)
    """
)


def test_sampler_works_where_torch_cannot_be_imported(exported):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_TORCH, str(exported)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sampled (4, 32, 32, 3)" in result.stdout


def test_same_seed_same_images_other_seed_other_images(sampler):
    first = sampler.sample({"digit_3": 1}, n=4, seed=123)
    again = sampler.sample({"digit_3": 1}, n=4, seed=123)
    other = sampler.sample({"digit_3": 1}, n=4, seed=124)
    assert first.shape == (4, 32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # the images within one call differ too (each gets its own noise)
    assert not np.array_equal(first[0], first[1])


def test_result_sizes_and_condition_by_condition_order(sampler):
    assert sampler.sample({"digit_3": 1}, n=5, seed=0).shape == (5, 32, 32, 3)

    mappings = [{"digit_1": 1}, {"digit_5": 1}, {"digit_9": 1}]
    from_list = sampler.sample(mappings, n=2, seed=7)
    assert from_list.shape == (6, 32, 32, 3)

    array = np.zeros((4, 10), dtype=np.float32)
    array[[0, 1, 2, 3], [2, 4, 6, 8]] = 1
    from_array = sampler.sample(array, n=3, seed=1)
    assert from_array.shape == (12, 32, 32, 3)

    # a list of mappings and the equivalent array are the same conditions
    np.testing.assert_array_equal(
        sampler.sample(array[:3], n=2, seed=7),
        sampler.sample([{"digit_2": 1}, {"digit_4": 1}, {"digit_6": 1}], n=2, seed=7),
    )

    # order: rows are condition 0 x n, condition 1 x n, ... with noise drawn for all rows at once
    rows = np.repeat(array, 3, axis=0)
    noise = np.random.default_rng(1).standard_normal((12, LATENT_DIM), dtype=np.float32)
    expected = np.round(np.clip(sampler.run(rows, noise), 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(from_array, expected)
    interleaved = np.tile(array, (3, 1))  # condition 0, 1, 2, 3, 0, 1, ... would differ
    wrong = np.round(np.clip(sampler.run(interleaved, noise), 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert not np.array_equal(from_array, wrong)


def test_images_match_pytorch(sampler, trained_run):
    import torch

    from toolkit.model import load_model

    model = load_model(trained_run)
    mappings = [{"digit_0": 1}, {"digit_7": 1, "digit_2": 1}, {}]
    n, seed = 3, 42
    images = sampler.sample(mappings, n=n, seed=seed)

    attributes = np.zeros((3, 10), dtype=np.float32)
    attributes[0, 0] = attributes[1, 7] = attributes[1, 2] = 1
    rows = np.repeat(attributes, n, axis=0)
    noise = np.random.default_rng(seed).standard_normal((len(rows), LATENT_DIM), dtype=np.float32)
    with torch.no_grad():
        reference = model.generate(torch.from_numpy(rows), torch.from_numpy(noise)).numpy()
    expected = np.round(np.clip(reference, 0, 1) * 255).transpose(0, 2, 3, 1)

    assert images.shape == expected.shape == (9, 32, 32, 3)
    difference = np.abs(images.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 1
    assert images.std() > 1  # real pictures, not a constant


def test_batch_size_does_not_change_the_images(exported, sampler):
    small = Sampler(exported, device="cpu", batch_size=3)
    np.testing.assert_array_equal(
        small.sample({"digit_1": 1}, n=10, seed=5), sampler.sample({"digit_1": 1}, n=10, seed=5)
    )


# -- errors ------------------------------------------------------------------------------------


def test_unknown_attribute_suggests_a_close_match(sampler):
    with pytest.raises(UserError) as caught:
        sampler.sample({"digit_33": 1}, n=1)
    message = str(caught.value)
    assert "digit_33" in message
    assert "did you mean digit_3" in message
    assert all(name in message for name in DIGITS)


@pytest.mark.parametrize("value", [2, -1, 0.5, "1"])
def test_attribute_value_must_be_0_or_1(sampler, value):
    with pytest.raises(UserError) as caught:
        sampler.sample({"digit_3": value}, n=1)
    assert "digit_3" in str(caught.value)
    assert "0 or 1" in str(caught.value)


def test_attribute_array_of_wrong_width(sampler):
    with pytest.raises(UserError) as caught:
        sampler.sample(np.zeros((2, 7), dtype=np.float32), n=1)
    assert "(2, 7)" in str(caught.value)
    assert "10" in str(caught.value)


def test_attribute_array_values_must_be_0_or_1(sampler):
    array = np.zeros((2, 10), dtype=np.float32)
    array[1, 4] = 0.5
    with pytest.raises(UserError, match="0 or 1"):
        sampler.sample(array, n=1)


@pytest.mark.parametrize("n", [0, -2, 1.5, True])
def test_n_must_be_a_positive_integer(sampler, n):
    with pytest.raises(UserError, match="n must be an integer >= 1"):
        sampler.sample({"digit_3": 1}, n=n)


def test_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UserError) as caught:
        Sampler(path, device="cpu")
    assert str(path) in str(caught.value)
    assert "not a loadable ONNX model" in str(caught.value)


def test_onnx_model_without_cvae_metadata(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    path = tmp_path / "identity.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UserError) as caught:
        Sampler(path, device="cpu")
    assert "not a cvae-tk sampler" in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "model.onnx"
    with pytest.raises(UserError) as caught:
        Sampler(path)
    assert "not found" in str(caught.value)
    assert str(path) in str(caught.value)


def test_bad_device_and_batch_size(exported):
    with pytest.raises(UserError, match="device"):
        Sampler(exported, device="gpu")
    with pytest.raises(UserError, match="batch_size"):
        Sampler(exported, batch_size=0)


@pytest.mark.parametrize(
    "option, value",
    [("io_binding", "yes"), ("io_binding", "no"), ("io_binding", 1), ("cuda_graph", "no"), ("cuda_graph", None)],
)
def test_switches_that_are_not_bools_are_refused(tiny_onnx, option, value):
    """Sampler(io_binding="yes") was taken as True (and "no", truthy too, as well): a switch is a bool."""
    with pytest.raises(UserError) as caught:
        Sampler(tiny_onnx, device="cpu", **{option: value})
    unset = " or None (the device chooses)" if option == "io_binding" else ""
    assert str(caught.value) == f"{option} must be True or False{unset}, got {value!r}"


def test_switches_take_bools_of_numpy_too(tiny_onnx):
    with Sampler(tiny_onnx, device="cpu", io_binding=np.bool_(False), cuda_graph=np.False_) as sampler:
        assert sampler.io_binding is False and sampler.cuda_graph is False


def _onnxruntime_really_uses_cuda(path: Path) -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:
        return False
    return "CUDAExecutionProvider" in session.get_providers()


def test_cuda_asked_for_on_a_machine_without_it(exported):
    if _onnxruntime_really_uses_cuda(exported):
        pytest.skip("ONNX Runtime can use CUDA here")
    with pytest.raises(UserError) as caught:
        Sampler(exported, device="cuda")
    assert "cuda" in str(caught.value).lower()
    assert "device='cpu'" in str(caught.value)


# -- image_grid --------------------------------------------------------------------------------


def test_image_grid_layout():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 4, 6, 3), dtype=np.uint8)  # never 255: padding is distinguishable
    grid = image_grid(images, columns=2, padding=2)
    assert grid.shape == (3 * (4 + 2) + 2, 2 * (6 + 2) + 2, 3)
    assert grid.dtype == np.uint8

    covered = np.zeros(grid.shape[:2], dtype=bool)
    for index, image in enumerate(images):
        top = 2 + (index // 2) * (4 + 2)
        left = 2 + (index % 2) * (6 + 2)
        np.testing.assert_array_equal(grid[top : top + 4, left : left + 6], image)
        covered[top : top + 4, left : left + 6] = True
    assert covered.sum() == 5 * 4 * 6
    assert (grid[~covered] == 255).all()  # padding and the empty sixth cell
    # spot checks: image 3 is row 1, column 1; image 4 starts row 2
    np.testing.assert_array_equal(grid[8, 10], images[3, 0, 0])
    np.testing.assert_array_equal(grid[14, 2], images[4, 0, 0])
    assert (grid[14:18, 10:16] == 255).all()


def test_io_binding_path_gives_the_same_images(exported, sampler):
    bound = Sampler(exported, device="cpu", io_binding=True, batch_size=7)
    assert bound.io_binding and not sampler.io_binding
    attributes = np.eye(10, dtype=np.float32)
    assert np.array_equal(bound.sample(attributes, n=2, seed=5), sampler.sample(attributes, n=2, seed=5))


def test_temperature_zero_removes_the_noise_and_one_is_the_default(sampler):
    cold = sampler.sample({"digit_4": 1}, n=3, seed=1, temperature=0.0)
    assert np.array_equal(cold[0], cold[1]) and np.array_equal(cold[0], cold[2])
    assert np.array_equal(
        sampler.sample({"digit_4": 1}, n=3, seed=1, temperature=1.0), sampler.sample({"digit_4": 1}, n=3, seed=1)
    )
    warm = sampler.sample({"digit_4": 1}, n=3, seed=1, temperature=0.5)
    assert not np.array_equal(warm[0], warm[1])
    for bad in (-1.0, "hot", True):
        with pytest.raises(UserError, match="temperature"):
            sampler.sample({"digit_4": 1}, temperature=bad)


def test_base_vector_fills_the_unnamed_attributes(sampler):
    base = np.zeros(10, np.float32)
    base[7] = 1
    rows = sampler.conditions([{"digit_2": 1}, {"digit_7": 0}], base=base)
    assert rows[0].tolist() == [0, 0, 1, 0, 0, 0, 0, 1, 0, 0] and rows[1].tolist() == [0] * 10
    assert sampler.conditions({"digit_1": 1}, base={"digit_3": 1})[0].tolist() == [0, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    with pytest.raises(UserError, match="shape"):
        sampler.conditions({"digit_1": 1}, base=np.ones(4))


def test_one_sampler_serves_many_threads(sampler):
    from concurrent.futures import ThreadPoolExecutor

    calls = [(np.eye(10, dtype=np.float32)[i % 10 : i % 10 + 1], 1 + i % 3, i) for i in range(40)]
    expected = [sampler.sample(a, n=n, seed=seed) for a, n, seed in calls]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda call: sampler.sample(call[0], n=call[1], seed=call[2]), calls))
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


# -- the fixed-batch (CUDA graph) path and the checks made before any run -----------------------


def test_fixed_batch_path_gives_the_same_images(exported, sampler):
    # The CUDA-graph path's buffer handling (allocate once, update in place, pad the last batch),
    # run on the CPU provider; the graph capture itself needs a GPU (test_cuda_graph_... below).
    fixed = Sampler(exported, device="cpu", batch_size=4)
    contract = fixed.contract
    fixed._run = GraphRun(fixed.session, "cpu", fixed.batch_size, contract.image_dims, contract.output_dtype)
    attributes = np.eye(10, dtype=np.float32)
    for n, seed in [(1, 0), (3, 1), (1, 2)]:  # 10, 30, 10 rows: full and padded batches, reused buffers
        assert np.array_equal(fixed.sample(attributes, n=n, seed=seed), sampler.sample(attributes, n=n, seed=seed))
    user_rows = attributes[:3].copy()
    user_noise = np.ones((3, LATENT_DIM), np.float32)
    fixed.run(user_rows, user_noise)
    fixed.run(attributes[5:8], np.zeros((3, LATENT_DIM), np.float32))
    assert np.array_equal(user_rows, attributes[:3]) and (user_noise == 1).all()  # callers' arrays never written


def test_cuda_graph_needs_cuda(exported):
    with pytest.raises(UserError, match="cuda_graph=True needs device='cuda'"):
        Sampler(exported, device="cpu", cuda_graph=True)
    if not _onnxruntime_really_uses_cuda(exported):
        with pytest.raises(UserError, match="cuda"):
            Sampler(exported, device="auto", cuda_graph=True)


@pytest.mark.skipif("not __import__('toolkit.sessions').sessions.cuda_device_present()", reason="needs a GPU")
def test_cuda_io_binding_and_cuda_graph_give_the_cpu_images(exported, sampler):
    if not _onnxruntime_really_uses_cuda(exported):
        pytest.skip("ONNX Runtime cannot use CUDA here")
    attributes = np.eye(10, dtype=np.float32)
    expected = sampler.sample(attributes, n=3, seed=4)
    plain = Sampler(exported, device="cuda", batch_size=8)
    graph = Sampler(exported, device="cuda", batch_size=8, cuda_graph=True)
    assert plain.provider == graph.provider == "CUDAExecutionProvider" and plain.io_binding
    for other in (plain, graph):
        got = other.sample(attributes, n=3, seed=4)
        assert np.abs(got.astype(int) - expected).max() <= 1  # GPU and CPU kernels round differently
    # Same batch shapes (30 rows in batches of 8, the last one padded or not): the same images.
    assert np.array_equal(graph.sample(attributes, n=3, seed=4), plain.sample(attributes, n=3, seed=4))
    # One row: the graph still runs a batch of 8, and GPU kernels for other batch sizes may round
    # the last bit differently (seen on an H200), so within one grey level.
    one = graph.sample(attributes[:1], n=1, seed=9)
    assert np.abs(one.astype(int) - plain.sample(attributes[:1], n=1, seed=9)).max() <= 1
    assert np.array_equal(one, graph.sample(attributes[:1], n=1, seed=9))  # replays are deterministic


def _with_metadata(exported: Path, tmp_path: Path, **changes) -> Path:
    import onnx

    model = onnx.load(str(exported))
    entries = {p.key: p.value for p in model.metadata_props}
    entries.update(changes)
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    path = tmp_path / "changed.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"latent_dim": "17"}, "input 'noise' has shape"),
        ({"attributes": '["a", "b"]'}, "input 'attributes' has shape"),
        ({"attributes": '["a", "a", "b", "c", "d", "e", "f", "g", "h", "i"]'}, "distinct"),
        ({"attributes": '{"a": 1}'}, "must be a non-empty JSON list of names"),
        ({"image_size": "[32]"}, r"'image_size' must be \[height, width\]"),
        ({"image_size": "[64, 64]"}, "output 'images' has shape"),
        ({"image_size": "[100000, 32]"}, "image height = 100000"),
        ({"latent_dim": "0"}, "latent_dim = 0"),
        ({"output": "uint8_nhwc"}, "output 'images' is float32, but the metadata says output=uint8_nhwc"),
    ],
)
def test_a_file_whose_shapes_disagree_with_its_metadata_is_refused_before_any_run(
    exported, tmp_path, changes, message
):
    path = _with_metadata(exported, tmp_path, **changes)
    with pytest.raises(UserError, match=message) as caught:
        Sampler(path, device="cpu")
    assert str(path) in str(caught.value)


def test_wrong_input_names_and_absurd_batch_sizes_are_refused(exported, tmp_path):
    import onnx

    model = onnx.load(str(exported))
    for node in model.graph.node:
        node.input[:] = ["z" if name == "noise" else name for name in node.input]
    model.graph.input[1].name = "z"
    path = tmp_path / "renamed.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UserError, match=r"inputs \['attributes', 'z'\], expected attributes, noise"):
        Sampler(path, device="cpu")
    with pytest.raises(UserError, match="GiB per batch"):
        Sampler(exported, device="cpu", batch_size=10**9)
    for bad in (2.5, "8", True):
        with pytest.raises(UserError, match="batch_size"):
            Sampler(exported, device="cpu", batch_size=bad)


@pytest.mark.skipif("not __import__('toolkit.sessions').sessions.cuda_device_present()", reason="needs a GPU")
def test_fp16_and_uint8_exports_on_cuda_with_and_without_the_graph(trained_run, exported, sampler, tmp_path):
    if not _onnxruntime_really_uses_cuda(exported):
        pytest.skip("ONNX Runtime cannot use CUDA here")
    from toolkit.export import export_onnx

    path, _ = export_onnx(trained_run, tmp_path / "digits-fp16-uint8.onnx", fp16=True, uint8=True)
    attributes = np.eye(10, dtype=np.float32)
    expected = sampler.sample(attributes, n=2, seed=3)  # fp32 on the CPU
    for cuda_graph in (False, True):
        half = Sampler(path, device="cuda", batch_size=8, cuda_graph=cuda_graph)  # fp16: channels-last session
        got = half.sample(attributes, n=2, seed=3)
        assert got.shape == expected.shape and got.dtype == np.uint8
        assert np.abs(got.astype(int) - expected).max() <= 3  # fp16 arithmetic: a few grey levels


def _tensorrt_usable(path: Path) -> bool:
    try:
        Sampler(path, device="tensorrt", batch_size=8)
    except UserError:
        return False
    return True


@pytest.mark.skipif("not __import__('toolkit.sessions').sessions.cuda_device_present()", reason="needs a GPU")
def test_tensorrt_gives_the_cpu_images_within_fp16_rounding_and_reuses_its_engines(exported, sampler, tmp_path):
    import shutil

    path = tmp_path / "digits.onnx"
    shutil.copy(exported, path)
    if not _tensorrt_usable(path):
        pytest.skip("ONNX Runtime cannot use TensorRT here (pip install 'cvae-tk[tensorrt]')")
    attributes = np.eye(10, dtype=np.float32)
    expected = sampler.sample(attributes, n=3, seed=4)  # fp32 on the CPU
    trt = Sampler(path, device="tensorrt", batch_size=8)  # engines built by _tensorrt_usable: read from the cache
    assert trt.provider == "TensorrtExecutionProvider" and trt.io_binding
    got = trt.sample(attributes, n=3, seed=4)  # 30 rows: batches of 8 and a short one, one engine
    difference = np.abs(got.astype(int) - expected)
    assert difference.mean() <= 1 and difference.max() <= 8  # fp16 arithmetic: a few grey levels
    assert any((tmp_path / "digits.trt").rglob("*.engine"))
    assert np.array_equal(Sampler(path, device="tensorrt", batch_size=8).sample(attributes, n=3, seed=4), got)


def test_inputs_beyond_float32_and_a_graph_returning_nan_are_errors_not_nan_images(sampler):
    from toolkit.errors import UserError

    attributes, noise = np.zeros((1, 10), np.float32), np.zeros((1, 16), np.float32)
    # finite as float64, infinite as the float32 the graph takes (used to give all-NaN images)
    with pytest.raises(UserError, match="attributes holds NaN or infinite values \\(as float32"):
        sampler.run(np.full((1, 10), 1e300), noise)
    with pytest.raises(UserError, match="noise holds NaN or infinite values \\(as float32"):
        sampler.run(attributes, np.full((1, 16), 1e300))
    # finite float32 inputs the graph still turns into NaN
    with pytest.raises(UserError, match="the graph returned NaN or infinite pixels"):
        sampler.run(np.full((1, 10), 3e38, np.float32), noise)
    # every batch, not only the load-time probe: out of [0, 1] and NaN are one error each
    height, width = sampler.image_size
    with pytest.raises(UserError, match="the graph's images range from 0 to 1.5, but its metadata's value_range is"):
        sampler._check_output(
            np.concatenate(
                [np.zeros((1, 3, height, width), np.float32)] + [np.full((1, 3, height, width), 1.5, np.float32)]
            ),
            2,
        )
    with pytest.raises(UserError, match="the graph returned NaN or infinite pixels"):
        sampler._check_output(np.full((1, 3, height, width), np.nan, np.float32), 1)


# -- as a library meets it: paths of any kind, pickling, close() -----------------------------------


class _BytesPathLike:
    def __init__(self, path: bytes):
        self.path = path

    def __fspath__(self) -> bytes:
        return self.path


def test_paths_are_taken_as_python_file_apis_take_them(tiny_onnx):
    for given in (str(tiny_onnx), tiny_onnx, os.fsencode(tiny_onnx), _BytesPathLike(os.fsencode(tiny_onnx))):
        assert Sampler(given, device="cpu").path == tiny_onnx
    for wrong, name in ((None, "NoneType"), (3, "int"), (bytearray(b"x.onnx"), "bytearray")):
        with pytest.raises(TypeError, match=rf"^Sampler\(path\): expected the \.onnx file .*, got {name}$"):
            Sampler(wrong)
    with pytest.raises(TypeError, match=r"^Sampler\(encoder=\): .*, got int$"):
        Sampler(tiny_onnx, device="cpu", encoder=3)


def _inputs(sampler: Sampler, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    attributes = (rng.random((rows, len(sampler.attributes))) > 0.5).astype(np.float32)
    return attributes, rng.standard_normal((rows, sampler.latent_dim), dtype=np.float32)


def test_a_pickled_sampler_reopens_its_file_and_computes_the_same_images(tiny_onnx, tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(tiny_onnx.parent)
    original = Sampler(tiny_onnx.name, device="cpu", batch_size=3)  # a relative path ...
    data = pickle.dumps(original)
    monkeypatch.chdir(tmp_path)  # ... still found from another working folder (a worker's)
    copy = pickle.loads(data)
    assert copy.session is not original.session and copy.path == tiny_onnx
    assert (copy.batch_size, copy.provider, copy.attributes) == (
        original.batch_size,
        original.provider,
        original.attributes,
    )
    attributes, noise = _inputs(original, 7, seed=0)  # 7 rows: batches of 3, 3 and 1
    assert np.array_equal(copy.run(attributes, noise), original.run(attributes, noise))
    assert np.array_equal(copy.sample({"a": 1}, n=5, seed=2), original.sample({"a": 1}, n=5, seed=2))


def test_a_pickled_sampler_refuses_a_file_that_changed_meanwhile(tiny_onnx, tmp_path):
    import pickle

    served = tmp_path / "served.onnx"
    shutil.copy(tiny_onnx, served)
    data = pickle.dumps(Sampler(served, device="cpu"))
    os.replace(_with_metadata(tiny_onnx, tmp_path, step="12345"), served)  # exported again, same name
    with pytest.raises(UserError, match="changed since this Sampler was pickled"):
        pickle.loads(data)


def test_a_sampler_serves_a_spawned_process_pool(tiny_onnx):
    import multiprocessing

    sampler = Sampler(tiny_onnx, device="cpu")
    calls = [_inputs(sampler, rows, seed) for rows, seed in ((1, 0), (4, 1), (9, 2), (2, 3))]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(sampler.run, calls)  # the bound method pickles the sampler with it
    for (attributes, noise), got in zip(calls, results):
        assert np.array_equal(got, sampler.run(attributes, noise))


@pytest.mark.parametrize("io_binding", [False, True])
def test_close_releases_the_session_and_later_calls_are_refused(tiny_onnx, io_binding):
    import pickle
    import weakref

    sampler = Sampler(tiny_onnx, device="cpu", io_binding=io_binding)
    sampler.sample({"a": 1}, n=2)
    session, runner = weakref.ref(sampler.session), weakref.ref(sampler._run)
    sampler.close()
    assert sampler.closed and session() is None and runner() is None  # nothing else holds them
    sampler.close()  # idempotent
    attributes, noise = _inputs(sampler, 2, seed=0)
    for call in (
        lambda: sampler.sample({"a": 1}),
        lambda: sampler.run(attributes, noise),
        lambda: sampler.encode(np.zeros((8, 8, 3), np.uint8), {"a": 1}),
        lambda: pickle.dumps(sampler),
    ):
        with pytest.raises(UserError, match="this Sampler was closed"):
            call()


def test_a_with_block_closes_the_sampler_also_on_an_error(tiny_onnx):
    with Sampler(tiny_onnx, device="cpu") as sampler:
        assert sampler.sample({"b": 1}, n=2, seed=0).shape == (2, 8, 8, 3)
    assert sampler.closed
    with pytest.raises(KeyError):
        with Sampler(tiny_onnx, device="cpu") as failing:
            raise KeyError("the caller's own error passes through")
    assert failing.closed


def test_attribute_names_match_in_either_unicode_normalization(tiny_onnx):
    """'é' typed as 'e' + a combining accent (macOS) against an export whose name is one code point was
    'unknown attribute': names are matched as the text they show (NFC), in every call that takes them."""
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "é") for form in ("NFC", "NFD"))
    with Sampler(tiny_onnx, device="cpu") as sampler:
        assert nfc in sampler.attributes and nfd not in sampler.attributes
        assert np.array_equal(sampler.conditions({nfd: 1}), sampler.conditions({nfc: 1}))
        assert sampler.conditions({nfd: 1})[0, sampler.attributes.index(nfc)] == 1
        assert np.array_equal(sampler.sample({nfd: 1}, n=2, seed=0), sampler.sample({nfc: 1}, n=2, seed=0))
        assert sampler.conditions({nfc: 1, nfd: 1}).sum() == 1  # the same name twice, one value: fine
        with pytest.raises(UserError, match="given as 1 and as 0 .* another Unicode normalization"):
            sampler.conditions({nfc: 1, nfd: 0})


def test_a_run_folder_given_for_an_export_says_to_export_it(tmp_path):
    """`cvae-tk sample runs/digits` (the run, not its export): the refusal names the command that makes the file."""
    run = tmp_path / "digits"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(
        UserError, match=r"is a folder: .*it is a run: export it with `cvae-tk export --onnx .*digits`"
    ):
        Sampler(run)
    with pytest.raises(UserError, match=r"is a folder: expected an ONNX file written by `cvae-tk export`$"):
        Sampler(tmp_path)
