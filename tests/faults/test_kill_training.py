"""SIGKILL a training run (between steps, and in the middle of writing a checkpoint), then resume:
the result is exactly the uninterrupted run's, and no half-written checkpoint is ever picked."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toolkit.train import CHECKPOINTS, LOCK, TRAINER_STATE, find_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # one thread: the same arithmetic in every run


def command(shards, run_dir, *extra, script=None):
    return [
        sys.executable,
        str(script or ROOT / "toolkit" / "train.py"),
        "recipe=digits",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        "max_steps=40",
        "checkpoint_every=5",
        "batch_size=16",
        "data.num_workers=0",
        "log_every=1",
        "sample_every=1000",
        *extra,
    ]


def start(args, cwd):
    return subprocess.Popen(args, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=240):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


def kill(process):
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL


def wait_for(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, (
            f"the run ended (rc {process.returncode}) before the fault: {process.stderr.read()[-3000:]}"
        )
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.01)


def complete_checkpoints(run_dir):
    return [p for p in (run_dir / CHECKPOINTS).glob("checkpoint-*") if (p / TRAINER_STATE).is_file()]


def assert_no_pickable_broken_checkpoint(run_dir):
    """Every folder find_checkpoint("latest") could pick (checkpoint-N, no .tmp) is complete."""
    for folder in (run_dir / CHECKPOINTS).glob("checkpoint-*"):
        if not folder.name.endswith(".tmp"):
            assert (folder / TRAINER_STATE).is_file(), f"{folder.name} looks final but has no {TRAINER_STATE}"
            assert (folder / "model.safetensors").is_file() and (folder / "optimizer.bin").is_file(), folder.name


def assert_same_weights(a_dir, b_dir):
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference(digits_shards, tmp_path_factory):
    """An uninterrupted 40-step run, started at once so it overlaps the runs the tests kill."""
    folder = tmp_path_factory.mktemp("reference")
    process, done = start(command(digits_shards, folder / "run"), folder), []

    def wait():
        if not done:
            done.append(finish(process))
        return folder / "run"

    yield wait
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_sigkill_between_steps_then_resume_gives_the_uninterrupted_weights(digits_shards, reference, tmp_path):
    run_dir = tmp_path / "run"
    process = start(command(digits_shards, run_dir), tmp_path)
    wait_for(lambda: complete_checkpoints(run_dir), process)
    time.sleep(random.uniform(0, 0.4))  # somewhere after the first checkpoint: any step, maybe inside a save
    kill(process)
    assert not (run_dir / "model.safetensors").exists(), "the run finished before it was killed"
    assert_no_pickable_broken_checkpoint(run_dir)
    picked = find_checkpoint(run_dir, "latest")
    assert picked is not None and picked.name != "checkpoint-40"

    resumed = start(command(digits_shards, run_dir, "resume=latest"), tmp_path)
    assert f"resuming from {picked}" in finish(resumed)
    assert_no_pickable_broken_checkpoint(run_dir)
    assert_same_weights(reference(), run_dir)


SLOW_SAVE = """
import sys, time
import accelerate.checkpointing as checkpointing
real_save = checkpointing.save

def save(obj, f, *args, **kwargs):
    # killed while checkpoint-10 is half written: the model file is there, the optimizer's not yet
    if "checkpoint-10.tmp" in str(f) and str(f).endswith("optimizer.bin"):
        print("SAVING", f, flush=True)
        time.sleep(120)
    return real_save(obj, f, *args, **kwargs)

checkpointing.save = save
import toolkit.train
toolkit.train.main(sys.argv[1:])
"""


def test_sigkill_while_a_checkpoint_is_written_keeps_the_previous_one(digits_shards, reference, tmp_path):
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE)
    run_dir = tmp_path / "run"
    process = start(command(digits_shards, run_dir, script=script), tmp_path)
    line = process.stdout.readline()
    while line and not line.startswith("SAVING"):
        line = process.stdout.readline()
    assert line.startswith("SAVING"), process.stderr.read()[-3000:]
    kill(process)

    folder = run_dir / CHECKPOINTS
    partial = folder / "checkpoint-10.tmp"
    assert (partial / "model.safetensors").is_file() and not (partial / TRAINER_STATE).exists()
    assert not (folder / "checkpoint-10").exists()
    assert_no_pickable_broken_checkpoint(run_dir)
    assert find_checkpoint(run_dir, "latest") == folder / "checkpoint-5"

    resumed = start(command(digits_shards, run_dir, "resume=latest"), tmp_path)
    assert f"resuming from {folder / 'checkpoint-5'} (step 5)" in finish(resumed)
    assert not partial.exists()  # the next save of step 10 replaced the leftover
    assert_no_pickable_broken_checkpoint(run_dir)
    assert_same_weights(reference(), run_dir)


@pytest.mark.parametrize("entry", ["toolkit/train.py", "cvae-tk train"])
def test_ctrl_c_is_one_line_naming_the_checkpoint_to_continue_from(digits_shards, tmp_path, entry):
    """Ctrl-C of `python toolkit/train.py` (and so of `accelerate launch`, one per rank) was a 20-line
    KeyboardInterrupt traceback, `cvae-tk train` said `aborted`: neither said what the run had kept.
    Also during the seconds of torch's import, before the run began."""
    run_dir = tmp_path / "run"
    args = command(digits_shards, run_dir, "max_steps=100000", "checkpoint_every=2")
    if entry == "cvae-tk train":
        args[1:2] = ["-m", "toolkit.cli", "train"]

    def terminal(arguments):  # as a terminal starts it: SIGINT not ignored (pytest may run in the background)
        return subprocess.Popen(
            arguments, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip

    process = terminal(args)
    wait_for(lambda: find_checkpoint(run_dir, "latest") is not None, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    last = find_checkpoint(run_dir, "latest")
    assert f"interrupted (Ctrl-C): stopped, not saved; the last complete checkpoint is {last}" in line
    assert "continue with resume=latest" in line and not (run_dir / LOCK).exists()

    early = terminal(command(digits_shards, tmp_path / "early"))
    time.sleep(1.0)  # most likely inside torch's import (seconds); on a fast machine perhaps past it
    early.send_signal(signal.SIGINT)
    _, err = early.communicate(timeout=120)
    assert early.returncode == 130 and "Traceback" not in err, err[-3000:]
    said = err.strip().splitlines()[-1]
    assert said.startswith("error: interrupted (Ctrl-C)"), err[-3000:]
    if said.endswith("before the run began: nothing was written"):
        assert not (tmp_path / "early").exists()
