"""The memory of `cvae-tk shards` on a 50,000-image build: the images stream through, only the source
table grows with the data set.

A folder data set in its real on-disk format (JPEGs in 50 sub-folders + a CSV with two 0/1 columns)
of 5,000 and of 50,000 images (16x16 noise JPEGs, resized to 48x48: about 2.4 KB of JPEG per image,
110 MB of encoded images in the 45,000 extra ones) is built by `cvae-tk shards folder --workers 2`
in a subprocess, while the test polls the memory of its whole process tree (main process and pool
workers) every 50 ms.

Measured on 2 CPU cores (peak RSS, MiB; 5,000 -> 50,000 images):
    main process             66 -> 109  (+43)     the source table alone: +34 (read_folder, measured apart),
                                                  plus the compact arrays the workers read (+4)
                             (it was +49 to +51, past the bound in one CI run, while the writer kept a
                             set of every key, 6 MiB, and the arrays were filled from temporary lists)
    each of the 2 workers    USS (private memory) 8 -> 16 (+8); it was 10 -> 29 while workers read
                             the table's Python objects (their reference counts copy the pages)
    whole tree, sum of PSS   73 -> 131  (+58)
    build time               1-2 s -> 9-25 s (the 50,000 files are written in 2-30 s, depending on the disk)
    whole test               about 35 s
A check of the check: a build patched to keep every encoded sample peaked at 276 MiB in its main
process at 50,000 images (+199 MiB over its 5,000-image build), far past the bound.

Bound (asserted): from 5,000 to 50,000 images the peak RSS of the main process grows by at most
the source table's own growth + 16 MiB, and each worker's private memory by at most 16 MiB. So no
encoded image is held beyond the chunks in flight: keeping about 15 % of the extra images' bytes
would exceed it. The table itself (file paths, keys and attribute rows: about 0.75 KB per image in
the main process) does grow with the number of images; it is what `read_folder` returns, measured
in its own process.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
SMALL, LARGE = 5_000, 50_000
PER_FOLDER = 1_000
MARGIN = 16 * 2**20  # bytes, beyond the table's growth
MiB = 2**20


def make_folder_data_set(root: Path, count: int) -> None:
    """root/images/NNN/IIIIII.jpg (16x16 noise JPEGs, 256 variants) + root/labels.csv (file, smiling, glasses)."""
    rng = np.random.default_rng(0)
    variants = []
    for _ in range(256):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        variants.append(buffer.getvalue())
    rows = ["file,smiling,glasses"]
    for index in range(count):
        folder = root / "images" / f"{index // PER_FOLDER:03d}"
        if index % PER_FOLDER == 0:
            folder.mkdir(parents=True)
        (folder / f"{index:06d}.jpg").write_bytes(variants[index % len(variants)])
        rows.append(f"images/{index // PER_FOLDER:03d}/{index:06d}.jpg,{index % 2},{index // 2 % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


TABLE_COST = """
import sys, psutil
import numpy, toolkit.data.build, toolkit.data.folder
process = psutil.Process()
before = process.memory_info().rss
table = toolkit.data.folder.read_folder(sys.argv[1], sys.argv[1] + "/labels.csv")
print(process.memory_info().rss - before)
"""


def table_cost(root: Path) -> int:
    """Bytes of RSS that the source table (read_folder's result) takes, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", TABLE_COST, str(root)], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def build_peaks(root: Path) -> dict:
    """Run the build and poll its process tree: peak RSS of the main process, peak private memory (USS)
    of each worker (its RSS also counts the pages it shares with the main process), peak sum of PSS."""
    started = time.monotonic()
    build = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "toolkit.cli",
            "shards",
            "folder",
            "--root",
            str(root),
            "--attributes",
            str(root / "labels.csv"),
            "--out",
            str(root / "shards"),
            "--size",
            "48",
            "--workers",
            "2",
            "--shard-size",
            "10000",
        ],
        cwd=root,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    main = psutil.Process(build.pid)
    peaks: dict[int, int] = {}
    private: dict[int, int] = {}
    peak_pss = 0
    try:
        while build.poll() is None:
            pss = 0
            try:
                tree = [main, *main.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for process in tree:
                try:
                    memory = process.memory_full_info()
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    continue
                peaks[process.pid] = max(peaks.get(process.pid, 0), memory.rss)
                private[process.pid] = max(private.get(process.pid, 0), memory.uss)
                pss += memory.pss
            peak_pss = max(peak_pss, pss)
            time.sleep(0.05)
        out, err = build.communicate(timeout=300)
    finally:
        if build.poll() is None:
            build.kill()
            build.communicate()
    assert build.returncode == 0, err[-3000:]
    assert "train:" in out and "test:" in out
    workers = [uss for pid, uss in private.items() if pid != build.pid]
    assert len(workers) == 2, peaks  # the pool was polled
    return {"main": peaks[build.pid], "workers": workers, "pss": peak_pss, "seconds": time.monotonic() - started}


def test_shard_build_memory_grows_only_by_the_source_table(tmp_path):
    measured = {}
    for count in (SMALL, LARGE):
        root = tmp_path / f"n{count}"
        root.mkdir()
        made = time.monotonic()
        make_folder_data_set(root, count)
        make_seconds = time.monotonic() - made
        measured[count] = {**build_peaks(root), "table": table_cost(root), "make_seconds": make_seconds}
        shutil.rmtree(root)  # 2 x 50,000 small files: give the disk back now
    small, large = measured[SMALL], measured[LARGE]
    for count, m in measured.items():
        print(
            f"{count} images: made in {m['make_seconds']:.1f} s, built in {m['seconds']:.1f} s; peak RSS main "
            f"{m['main'] / MiB:.0f} MiB, workers' USS {[round(w / MiB) for w in m['workers']]} MiB, sum of PSS "
            f"{m['pss'] / MiB:.0f} MiB; the table alone {m['table'] / MiB:.1f} MiB"
        )
    table_growth = large["table"] - small["table"]
    assert large["main"] - small["main"] <= table_growth + MARGIN, (small, large)
    for before, after in zip(sorted(small["workers"]), sorted(large["workers"])):
        assert after - before <= MARGIN, (small, large)  # workers read compact arrays, not the table
