"""The `cvae-tk` command line as a user runs it: one-line errors with exit code 2, nothing written on a mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DIGITS = [f"digit_{i}" for i in range(10)]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr should be one line, got:\n{result.stderr}"
    (line,) = lines
    assert line.startswith("error:") and line[len("error:") :].strip(), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def identity_onnx(path: Path) -> Path:
    """A valid ONNX model that is not a cvae-tk export."""
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
    onnx.save(model, str(path))
    return path


def test_train_unknown_recipe(tmp_path):
    result = run_cli(["train", "recipe=nope"], tmp_path)
    assert_user_error(result, "nope", "digits")
    assert snapshot(tmp_path) == []


def test_train_unknown_config_key(tmp_path):
    result = run_cli(["train", "recipe=digits", "data.shardz=x"], tmp_path)
    assert_user_error(result, "data.shardz")
    assert snapshot(tmp_path) == []


def test_export_of_a_folder_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(["export", "--onnx", "empty"], tmp_path)
    assert_user_error(result, "empty", "config.json")
    assert snapshot(tmp_path) == ["empty"]


def test_sample_from_an_onnx_file_that_is_not_a_cvae_export(tmp_path):
    identity_onnx(tmp_path / "identity.onnx")
    before = snapshot(tmp_path)
    result = run_cli(["sample", "identity.onnx", "--grid", "g.png"], tmp_path)
    assert_user_error(result, "identity.onnx", "cvae-tk")
    assert snapshot(tmp_path) == before


def test_sample_with_an_unknown_attribute(tmp_path, exported):
    exported_before = snapshot(exported.parent)
    result = run_cli(["sample", exported, "--attr", "digit_33=1", "--grid", "g.png"], tmp_path)
    line = assert_user_error(result, "digit_33", "digit_3,")
    assert all(name in line for name in DIGITS)
    assert snapshot(tmp_path) == []
    assert snapshot(exported.parent) == exported_before


def test_sample_a_grid_with_each_attribute(tmp_path, exported):
    from PIL import Image

    from toolkit.sampler import Sampler, image_grid

    result = run_cli(["sample", exported, "--each-attribute", "-n", "3", "--seed", "0", "--grid", "g.png"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "g.png" in result.stdout
    assert snapshot(tmp_path) == ["g.png"]

    with Image.open(tmp_path / "g.png") as picture:
        assert picture.format == "PNG"
        assert picture.size == (3 * (32 + 2) + 2, 10 * (32 + 2) + 2)  # (width, height)
        pixels = np.asarray(picture.convert("RGB"))

    # row r holds digit_r alone, three seeds' worth of noise: the same as the Python API gives
    images = Sampler(exported, device="cpu").sample(np.eye(10, dtype=np.float32), n=3, seed=0)
    expected = image_grid(images, columns=3)
    assert pixels.shape == expected.shape
    assert np.abs(pixels.astype(np.int16) - expected.astype(np.int16)).max() <= 1


# --- cvae-tk inspect, and the export flags through the command line --------------------------------


def _inspect_lines(path: Path, cwd: Path) -> dict[str, str]:
    result = run_cli(["inspect", path], cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert all(": " in line for line in lines), lines
    fields = dict(line.split(": ", 1) for line in lines)
    assert len(fields) == len(lines), "each key once"
    return fields


def test_inspect_an_export(tmp_path, exported, trained_run):
    import hashlib

    fields = _inspect_lines(exported, tmp_path)
    assert fields["cvae_tk.format"] == "sampler/1"
    assert fields["attributes"].startswith("10 (digit_0, digit_1,")
    assert fields["weights_sha256"] == hashlib.sha256((trained_run / "model.safetensors").read_bytes()).hexdigest()
    assert fields["run_id"] == json.loads((trained_run / "config.json").read_text())["extra"]["run_id"]
    assert fields["inputs"] == '["attributes", "noise"]'
    assert fields["input attributes"] == "float32 [batch, 10]"
    assert fields["input noise"] == "float32 [batch, 16]"
    assert fields["output images"] == "float32 [batch, 3, 32, 32]"
    assert (fields["precision"], fields["output"], fields["opset"], fields["graph opset"]) == (
        "fp32",
        "float32_nchw",
        "18",
        "18",
    )
    assert fields["file size"].startswith(f"{exported.stat().st_size} bytes")
    assert snapshot(tmp_path) == []


def test_export_variant_flags_then_inspect(tmp_path, trained_run):
    """--fp16 --uint8 --temperature-input through the CLI; the default name keeps the plain export's free."""
    result = run_cli(["export", "--onnx", trained_run, "--fp16", "--uint8", "--temperature-input"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    name = f"{trained_run.name}-fp16-uint8-temperature.onnx"
    assert snapshot(tmp_path) == ["export", f"export/{name}"]
    assert "grey-level" in result.stdout and "temperatures 1 and 0.7" in result.stdout

    fields = _inspect_lines(tmp_path / "export" / name, tmp_path)
    assert (fields["precision"], fields["output"]) == ("fp16", "uint8_nhwc")
    assert fields["inputs"] == '["attributes", "noise", "temperature"]'
    assert fields["input temperature"] == "float32 [1]"
    assert fields["output images"] == "uint8 [batch, 32, 32, 3]"


@pytest.mark.parametrize(
    "content", [b"", b"definitely not a protobuf \xff\xfe\x00 at all" * 5], ids=["empty", "garbage"]
)
def test_inspect_a_file_that_is_not_onnx(tmp_path, content):
    (tmp_path / "model.onnx").write_bytes(content)
    assert_user_error(run_cli(["inspect", "model.onnx"], tmp_path), "model.onnx", "not an ONNX model")


def test_inspect_an_onnx_file_that_is_not_a_cvae_export(tmp_path):
    identity_onnx(tmp_path / "identity.onnx")
    assert_user_error(run_cli(["inspect", "identity.onnx"], tmp_path), "identity.onnx", "cvae-tk")


def test_inspect_prints_a_files_own_text_as_one_plain_line_each(tmp_path, tiny_onnx):
    """Metadata is the file's text, not ours: a newline in a value forged a line of the listing (here
    a second `precision:`), a terminal escape went to the terminal, a 1 MB value was printed whole.
    Each is shown escaped on its one line, long values cut; a file named .json is read as ONNX (onnx
    took the name for its JSON text format)."""
    import onnx

    proto = onnx.load(str(tiny_onnx))
    proto.metadata_props.add(key="note\x1b[2J", value="a\nprecision: int8\r\x1b[31mred")
    proto.metadata_props.add(key="description", value="A" * 1_000_000)
    onnx.save(proto, str(tmp_path / "hostile.json"), format="protobuf")
    result = run_cli(["inspect", "hostile.json"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert r"note\x1b[2J: a\nprecision: int8\r\x1b[31mred" in lines
    assert [line for line in lines if line.startswith("precision:")] == ["precision: fp32"]
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert f"description: {'A' * 300}... (1,000,000 characters)" in lines
    assert len(result.stdout) < 10_000
    from toolkit.inspection import inspect_onnx

    odd = tmp_path / os.fsdecode(b"caf\xe9.onnx")  # a file name that is not UTF-8: its byte as ls shows it
    odd.write_bytes((tmp_path / "hostile.json").read_bytes())
    assert inspect_onnx(odd)[0] == f"file: {tmp_path}/caf\\xe9.onnx"


def test_inspect_refuses_a_file_beyond_protobufs_limit_before_reading_it(tmp_path):
    """A 3 GB file was read whole into memory (30 s, 3 GB) to be refused: no ONNX file exceeds 2 GiB."""
    with open(tmp_path / "big.onnx", "wb") as file:
        file.truncate(3 * 2**30)  # sparse: no disk used
    line = assert_user_error(run_cli(["inspect", "big.onnx"], tmp_path), "big.onnx is not an ONNX model", "2 GiB")
    assert "3221225472 bytes (3.0 GiB)" in line


def test_inspect_a_missing_file(tmp_path):
    assert_user_error(run_cli(["inspect", "nope.onnx"], tmp_path), "nope.onnx")


def test_the_cli_opts_out_of_onnx_runtime_telemetry_unless_told_otherwise():
    """ONNX Runtime 1.29+ phones home from Linux by default (and warns on stderr where it cannot store
    its device ID): the offline CLI sets ORT_DISABLE_TELEMETRY=1 before onnxruntime loads; a value
    the user set wins."""
    import os
    import subprocess
    import sys

    probe = "import os, sys, toolkit.cli; import onnxruntime; print(os.environ['ORT_DISABLE_TELEMETRY'])"
    env = {key: value for key, value in os.environ.items() if key != "ORT_DISABLE_TELEMETRY"}
    for given, expected in ((None, "1"), ("0", "0")):
        run_env = env if given is None else {**env, "ORT_DISABLE_TELEMETRY": given}
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=run_env, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == expected, done.stderr


def test_ctrl_c_while_the_training_config_loads_is_one_line(tmp_path):
    """cvae-tk train read its config outside the Ctrl-C handling: a Ctrl-C then (a slow recipe file on
    a network disk, torch's import after it) ended in 'aborted', exit 1, not saying what was kept."""
    import signal

    child = (
        "import sys, time\n"
        "import toolkit.config\n"
        "def slow(args, default_recipe=None):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "toolkit.config.load_config = slow\n"
        "from toolkit.cli import main\n"
        "sys.argv = ['cvae-tk', 'train', 'recipe=digits']\n"
        "main()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        [sys.executable, "-c", child], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip() == "error: interrupted (Ctrl-C) before the run began: nothing was written"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [["sample"], ["edit"], ["interpolate"], ["sweep"], ["shards", "verify"]],
)
def test_repeatable_options_show_what_to_type_in_help(command, tmp_path):
    """typer renders a List[str] option as `--attr <list[str]>`, which reads as a Python list: each
    names its value (NAME=0|1, A,B,..., SPLIT) instead."""
    result = run_cli([*command, "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "list[" not in result.stdout, result.stdout


def test_version_is_the_packages_and_help_lists_every_command(tmp_path):
    import toolkit

    done = run_cli(["--version"], cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"cvae-tk {toolkit.__version__}\n", "")
    shown = run_cli(["--help"], cwd=tmp_path)
    assert shown.returncode == 0 and "--version" in shown.stdout
    for command in ("train", "export", "sample", "eval", "sweep", "web", "shards", "classifier"):
        assert f"  {command} " in shown.stdout, command


def test_a_ctrl_c_says_its_own_commands_note_not_an_earlier_commands(tmp_path, monkeypatch, capsys):
    """Commands run one after another in one process (a script, the tests): a Ctrl-C of `shards verify`
    after a shard build said the build's 'the build is not finished'."""
    import toolkit.data.verify as verify
    from toolkit import cli
    from toolkit.entry import on_interrupt

    on_interrupt("the build is not finished")  # what an earlier shard build in this process left set

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "verify_shards", interrupted)
    monkeypatch.setattr(sys, "argv", ["cvae-tk", "shards", "verify", str(tmp_path)])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 130
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        said
        == "error: interrupted (Ctrl-C): stopped; no file was left half-written (each is written whole or not at all)"
    )


def test_ctrl_c_while_the_options_are_read_is_the_same_one_line(tmp_path, monkeypatch, capsys):
    """A Ctrl-C in an option's check (before the command runs, outside `_Commands.invoke`) was typer's
    silent exit 130."""
    import toolkit.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "check_output", interrupted)
    monkeypatch.setattr(sys, "argv", ["cvae-tk", "sample", str(tmp_path / "x.onnx"), "--out-dir", str(tmp_path / "d")])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 130
    assert (
        capsys.readouterr().err
        == "error: interrupted (Ctrl-C): stopped; no file was left half-written (each is written whole or not at all)\n"
    )
