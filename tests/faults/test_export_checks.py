"""Exports and ONNX files are checked for what they claim; malformed run folders and absurd sizes are
one line each. Every file here is a real file in its real format: a real export edited with the
`onnx` library, a real config.json / model.safetensors edited or written by hand."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from toolkit.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args, cwd=None, user=None):
    """The real CLI in its own process (as `user`'s uid when given): (exit code, stdout, stderr)."""
    head = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    done = subprocess.run(
        [*head, sys.executable, "-m", "toolkit.cli", *map(str, args)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout, done.stderr


def assert_one_line(stderr: str, *fragments: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- ONNX files whose metadata and graph disagree ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """An untrained (seeded) 8x8 paper model with 5 attributes and 4 latent units as a run folder."""
    import torch

    from toolkit.model import CVAE, ModelSpec, save_model

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("tiny") / "run"
    save_model(CVAE(ModelSpec(attributes=["a", "b", "c", "d", "e"], image_size=(8, 8), latent_dim=4)), run)
    return run


@pytest.fixture(scope="module")
def uint8_onnx(tiny_run) -> Path:
    from toolkit.export import export_onnx

    path, _ = export_onnx(
        tiny_run, tiny_run.parent / "tiny-uint8-temperature.onnx", uint8=True, temperature_input=True
    )
    return path


def edited(source: Path, folder: Path, meta: dict | None = None, graph=None) -> Path:
    """A copy of the export `source` with metadata entries replaced (None: removed) and `graph(model)` applied."""
    import onnx

    model = onnx.load(str(source))
    entries = {p.key: p.value for p in model.metadata_props}
    for key, value in (meta or {}).items():
        if value is None:
            entries.pop(key, None)
        else:
            entries[key] = value
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    if graph is not None:
        graph(model)
    path = folder / "edited.onnx"
    onnx.save(model, str(path))
    return path


def declare_output(dtype=None, dims=None):
    """Change what the graph declares for its output (not what it computes)."""

    def change(model):
        tensor = model.graph.output[0].type.tensor_type
        if dtype is not None:
            tensor.elem_type = dtype
        for dim, value in zip(tensor.shape.dim[1:], dims or ()):
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = value

    return change


def float16_noise(model):
    """A consistent graph that takes float16 noise (cast to float32 inside)."""
    from onnx import TensorProto, helper

    for node in model.graph.node:
        node.input[:] = ["noise_f32" if name == "noise" else name for name in node.input]
    model.graph.node.insert(0, helper.make_node("Cast", ["noise"], ["noise_f32"], to=TensorProto.FLOAT))
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.FLOAT16


UINT8 = 2  # onnx.TensorProto.UINT8

# (metadata changes, graph change, what the one line says); every one of these was accepted, or
# failed only later with a traceback, before the contract check
METADATA_CASES = {
    "repeated attribute names": ({"attributes": '["a", "a", "c", "d", "e"]'}, None, "'a' appears more than once"),
    "an empty attribute name": ({"attributes": '["a", "", "c", "d", "e"]'}, None, "non-empty names"),
    "attribute names that are numbers": ({"attributes": "[1, 2, 3, 4, 5]"}, None, "non-empty names"),
    "attributes not JSON": ({"attributes": "[a, b"}, None, "metadata 'attributes' is not valid JSON"),
    "fewer names than the graph takes": ({"attributes": '["a", "b"]'}, None, "input 'attributes' has shape"),
    "attributes missing": ({"attributes": None}, None, "metadata has no 'attributes'"),
    "latent_dim not an integer": ({"latent_dim": "4.0"}, None, "latent_dim = '4.0'"),
    "image_size of booleans": ({"image_size": "[true, 8]"}, None, "image height = True"),
    "image_size text": ({"image_size": '"8x8"'}, None, "'image_size' must be [height, width]"),
    "unknown output layout": ({"output": "png"}, None, "metadata output = 'png'"),
    "unknown precision": ({"precision": "int4"}, None, "metadata precision = 'int4'"),
    "unknown prior": ({"prior": "gaussian"}, None, "metadata prior = 'gaussian', expected standard or learned"),
    "another value range": ({"value_range": "[-1, 1]"}, None, "value_range = [-1, 1]"),
    "inputs the graph does not have": (
        {"inputs": '["attributes", "noise", "temperature"]'},
        None,
        "but the graph's inputs are",
    ),
    "a format from the future": (
        {"cvae_tk.format": "sampler/2"},
        None,
        "newer than this cvae-tk reads (sampler/1): upgrade",
    ),
    "an unknown format": ({"cvae_tk.format": "gan/1"}, None, "unknown cvae_tk.format 'gan/1'"),
    "no format": ({"cvae_tk.format": None}, None, "not a cvae-tk sampler export"),
    "uint8 metadata, float32 graph": (
        {"output": "uint8_nhwc"},
        None,
        "output 'images' is float32, but the metadata says output=uint8_nhwc",
    ),
    "float16 noise input": ({}, float16_noise, "input 'noise' is float16, expected float32"),
}
# declared shapes that lie about what the graph computes: ONNX Runtime only warns and returns the
# real shape, so the Sampler runs the graph once at load; inspect runs ONNX shape inference
LYING_CASES = {
    "declares and claims 16x16, computes 8x8": ({"image_size": "[16, 16]"}, declare_output(dims=(3, 16, 16)), "8"),
    "declares uint8, computes float32": ({"output": "uint8_nhwc"}, declare_output(UINT8, (8, 8, 3)), "float"),
}


@pytest.mark.parametrize("case", METADATA_CASES, ids=str)
def test_a_file_whose_metadata_disagrees_with_its_graph_is_refused_by_the_sampler_and_inspect(
    tiny_onnx, tmp_path, case
):
    from toolkit.inspection import inspect_onnx
    from toolkit.sampler import Sampler

    meta, graph, fragment = METADATA_CASES[case]
    path = edited(tiny_onnx, tmp_path, meta, graph)
    for read in (lambda: Sampler(path, device="cpu"), lambda: inspect_onnx(path)):
        with pytest.raises(UserError) as caught:
            read()
        message = str(caught.value)
        assert str(path) in message and fragment in message and "\n" not in message, message


@pytest.mark.parametrize("case", LYING_CASES, ids=str)
def test_a_graph_whose_declared_output_lies_is_refused_before_any_run(tiny_onnx, tmp_path, case):
    from toolkit.inspection import inspect_onnx
    from toolkit.sampler import Sampler

    meta, graph, computed = LYING_CASES[case]
    path = edited(tiny_onnx, tmp_path, meta, graph)
    with pytest.raises(UserError) as caught:
        Sampler(path, device="cpu")
    assert str(path) in str(caught.value) and computed in str(caught.value)
    with pytest.raises(UserError, match="the graph computes other types or shapes than it declares"):
        inspect_onnx(path)


def test_the_good_files_pass_every_check(tiny_onnx, uint8_onnx):
    from toolkit.inspection import inspect_onnx
    from toolkit.sampler import Sampler

    for path, shape in ((tiny_onnx, (2, 8, 8, 3)), (uint8_onnx, (2, 8, 8, 3))):
        assert inspect_onnx(path)[-1].startswith("output images:")
        assert Sampler(path, device="cpu").sample({"a": 1}, n=2, seed=0, temperature=0.5).shape == shape


def test_a_uint8_export_relabelled_as_float_is_refused(uint8_onnx, tmp_path):
    from toolkit.sampler import Sampler

    path = edited(uint8_onnx, tmp_path, {"output": "float32_nchw"})
    with pytest.raises(UserError, match="output 'images' is uint8, but the metadata says output=float32_nchw"):
        Sampler(path, device="cpu")


def test_the_cli_says_it_in_one_line(tiny_onnx, tmp_path):
    path = edited(tiny_onnx, tmp_path, {"attributes": '["a", "a", "c", "d", "e"]'})
    for command in (["sample", path, "-n", "1", "--grid", tmp_path / "g.png", "--device", "cpu"], ["inspect", path]):
        code, _, stderr = cli(*command)
        assert code == 2
        assert_one_line(stderr, str(path), "'a' appears more than once")
    assert not (tmp_path / "g.png").exists()


def test_the_exporter_refuses_to_write_a_file_whose_metadata_disagrees_with_its_graph(tiny_run, tmp_path, monkeypatch):
    import toolkit.export

    real = toolkit.export.metadata
    # a bug in the exporter
    monkeypatch.setattr(toolkit.export, "metadata", lambda *a, **k: {**real(*a, **k), "latent_dim": "5"})
    out = tmp_path / "x.onnx"
    with pytest.raises(
        UserError, match=r"the exported graph: input 'noise' has shape \['batch', 4\], expected \[batch, 5\]"
    ):
        toolkit.export.export_onnx(tiny_run, out)
    assert list(tmp_path.iterdir()) == []


# --- malformed run folders (export, eval, edit all read them through load_model) --------------------


def config_with(tiny_run, tmp_path, change) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    text = change(config)  # the file's new text or bytes, or None: the changed config
    if isinstance(text, (str, bytes)):
        (run / "config.json").write_bytes(text.encode() if isinstance(text, str) else text)
    else:
        (run / "config.json").write_text(json.dumps(config))
    return run


CONFIG_CASES = {
    "not JSON": (lambda c: '{"attributes": [', "not valid JSON"),
    "binary bytes": (lambda c: b"\xd3\x00\xff garbage", "not valid JSON"),
    "a list": (lambda c: "[1, 2]", "expected a JSON object"),
    "no latent_dim": (lambda c: c.pop("latent_dim"), "it has no latent_dim"),
    "attributes a string": (
        lambda c: c.update(attributes="abcde"),
        "'attributes' must be a non-empty list of names, got 'abcde'",
    ),
    "repeated attributes": (lambda c: c.update(attributes=["a", "a", "c", "d", "e"]), "'a' appear(s) more than once"),
    "latent_dim a float": (lambda c: c.update(latent_dim=4.5), "'latent_dim' must be a positive integer, got 4.5"),
    "latent_dim text": (lambda c: c.update(latent_dim="4"), "'latent_dim' must be a positive integer, got '4'"),
    "image_size of three": (lambda c: c.update(image_size=[8, 8, 3]), "'image_size' must be [height, width]"),
    "options a list": (lambda c: c.update(options=[1]), "'options' must be a JSON object"),
    "image_size absurd": (lambda c: c.update(image_size=[100000, 100000]), "does not match"),
    "latent_dim absurd": (lambda c: c.update(latent_dim=10**9), "does not match"),
    "unknown arch": (lambda c: c.update(arch="unet"), "unknown model.arch 'unet'"),
    # a key a newer cvae-tk rebuilds its model with: ignored, the model was exported without it
    "a key from a newer cvae-tk": (
        lambda c: c.update(norm="batch", extra={"toolkit_version": "9.0"}),
        "has keys this cvae-tk (0.1.0) does not know: 'norm'; it was written by cvae-tk 9.0",
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=str)
def test_a_malformed_config_json_is_one_line_naming_it(tiny_run, tmp_path, case):
    from toolkit.export import export_onnx

    change, fragment = CONFIG_CASES[case]
    run = config_with(tiny_run, tmp_path, change)
    with pytest.raises(UserError) as caught:
        export_onnx(run, tmp_path / "out" / "x.onnx")
    assert str(run) in str(caught.value) and fragment in str(caught.value), str(caught.value)
    assert not (tmp_path / "out").exists()


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A real safetensors file of float32 tensors of these shapes, sparse (its bytes are never written)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as stream:
        stream.write(struct.pack("<Q", len(text)) + text)
        stream.truncate(8 + len(text) + offset)


def test_a_model_bigger_than_the_memory_is_refused_before_it_is_allocated(tiny_run, tmp_path):
    """config.json and model.safetensors agree on a model of twice the memory available: refused
    from the header alone (without the check, torch would allocate it and the OOM killer end us)."""
    from toolkit.memory import available_bytes
    from toolkit.model import ModelSpec, expected_shapes, load_model

    def count(latent):
        return sum(math.prod(shape) for shape in expected_shapes(ModelSpec(list("abcde"), (8, 8), latent)).values())

    available = available_bytes()
    assert available is not None
    latent = available // (4 * (count(2) - count(1))) + 1  # weights of float32: as many bytes as there is memory
    run = config_with(tiny_run, tmp_path, lambda c: c.update(latent_dim=latent))
    shapes = expected_shapes(ModelSpec(list("abcde"), (8, 8), latent))
    write_safetensors(run / "model.safetensors", shapes)
    assert (run / "model.safetensors").stat().st_size > available  # a sparse file: nothing on disk
    with pytest.raises(
        UserError,
        match=r"config.json \(.* parameters: .*latent_dim %d.*\) needs .* GiB of memory, but only .* is available"
        % latent,
    ):
        load_model(run)


def tensors_with(tiny_run, tmp_path, change) -> Path:
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = load_file(str(run / "model.safetensors"))
    change(state)
    save_file(state, str(run / "model.safetensors"))
    return run


def _nan(state):
    state["decoder.fc.weight"][0, 0] = float("nan")


def _int(state):
    state["decoder.fc.bias"] = state["decoder.fc.bias"].to(__import__("torch").int32)


def _extra(state):
    state["extra.weight"] = state["decoder.fc.bias"].clone()


def _missing(state):
    del state["decoder.fc.bias"]


def _shape(state):
    state["decoder.fc.bias"] = state["decoder.fc.bias"][:-1].clone()


WEIGHT_CASES = {
    "a NaN weight": (_nan, "tensor decoder.fc.weight holds NaN or infinite values"),
    "integer tensors": (_int, "tensor decoder.fc.bias is torch.int32, expected floating-point weights"),
    "an extra tensor": (_extra, "first extra.weight (config expects nothing"),
    "a missing tensor": (_missing, "first decoder.fc.bias (config expects"),
    "a tensor of another shape": (_shape, "first decoder.fc.bias (config expects"),
}


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=str)
def test_weights_that_do_not_fit_the_config_are_one_line_and_export_writes_nothing(tiny_run, tmp_path, case):
    from toolkit.export import export_onnx

    change, fragment = WEIGHT_CASES[case]
    run = tensors_with(tiny_run, tmp_path, change)
    with pytest.raises(UserError) as caught:
        export_onnx(run, tmp_path / "out" / "x.onnx")
    assert "model.safetensors" in str(caught.value) and fragment in str(caught.value), str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_nan_model_never_passes_the_parity_check():
    """max() skips NaN: a model that generates NaN images passed the parity check before."""
    import torch

    from toolkit.export import parity_error, to_onnx
    from toolkit.model import CVAE, ModelSpec

    model = CVAE(ModelSpec(["a", "b"], (8, 8), 4)).eval()
    onnx_bytes = to_onnx(model)
    with torch.no_grad():
        model.decoder.fc.bias.fill_(float("nan"))
    with pytest.raises(UserError, match="NaN"):
        parity_error(model, onnx_bytes)


def test_a_run_without_its_final_model_says_how_to_get_it_and_that_works(trained_run, tmp_path):
    from toolkit.config import load_config
    from toolkit.export import export_onnx
    from toolkit.train import train

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "model.safetensors").unlink()
    (run / "config.json").unlink()
    with pytest.raises(UserError) as caught:
        export_onnx(run, tmp_path / "x.onnx")
    message = str(caught.value)
    assert "has no final model" in message and f"{run}/checkpoints/checkpoint-" in message, message
    command = message[message.index("`cvae-tk train ") + len("`cvae-tk train ") : message.rindex("`")]
    train(load_config(command.split()))  # the command the message gives
    path, _ = export_onnx(run, tmp_path / "x.onnx")
    assert path.stat().st_size > 0


@pytest.mark.parametrize("replaced", ["config.json", "model.safetensors"])
def test_a_run_whose_files_are_replaced_while_it_is_exported_is_not_written(tiny_run, tmp_path, monkeypatch, replaced):
    """A training that finishes during the export replaces both files; the export read the old ones
    (or half of each): its metadata (step, recipe) or weights would not be the run's."""
    import toolkit.export
    from toolkit.export import export_onnx

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    real = toolkit.export.to_onnx

    def while_tracing(*args, **kwargs):
        if replaced == "config.json":
            config = json.loads((run / "config.json").read_text())
            (run / "config.json").write_text(json.dumps({**config, "extra": {"step": 99}}))
        else:
            with open(run / "model.safetensors", "r+b") as stream:  # one weight's last byte
                stream.seek(-1, os.SEEK_END)
                last = stream.read(1)
                stream.seek(-1, os.SEEK_END)
                stream.write(bytes([last[0] ^ 1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(toolkit.export, "to_onnx", while_tracing)
    with pytest.raises(UserError, match=f"{run / replaced} changed while it was being exported"):
        export_onnx(run, tmp_path / "out" / "x.onnx")
    assert not (tmp_path / "out" / "x.onnx").exists()


@pytest.mark.parametrize(
    "given, words",
    [
        ("missing", "is not a trained run: it does not exist"),
        ("run/model.safetensors", "is not a trained run: it is a file"),
        ("run/checkpoints/checkpoint-2", "is not a trained run but one of its checkpoints: give the run, "),
    ],
)
def test_a_path_that_is_no_run_folder_is_said_to_be_what_it_is(tiny_run, tmp_path, given, words):
    # each said `X is not a trained run: expected X/config.json`, of a file or a checkpoint too
    from toolkit.export import export_onnx

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2}')
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / given} {words}")):
        export_onnx(tmp_path / given, tmp_path / "x.onnx")


# --- the Sampler's arguments -----------------------------------------------------------------------


def test_n_beyond_the_memory_available_is_refused_before_anything_is_allocated(tiny_onnx):
    from toolkit.memory import available_bytes
    from toolkit.sampler import Sampler

    sampler = Sampler(tiny_onnx, device="cpu")
    n = 2 * available_bytes() // (8 * 8 * 3)  # uint8 images of 8x8: twice the memory there is
    with pytest.raises(
        UserError, match=r"image\(s\) of 8x8 (needs .* of memory, but only .* is available|would need .* GiB \(limit)"
    ):
        sampler.sample({"a": 1}, n=n, seed=0)
    assert sampler.sample({"a": 1}, n=3, seed=0).shape == (3, 8, 8, 3)  # still serves


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5, 1e4, "1", True, None])
def test_a_temperature_that_is_not_a_finite_non_negative_number_is_refused(tiny_onnx, uint8_onnx, temperature):
    from toolkit.sampler import Sampler

    for path in (tiny_onnx, uint8_onnx):  # noise scaled here, or by the graph's temperature input
        sampler = Sampler(path, device="cpu")
        with pytest.raises(UserError, match="temperature must be a number from 0 to 1000"):
            sampler.sample({"a": 1}, n=1, seed=0, temperature=temperature)
        with pytest.raises(UserError, match="temperature"):
            sampler.run(np.zeros((1, 5), np.float32), np.zeros((1, 4), np.float32), temperature)


def test_run_checks_its_arrays(tiny_onnx):
    from toolkit.sampler import Sampler

    sampler = Sampler(tiny_onnx, device="cpu")
    good_a, good_z = np.zeros((2, 5), np.float32), np.zeros((2, 4), np.float32)
    bad = [
        ((np.zeros((2, 4), np.float32), good_z), r"attributes must be a numeric array \[B, 5\], got float32 \[2, 4\]"),
        ((good_a, np.zeros((2,), np.float32)), r"noise must be a numeric array \[B, 4\]"),
        ((good_a.tolist(), good_z), "got list"),
        ((good_a, np.zeros((3, 4), np.float32)), "same number of rows"),
        ((good_a, np.full((2, 4), np.nan, np.float32)), "noise holds NaN"),
        ((np.array([["1"] * 5]), good_z[:1]), "numeric array"),
    ]
    for (attributes, noise), message in bad:
        with pytest.raises(UserError, match=message):
            sampler.run(attributes, noise)
    assert sampler.run(good_a, good_z).shape == (2, 3, 8, 8)


# --- cvae-tk export --out / --opset -----------------------------------------------------------------


@pytest.mark.parametrize(
    "out, opset, fragment",
    [
        ("folder", 18, "it is a folder, expected a file name"),
        ("model.png", 18, "expected a file name ending in .onnx, got '.png'"),
        ("model", 18, "got 'no extension'"),
        ("model.onnx.tmp", 18, "got '.tmp'"),
        ("MODEL.ONNX", 18, "got '.ONNX'"),  # written, then refused by `cvae-tk web` (NAME.onnx only)
        (".onnx", 18, "expected a name before .onnx"),
        ("a_file/x.onnx", 18, "a_file is a file, not a folder"),
        ("a_file/deeper/x.onnx", 18, "a_file is a file, not a folder"),
        ("x.onnx", 7, "ONNX opset 7 is not supported: use 18 to"),
        ("x.onnx", 99, "ONNX opset 99 is not supported"),
    ],
)
def test_a_bad_out_or_opset_is_refused_before_the_model_is_loaded(
    tiny_run, tmp_path, monkeypatch, out, opset, fragment
):
    import toolkit.export

    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setattr(
        toolkit.export, "load_model", lambda *a: pytest.fail("the model was loaded before the output was checked")
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        toolkit.export.export_onnx(tiny_run, tmp_path / out, opset=opset)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and list((tmp_path / "folder").iterdir()) == []


def test_export_into_a_read_only_folder_is_one_line_and_leaves_nothing(tiny_run):
    """A real read-only folder: chmod 555, and the CLI run as an unprivileged user (root writes anywhere)."""
    user = 65534 if os.geteuid() == 0 else None  # nobody
    if user is not None and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no way to be refused a write")
    scratch = Path(tempfile.mkdtemp(prefix="cvae-ro-"))  # not under pytest's root-only tmp folder
    try:
        scratch.chmod(0o755)
        run = scratch / "run"
        shutil.copytree(tiny_run, run)
        read_only = scratch / "read-only"
        read_only.mkdir(mode=0o555)
        read_only.chmod(0o555)
        for out in (read_only / "x.onnx", read_only / "sub" / "x.onnx"):
            code, _, stderr = cli("export", run, "--out", out, cwd=scratch, user=user)
            assert code == 2
            assert_one_line(
                stderr, f"cannot write {out}: the folder {read_only} is not writable: Permission denied (EACCES)"
            )
        assert list(read_only.iterdir()) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_disk_that_fills_while_the_file_is_written_is_one_line_and_leaves_nothing(tiny_run, tmp_path):
    """A real ENOSPC: the temp file the export writes is a link to /dev/full."""
    from toolkit.export import export_onnx

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    out = tmp_path / "x.onnx"
    (tmp_path / f".x.onnx.{os.getpid()}.tmp").symlink_to("/dev/full")  # toolkit.atomic's temp name
    with pytest.raises(
        UserError, match=rf"could not write {out}: No space left on device \(ENOSPC\); nothing was written"
    ):
        export_onnx(tiny_run, out)
    assert list(tmp_path.iterdir()) == []
