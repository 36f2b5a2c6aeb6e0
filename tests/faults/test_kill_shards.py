"""SIGKILL `cvae-tk shards` in the middle of a build, run it again: it finishes, byte-identical to
a build that was never interrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fixtures import make_celeba

from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ARGS = ["--size", "32", "--workers", "2", "--shard-size", "4"]

# The real CLI, with the writer paused (30 s) after the 2nd sample of the 3rd train shard, so the
# kill lands mid-build at a known point: 2 shards committed, the 3rd open under its .tmp name.
SLOW_BUILD = """
import sys, time
import toolkit.data.shards as shards
real_append = shards._ShardFile.append

def append(self, sample):
    real_append(self, sample)
    if self.path.name == "train-000002.tar" and self.count == 2:
        self.stream.flush()
        print("PAUSED", flush=True)
        time.sleep(30)

shards._ShardFile.append = append
from toolkit.cli import main
sys.argv = ["cvae-tk", *sys.argv[1:]]
main()
"""


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def workers_gone(group, timeout=10.0):
    """Orphaned pool workers notice that their parent is gone and exit by themselves (a watch thread
    in each: their task pipe never closes, since every worker holds its write end too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_sigkill_mid_build_then_rerun_gives_the_uninterrupted_shards(tmp_path):
    celeba = make_celeba(tmp_path / "celeba", n=60)  # 40 train / 10 val / 10 test -> 10 + 3 + 3 shards
    build = ["shards", "celeba", "--root", str(celeba["root"]), *ARGS]
    clean = subprocess.Popen(
        [sys.executable, "-m", "toolkit.cli", *build, "--out", "clean"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    script = tmp_path / "slow_build.py"
    script.write_text(SLOW_BUILD)
    # its own process group, so that the pool workers it forks can be found (and reaped) afterwards
    killed = subprocess.Popen(
        [sys.executable, str(script), *build, "--out", "out"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = killed.stdout.readline()
        while line and not line.startswith("PAUSED"):
            line = killed.stdout.readline()
        assert line.startswith("PAUSED"), killed.stderr.read()[-3000:]
        os.kill(killed.pid, signal.SIGKILL)  # the main process only, as `kill -9 PID` would
        killed.communicate(timeout=30)
        assert killed.returncode == -signal.SIGKILL
        assert workers_gone(killed.pid), "pool workers outlived the killed build"
    finally:
        try:  # the workers of the killed pool, if any outlived it
            os.killpg(killed.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    train = tmp_path / "out" / "train"
    assert sorted(p.name for p in train.iterdir()) == ["train-000000.tar", "train-000001.tar", "train-000002.tar.tmp"]
    assert not list((tmp_path / "out").rglob("manifest.json"))  # nothing looks finished

    again = run_cli([*build, "--out", "out"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    _, err = clean.communicate(timeout=120)
    assert clean.returncode == 0, err[-3000:]
    expected = files(tmp_path / "clean")
    assert len([name for name in expected if name.endswith(".tar")]) == 16
    assert files(tmp_path / "out") == expected
