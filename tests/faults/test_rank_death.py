"""One rank of a 2-process gloo run (CPU) dies (SIGKILL) or freezes (SIGSTOP) after training has
started: the other side stops with a non-zero status and an error within a bounded time instead of
hanging in a collective, no process of the run is left behind, and `resume=latest` continues the run.

Measured on 2 CPU cores: a killed rank is noticed at once (gloo sees the TCP connection close: the
launcher stops the run about 5 s after the kill, a hand-started survivor fails in its next all-reduce
within about a second); a frozen rank holds the connection open, so only `dist_timeout_s` stops the
survivor (here 15 s; the default 1800 s is torch's own default for gloo).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from toolkit.train import CHECKPOINTS, TRAINER_STATE, checkpoint_step, find_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
STOP_WITHIN_S = 60  # the bound on how long the surviving side may take to stop after the fault


def train_args(shards, run_dir, *extra):
    return [
        str(ROOT / "toolkit" / "train.py"),
        "recipe=digits",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        "batch_size=16",
        "checkpoint_every=2",
        "sample_every=100000",
        "log_every=10",
        "data.num_workers=0",
        *extra,
    ]


def wait_for_first_checkpoint(run_dir, processes, timeout=180):
    """Training has started: checkpoint-2 is complete (written by rank 0 after two all-reduced steps)."""
    deadline = time.monotonic() + timeout
    while not (run_dir / CHECKPOINTS / "checkpoint-2" / TRAINER_STATE).is_file():
        for process in processes:
            assert process.poll() is None, (
                f"a rank ended (rc {process.returncode}) before the fault: {process.stderr.read()[-3000:]}"
            )
        assert time.monotonic() < deadline, "timed out waiting for the first checkpoint"
        time.sleep(0.05)


def wait_for_exit(process, started):
    """(returncode, stderr, seconds since `started`); fails if the process is still running after STOP_WITHIN_S."""
    try:
        _, err = process.communicate(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(
            f"the surviving side still ran {STOP_WITHIN_S} s after the fault (hung in a collective?): {err[-2000:]}"
        )
    return process.returncode, err, time.monotonic() - started


def assert_all_gone(processes, timeout=30):
    """Every process of the run (ranks, loader workers) has exited: nothing hangs on after the fault."""
    gone, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"left running after the fault: {[(p.pid, p.name()) for p in alive]}"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_by_hand(shards, run_dir, *extra, script=None, env=()):
    """Two ranks started one by one with the env:// variables, no launcher watching them; `script`
    runs in place of toolkit/train.py (with its arguments), `env` is added to each rank's."""
    port, processes = free_port(), []
    arguments = train_args(shards, run_dir, "max_steps=100000", *extra)
    if script is not None:
        arguments[0] = str(script)
    for rank in (0, 1):
        rank_env = {
            **ENV,
            **dict(env),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, *arguments],
                cwd=run_dir.parent,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def resume_and_finish(shards, run_dir):
    """resume=latest under the launcher, a few steps past the newest complete checkpoint."""
    latest = find_checkpoint(run_dir, "latest")
    assert latest is not None and (latest / TRAINER_STATE).is_file()
    step = checkpoint_step(latest)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            *train_args(shards, run_dir, f"max_steps={step + 3}", "resume=latest"),
        ],
        cwd=run_dir.parent,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {latest} (step {step})" in done.stdout
    assert (run_dir / "model.safetensors").is_file()
    assert (run_dir / CHECKPOINTS / f"checkpoint-{step + 3}" / TRAINER_STATE).is_file()


def test_launcher_stops_the_run_when_a_rank_is_killed_and_resume_latest_continues(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            *train_args(digits_shards, run_dir, "max_steps=100000", "data.num_workers=1"),
        ],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_first_checkpoint(run_dir, [launcher])
        tree = psutil.Process(launcher.pid).children(recursive=True)  # the ranks and their loader workers
        ranks = {int(p.environ()["RANK"]): p for p in tree if p.ppid() == launcher.pid}
        assert sorted(ranks) == [0, 1]
        killed_at = time.monotonic()
        os.kill(ranks[1].pid, signal.SIGKILL)
        code, err, took = wait_for_exit(launcher, killed_at)
    finally:
        if launcher.poll() is None:  # the test failed: stop what it started, ranks first
            for process in psutil.Process(launcher.pid).children(recursive=True):
                process.kill()
            launcher.kill()
            launcher.communicate()
    assert code != 0
    assert "SIGKILL" in err and f"pid: {ranks[1].pid}" in err, err[-3000:]  # the launcher names the rank that died
    print(f"launcher stopped {took:.1f} s after rank 1 was killed")
    assert_all_gone(tree)
    resume_and_finish(digits_shards, run_dir)


