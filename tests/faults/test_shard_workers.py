"""A shard-building worker killed (SIGKILL, as the kernel's out-of-memory killer does) or the build
interrupted with Ctrl-C: `cvae-tk shards` ends at once with one line instead of waiting forever
(`multiprocessing.Pool` never noticed a dead worker), leaves no worker behind and nothing that looks
finished, and the same command run again finishes the build."""

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import psutil
from fixtures import make_celeba

from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ARGS = ["--size", "16", "--workers", "2", "--shard-size", "4"]

# The real CLI, one record per task, with the writer paused after the 2nd sample of the 3rd train
# shard until the test creates the file `go`: the kill lands mid-build, with tasks still to submit.
PAUSED_BUILD = """
import sys, time
from pathlib import Path
import toolkit.data.build as build
import toolkit.data.shards as shards
build.CHUNK = 1
real_append = shards._ShardFile.append

def append(self, sample):
    real_append(self, sample)
    if self.path.name == "train-000002.tar" and self.count == 2:
        self.stream.flush()
        print("PAUSED", flush=True)
        while not Path("go").exists():
            time.sleep(0.05)

shards._ShardFile.append = append
from toolkit.cli import main
sys.argv = ["cvae-tk", *sys.argv[1:]]
main()
"""


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start_paused(tmp_path, build):
    script = tmp_path / "paused_build.py"
    script.write_text(PAUSED_BUILD)
    process = subprocess.Popen(
        [sys.executable, str(script), *build],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # Ctrl-C as a terminal's foreground job gets it: a test suite started in the background
        # (`pytest &`, nohup) hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    line = process.stdout.readline()
    while line and not line.startswith("PAUSED"):
        line = process.stdout.readline()
    assert line.startswith("PAUSED"), process.communicate(timeout=30)[1][-3000:]
    workers = psutil.Process(process.pid).children()
    assert len(workers) == 2
    return process, workers


def alive(processes):
    return [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def finish(process, workers):
    """Wait for the build to end (a hang fails the test), then reap anything left of it."""
    try:
        _, err = process.communicate(timeout=30)
        psutil.wait_procs(workers, timeout=10)
        return err
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_killed_worker_ends_the_build_in_one_line_and_a_rerun_finishes_it(tmp_path):
    celeba = make_celeba(tmp_path / "celeba", n=60)  # 40 train / 10 val / 10 test
    build = ["shards", "celeba", "--root", str(celeba["root"]), *ARGS]
    clean = run_cli([*build, "--out", "clean"], cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr[-3000:]

    process, workers = start_paused(tmp_path, [*build, "--out", "out"])
    os.kill(workers[0].pid, signal.SIGKILL)  # what the out-of-memory killer does
    (tmp_path / "go").touch()
    err = finish(process, workers)

    assert process.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]  # (the progress bar comes first)
    assert line.startswith("error: ") and "worker" in line and "SIGKILL" in line and "--workers" in line, line
    assert not alive(workers), "pool workers outlived the build"
    out = tmp_path / "out"
    assert not list(out.rglob("manifest.json"))  # the train split was being written: nothing looks finished
    for shard in out.rglob("*.tar"):  # every tar under a final name is complete
        with tarfile.open(shard) as tar:
            assert len(tar.getmembers()) == 2 * 4

    again = run_cli([*build, "--out", "out"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert files(out) == files(tmp_path / "clean")


def test_ctrl_c_stops_the_build_and_its_workers_without_a_traceback(tmp_path):
    celeba = make_celeba(tmp_path / "celeba", n=60)
    process, workers = start_paused(
        tmp_path, ["shards", "celeba", "--root", str(celeba["root"]), *ARGS, "--out", "out"]
    )
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    err = finish(process, workers)
    assert process.returncode not in (0, None)
    assert "Traceback" not in err, err[-3000:]
    assert not alive(workers), "pool workers outlived the build"
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()
    assert not list((tmp_path / "out").rglob("*.tar.tmp"))  # the open shard was removed


def test_stopping_workers_mid_result_does_not_hang_the_build():
    """A worker terminated while sending a result (a chunk of images is MBs, more than a pipe holds)
    leaves half a message in the result pipe; the executor's manager thread waited for the rest for
    ever, and `_stop` (after a full disk or Ctrl-C) with it. The half message is written here as a
    dying worker leaves it: a length, then fewer bytes."""
    import multiprocessing
    import struct
    import threading
    from concurrent.futures import ProcessPoolExecutor

    from toolkit.data.build import _stop

    executor = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"))
    assert executor.submit(abs, -1).result() == 1  # the workers and the manager thread are up
    workers = list(executor._processes.values())
    os.write(executor._result_queue._writer.fileno(), struct.pack("!i", 1 << 20) + b"half a chunk")
    stopper = threading.Thread(target=_stop, args=(executor,), daemon=True)
    stopper.start()
    stopper.join(timeout=30)
    assert not stopper.is_alive(), "_stop hung on a half-sent result"
    assert not any(worker.is_alive() for worker in workers)
