"""An int8 export against its fp32 export, on ONNX Runtime's CPU provider, in one run.

    .venv/bin/python bench/int8.py export/celeba-laptop.onnx [export/celeba-laptop-int8.onnx] [--batches 1,64] [--seconds 2] [--threads 0]

Both files (the int8 one as `cvae-tk export --int8` writes it, default OUT-int8.onnx beside OUT.onnx)
run the same inputs: attribute vectors drawn as 0/1 at random and prior noise, seeded. Per batch
size: the median time per call after a warm-up (the two files alternate, so a busy machine slows
both alike), the speed-up (fp32 time / int8 time) and the int8 images' distance from the fp32 ones
in grey levels (mean, 99th percentile, max). Unlike bench/sample.py (random weights of the recipes'
architectures) this measures a trained export. Writes bench/results/int8.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit import quantize  # noqa: E402


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32", type=Path)
    parser.add_argument("int8", type=Path, nargs="?")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--seconds", type=float, default=2.0, help="per file and batch size")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    args = parser.parse_args()
    int8_path = args.int8 or quantize.default_path(args.fp32)
    sessions = {"fp32": session(args.fp32, args.threads), "int8": session(int8_path, args.threads)}
    meta = sessions["fp32"].get_modelmeta().custom_metadata_map
    names, latent_dim = quantize._inputs(sessions["fp32"])
    width = len(json.loads(meta["attributes"]))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        rng = np.random.default_rng(batch)
        attributes = (rng.random((batch, width)) > 0.5).astype(np.float32)
        feed = quantize.feeds(names, attributes, latent_dim, batch, batch)[0]
        outputs = {kind: s.run(["images"], feed)[0] for kind, s in sessions.items()}  # also the warm-up
        grey = {kind: quantize.grey_levels(output) for kind, output in outputs.items()}
        difference = np.abs(grey["int8"] - grey["fp32"])
        times = {kind: [] for kind in sessions}
        deadline = time.perf_counter() + 2 * args.seconds
        while time.perf_counter() < deadline or min(len(t) for t in times.values()) < 5:
            for kind, s in sessions.items():  # alternate: load on the machine hits both
                start = time.perf_counter()
                s.run(["images"], feed)
                times[kind].append(time.perf_counter() - start)
        median = {kind: statistics.median(t) for kind, t in times.items()}
        row = {
            "batch": batch,
            "fp32_ms": median["fp32"] * 1e3,
            "int8_ms": median["int8"] * 1e3,
            "int8_over_fp32": median["fp32"] / median["int8"],
            "calls": len(times["fp32"]),
            "grey_mean": float(difference.mean()),
            "grey_p99": float(np.percentile(difference, 99)),
            "grey_max": int(difference.max()),
        }
        rows.append(row)
        print(
            f"batch {batch:4}: fp32 {row['fp32_ms']:8.2f} ms  int8 {row['int8_ms']:8.2f} ms  speed-up {row['int8_over_fp32']:.2f}x  "
            f"grey levels mean {row['grey_mean']:.2f} / p99 {row['grey_p99']:.0f} / max {row['grey_max']}  ({row['calls']} calls each)",
            flush=True,
        )
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "int8.json").write_text(
        json.dumps({"fp32": str(args.fp32), "int8": str(int8_path), "rows": rows}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
