"""SIGKILL `cvae-tk export` while it runs: the final name never holds a partial file."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# The real CLI, paused (60 s) between writing the temp file and renaming it: the kill lands in the
# one window where bytes are on disk.
SLOW_RENAME = """
import os, sys, time
real_replace = os.replace

def replace(src, dst, *args, **kwargs):
    if str(dst).endswith(".onnx"):
        print("RENAMING", src, flush=True)
        time.sleep(60)
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
from toolkit.cli import main
sys.argv = ["cvae-tk", *sys.argv[1:]]
main()
"""


def export(run_dir, out, cwd, script=None):
    head = [sys.executable, str(script)] if script else [sys.executable, "-m", "toolkit.cli"]
    return subprocess.Popen(
        [*head, "export", "--onnx", str(run_dir), "--out", str(out)],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill(process):
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL


def test_sigkill_during_export_leaves_nothing_under_the_final_name(trained_run, tmp_path):
    out = tmp_path / "out" / "digits.onnx"
    process = export(trained_run, out, tmp_path)
    # loading, tracing or the parity check (the whole export takes several seconds)
    time.sleep(random.uniform(1.0, 3.0))
    assert process.poll() is None, "the export finished before it could be killed"
    kill(process)
    assert not out.exists()
    assert not out.parent.exists() or [p.name for p in out.parent.iterdir()] == []


def test_sigkill_between_the_temp_file_and_the_rename(trained_run, tmp_path):
    script = tmp_path / "slow_rename.py"
    script.write_text(SLOW_RENAME)
    out = tmp_path / "out" / "digits.onnx"
    process = export(trained_run, out, tmp_path, script)
    line = process.stdout.readline()
    while line and not line.startswith("RENAMING"):
        line = process.stdout.readline()
    assert line.startswith("RENAMING"), process.stderr.read()[-3000:]
    kill(process)
    assert not out.exists()
    leftovers = list(out.parent.iterdir())
    # what remains is one hidden, complete temp file: never the final name, never picked up by anything
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".digits.onnx.") and leftovers[0].name.endswith(".tmp")
    assert leftovers[0].stat().st_size > 100_000
