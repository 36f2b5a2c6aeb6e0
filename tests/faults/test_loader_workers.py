"""SIGKILL a DataLoader worker of a running training, as the kernel's OOM killer does: the run must
stop within seconds with one line naming what happened and the last good checkpoint (no hang, no
traceback, nothing saved as if valid), and resume=latest must continue from that checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from toolkit.train import CHECKPOINTS, TRAINER_STATE, find_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def command(shards, run_dir, *extra):
    return [
        sys.executable,
        "-m",
        "toolkit.cli",
        "train",
        "recipe=digits",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        "checkpoint_every=2",
        "batch_size=16",
        "data.num_workers=2",
        "log_every=1",
        "sample_every=1000",
        *extra,
    ]


def test_a_killed_loader_worker_stops_training_in_one_line_and_resume_continues(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        command(digits_shards, run_dir, "max_steps=100000"),
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / CHECKPOINTS).glob(f"checkpoint-*/{TRAINER_STATE}")):
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        workers = psutil.Process(process.pid).children()
        assert len(workers) == 2, workers  # the two loader workers, forked by the training process
        os.kill(workers[0].pid, signal.SIGKILL)
        _, err = process.communicate(timeout=60)  # a hang fails here
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: a data loader worker died during step "), last
    # PyTorch's words, by where the main process was: "is killed by signal: Killed" or "exited unexpectedly"
    assert "DataLoader worker (pid" in last and str(workers[0].pid) in last, last
    newest = find_checkpoint(run_dir, "latest")
    assert newest is not None and f"the last good checkpoint is {newest}: continue with resume=latest" in last, last
    assert not (run_dir / "model.safetensors").exists()  # nothing saved as if the run had finished
    assert not psutil.pid_exists(workers[1].pid) or psutil.Process(workers[1].pid).status() == psutil.STATUS_ZOMBIE
    assert not (run_dir / ".lock").exists()

    step = int(newest.name.split("-")[1])
    resumed = subprocess.run(
        command(digits_shards, run_dir, f"max_steps={step + 1}", "resume=latest"),
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {newest} (step {step})" in resumed.stdout
    assert (run_dir / "model.safetensors").is_file()
