"""The process's surroundings go wrong: the reader of its stdout goes away (`cvae-tk train ... | head -1`),
its current folder is deleted, Accelerate's environment variables are malformed. Training goes on
without its reader; the others are one line `error: ...`, exit 2, no traceback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.utils import PrecisionType
from accelerate.utils.environment import str_to_bool

from tests.faults.test_user_mistakes import assert_one_line
from tests.test_edit import cli  # `cvae-tk ARGS` in this process: (exit code, stdout, stderr)
from toolkit.devices import ACCELERATE_ENV, check_accelerate_env
from toolkit.entry import CWD_GONE
from toolkit.errors import UserError
from toolkit.train import CHECKPOINTS

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
CLI = [sys.executable, "-m", "toolkit.cli"]
SCRIPT = [sys.executable, str(ROOT / "toolkit" / "train.py")]  # as `accelerate launch toolkit/train.py` runs it


def training(shards, run_dir):
    """Six steps, a test-set line on stdout at step 3 (after the reader left) and at the end."""
    return [
        "recipe=digits",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        "max_steps=6",
        "eval_every=3",
        "checkpoint_every=3",
        "batch_size=16",
        "data.num_workers=0",
        "sample_every=1000",
    ]


# --- the reader of stdout goes away --------------------------------------------------------------


@pytest.mark.parametrize("how", ["cvae-tk train", "train.py, stderr in the same pipe"])
def test_training_goes_on_when_the_reader_of_its_output_goes_away(how, digits_shards, tmp_path):
    # The last line printed used to end the run: click turned the BrokenPipeError into a silent exit 1
    # (cvae-tk), or a traceback (train.py); with stderr in the pipe too, the progress bar's next write.
    merged = how.startswith("train.py")
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    head = SCRIPT if merged else [*CLI, "train"]
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [*head, *training(digits_shards, run_dir)],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merged else err,
        )
        first = process.stdout.readline()
        process.stdout.close()  # the reader goes away, as `| head -1` does after its line
        assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert first
    for name in ("model.safetensors", "config.json", f"{CHECKPOINTS}/checkpoint-6"):
        assert (run_dir / name).exists(), name
    if not merged:  # stderr was read to the end: the notice, once, and no noise at exit
        text = log.read_text()
        assert "Traceback" not in text and "BrokenPipeError" not in text and "Exception ignored" not in text
        assert text.count("stdout was closed") == 1
        assert (
            f"cvae-tk: stdout was closed (broken pipe); training goes on: TensorBoard logs in {run_dir / 'logs'}, "
            f"the results in {run_dir}\n"
        ) in text


def test_a_sweep_goes_on_when_the_reader_of_its_output_goes_away(digits_shards, tmp_path):
    # It went on, but without a word: `cvae-tk sweep ... | head -1` looked like a sweep that ended,
    # hours before its table was written (its training children write into its pipe, not the closed one).
    out, log = tmp_path / "sweep", tmp_path / "stderr.txt"
    tiny = ["max_steps=4", "batch_size=16", "sample_every=1000", "checkpoint_every=100000", "data.num_workers=0"]
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [*CLI, "sweep", "recipe=digits", "betas=[0.5]", f"data.shards={digits_shards}", *tiny]
            + ["--out", str(out), "--device", "cpu"],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=err,
        )
        first = process.stdout.readline()
        process.stdout.close()  # the reader goes away, as `| head -1` does after its line
        assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert first.startswith(b"sweep: digits")
    assert (out / "beta-0.5" / "model.safetensors").is_file()
    assert {"table1.md", "sweep.json", "figure3.png"} <= {path.name for path in out.iterdir()}
    text = log.read_text()
    assert "Traceback" not in text and "BrokenPipeError" not in text and "Exception ignored" not in text
    assert text.count("stdout was closed") == 1
    assert (
        "cvae-tk: stdout was closed (broken pipe); the sweep goes on: its runs, then table1.md, the figures "
        f"and sweep.json in {out}\n"
    ) in text


@pytest.mark.parametrize("command", ["recipes", "inspect", "sample"])
def test_a_short_command_whose_reader_is_gone_does_its_work_and_ends_quietly(command, tiny_onnx, tmp_path):
    # (exit 1 and no word: click's handling of EPIPE; `sample` wrote its grid, then failed to say so)
    args = {
        "recipes": ["recipes"],
        "inspect": ["inspect", tiny_onnx],
        "sample": ["sample", tiny_onnx, "--attr", "a=1", "--grid", "g.png"],
    }[command]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write to stdout fails
    try:
        result = subprocess.run(
            [*CLI, *map(str, args)],
            cwd=tmp_path,
            env=ENV,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (0, "")
    if command == "sample":
        assert (tmp_path / "g.png").is_file()


# --- the current folder is deleted -----------------------------------------------------------------


@pytest.mark.parametrize("command", ["cvae-tk train", "train.py", "cvae-tk sample"])
def test_a_deleted_current_folder_is_one_line(command, digits_shards, tiny_onnx, tmp_path):
    # (train: oneMKL's "FATAL ERROR: Cannot load libtorch_cpu.so" from torch's import; sample: a
    # misleading "the folder . is not writable")
    args = {
        "cvae-tk train": [*CLI, "train", *training(digits_shards, tmp_path / "run")],
        "train.py": [*SCRIPT, *training(digits_shards, tmp_path / "run")],
        "cvae-tk sample": [*CLI, "sample", str(tiny_onnx), "--attr", "a=1", "--grid", "g.png"],
    }[command]
    gone = tmp_path / "gone"
    gone.mkdir()
    result = subprocess.run(
        args,
        cwd=gone,
        preexec_fn=lambda: os.rmdir(gone),  # in the child, after it changed into the folder
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {CWD_GONE}\n")
    assert not (tmp_path / "run").exists()


# --- Accelerate's environment variables ------------------------------------------------------------

BAD_ENV = {
    # (variable, value): what the line says is expected
    ("ACCELERATE_USE_CPU", "abc"): "expected a truth value",  # was "mixed_precision=auto: invalid truth value abc"
    ("ACCELERATE_DEBUG_MODE", ""): "expected a truth value",
    ("LOCAL_RANK", "abc"): "expected an integer >= -1",  # was "mixed_precision=auto: invalid literal for int()"
    ("LOCAL_RANK", "-5"): "expected an integer >= -1",  # asked for a distributed launch, then failed on RANK
    ("WORLD_SIZE", "0"): "expected an integer >= 1",
    ("RANK", "one"): "expected an integer >= 0",
    ("ACCELERATE_MIXED_PRECISION", "xyz"): "expected no, fp16, bf16 or fp8",  # trained fp32, "precision xyz"
    ("ACCELERATE_MIXED_PRECISION", "FP16"): "expected no, fp16, bf16 or fp8",  # the same, "precision FP16"
    ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "0"): "expected an integer >= 1",  # ZeroDivisionError at step 1
    ("ACCELERATE_TORCH_DEVICE", "xyz"): "expected a torch device",  # a RuntimeError traceback
    ("ACCELERATE_DYNAMO_BACKEND", "xyz"): "expected one of no, eager",  # "mixed_precision=auto: 'XYZ' is not ..."
}


@pytest.mark.parametrize("variable", list(BAD_ENV), ids="=".join)
def test_a_malformed_accelerate_variable_is_one_line_naming_it(variable, digits_shards, tmp_path, monkeypatch, capsys):
    name, value = variable
    monkeypatch.setenv(name, value)
    line = assert_one_line(
        cli(["train", *training(digits_shards, tmp_path / "run")], monkeypatch, capsys, tmp_path),
        f"environment variable {name}={value!r}: {BAD_ENV[variable]}",
    )
    assert "mixed_precision" not in line
    assert not (tmp_path / "run").exists()


def test_the_table_reads_each_variable_as_accelerate_does():
    """What the table accepts is what Accelerate parses (its str_to_bool, int(), PrecisionType): no
    setting that works is refused."""
    values = ["1", "0", "TRUE", "False", "yes", "No", "on", "OFF", "t", "F", "y", "n", "2", "-1", "", "abc", " 3"]
    for name, (expected, test) in ACCELERATE_ENV.items():
        for value in values:
            if expected.startswith("a truth value"):
                try:
                    str_to_bool(value)
                    parses = True
                except ValueError:
                    parses = False
            elif expected.startswith("an integer"):
                least = int(re.search(r">= (-?\d+)", expected).group(1))
                parses = value.strip().lstrip("-").isdigit() and int(value) >= least
            else:
                continue
            assert test(value) == parses, (name, value)
    for value in PrecisionType:
        check_accelerate_env(1, {"ACCELERATE_MIXED_PRECISION": value.value})
    check_accelerate_env(
        1, {"ACCELERATE_TORCH_DEVICE": "cpu", "ACCELERATE_DYNAMO_BACKEND": "inductor", "WORLD_SIZE": "2"}
    )
    check_accelerate_env(1, {"LOCAL_RANK": "-1"})  # Accelerate's "not distributed"


def test_a_gradient_accumulation_variable_that_would_override_the_recipe_is_refused():
    """Accelerate takes ACCELERATE_GRADIENT_ACCUMULATION_STEPS over the Accelerator's argument: the
    recipe's grad_accum would be ignored silently."""
    check_accelerate_env(4, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    with pytest.raises(
        UserError, match=r"ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2 would override the recipe's grad_accum=1"
    ):
        check_accelerate_env(1, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"})


# --- Ctrl-C ---------------------------------------------------------------------------------------

# The real CLI, with the rename that ends an output's write paused (its temporary written, not yet
# under its final name) until the test's Ctrl-C: the interrupt lands mid-write, on a chosen output.
PAUSED_WRITE = """
import os, sys, time
import toolkit.atomic as atomic
real_replace, seen = os.replace, []

def replace(source, target):
    seen.append(target)
    if len(seen) == int(os.environ["PAUSE_AT"]):
        print("PAUSED", flush=True)
        time.sleep(60)
    real_replace(source, target)

atomic.os.replace = replace
from toolkit.cli import main
sys.argv = ["cvae-tk", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(
    "command, pause_at, said",
    [
        (["export", "--onnx", "{run}", "--out", "out/x.onnx"], 1, "stopped; no file was left half-written"),
        (["sample", "{onnx}", "-n", "3", "--out-dir", "out"], 2, "stopped; no file was left half-written"),
        (["shards", "digits", "--out", "out", "--shard-size", "500"], 2, "the build is not finished"),
    ],
    ids=["export", "sample", "shards"],
)
def test_ctrl_c_is_one_line_saying_what_was_left_and_no_file_is_half_written(
    command, pause_at, said, trained_run, exported, tmp_path
):
    # typer 0.29 turns a Ctrl-C into a silent exit 130 (older versions: 'aborted', exit 1): the user
    # was not told whether the shards or the export they interrupted can be used.
    script = tmp_path / "paused.py"
    script.write_text(PAUSED_WRITE)
    (tmp_path / "out").mkdir()
    arguments = [part.format(run=trained_run, onnx=exported) for part in command]
    process = subprocess.Popen(
        [sys.executable, str(script), *arguments],
        cwd=tmp_path,
        env={**ENV, "PAUSE_AT": str(pause_at)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as a terminal starts it: SIGINT not ignored (pytest may run in the background)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = process.stdout.readline()
        while line and not line.startswith("PAUSED"):
            line = process.stdout.readline()
        assert line.startswith("PAUSED"), process.communicate(timeout=60)[1][-3000:]
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # (a progress bar may come first)
    assert last.startswith(f"error: interrupted (Ctrl-C): {said}"), err[-3000:]
    written = sorted(path.relative_to(tmp_path / "out").as_posix() for path in (tmp_path / "out").rglob("*"))
    assert not [name for name in written if name.endswith(".tmp")], written  # the paused write was removed
    finished = [name for name in written if (tmp_path / "out" / name).is_file()]
    assert len(finished) == pause_at - 1, written  # the outputs before it are there, whole