@pytest.mark.parametrize("victim", [0, 1])  # 0 also hosts the rendezvous store
def test_without_a_launcher_the_surviving_rank_fails_instead_of_hanging(digits_shards, tmp_path, victim):
    run_dir = tmp_path / "run"
    processes = start_by_hand(digits_shards, run_dir)
    try:
        wait_for_first_checkpoint(run_dir, processes)
        killed_at = time.monotonic()
        os.kill(processes[victim].pid, signal.SIGKILL)
        code, err, took = wait_for_exit(processes[1 - victim], killed_at)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]  # was gloo's RuntimeError 'Connection closed by peer', a traceback
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: another process of this run stopped or was lost during step "), line
    assert "its own output says why" in line and "the last good checkpoint is " in line, line
    assert "pair.cc" not in line and "This is typically" not in line, line  # gloo's source location and advice
    print(f"rank {1 - victim} stopped {took:.1f} s after rank {victim} was killed: {line}")
    if victim == 0:  # rank 0 writes the checkpoints: it may have died in the middle of one
        resume_and_finish(digits_shards, run_dir)


def test_a_frozen_rank_stops_the_other_after_dist_timeout_s(digits_shards, tmp_path):
    """SIGSTOP keeps rank 1's sockets open, so nothing but the process-group timeout ends rank 0's wait."""
    run_dir = tmp_path / "run"
    processes = start_by_hand(digits_shards, run_dir, "dist_timeout_s=15")
    try:
        wait_for_first_checkpoint(run_dir, processes)
        frozen_at = time.monotonic()
        os.kill(processes[1].pid, signal.SIGSTOP)
        code, err, took = wait_for_exit(processes[0], frozen_at)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()  # SIGKILL ends a stopped process too
            process.communicate()
    assert code == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: another process of this run stopped or was lost") and "Timed out" in line, line
    # the timeout, not a dead socket, ended it (the wait may have begun just before the freeze)
    assert 10 < took < 15 + 30, took
    print(f"rank 0 stopped {took:.1f} s after rank 1 froze (dist_timeout_s=15)")


# Training, with the save of checkpoint-4 failing on one rank as a full disk fails it (the ranks of a
# run on several machines write to several disks): `save_state` raises ENOSPC there.
FAILING_SAVE = """
import errno, os, sys
import accelerate

real_save_state = accelerate.Accelerator.save_state

def save_state(self, output_dir=None, **kwargs):
    if output_dir.endswith("checkpoint-4.tmp") and self.process_index == int(os.environ["FAIL_RANK"]):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save_state(self, output_dir, **kwargs)

accelerate.Accelerator.save_state = save_state
from toolkit.train import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("victim", [0, 1])
def test_a_checkpoint_that_one_rank_cannot_write_stops_every_rank_with_a_line(digits_shards, tmp_path, victim):
    """Every rank stops with the save's line, the failed rank's naming its error, the others naming it.
    Was: only the rank whose save failed said so; the others went on to the save's barrier, where
    gloo's 'Connection closed by peer' traceback ended them once that rank's process was gone (NCCL:
    a wait until the launcher or dist_timeout_s stops them)."""
    script = tmp_path / "failing_save.py"
    script.write_text(FAILING_SAVE)
    run_dir = tmp_path / "run"
    processes = start_by_hand(
        digits_shards, run_dir, "dist_timeout_s=300", script=script, env={"FAIL_RANK": str(victim)}
    )
    try:
        wait_for_first_checkpoint(run_dir, processes)
        started = time.monotonic()
        results = [wait_for_exit(process, started) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()
    partial = run_dir / CHECKPOINTS / "checkpoint-4.tmp"
    for rank, (code, err, _) in enumerate(results):
        assert code == 2, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: could not write the checkpoint {partial}: "), line
        expected = "No space left on device (ENOSPC)" if rank == victim else f"process {victim} failed"
        assert expected in line, line
        assert f"the last complete checkpoint is {run_dir / CHECKPOINTS / 'checkpoint-2'}" in line, line
    assert not partial.exists()  # removed by rank 0, whichever rank failed
    assert find_checkpoint(run_dir, "latest") == run_dir / CHECKPOINTS / "checkpoint-2"
