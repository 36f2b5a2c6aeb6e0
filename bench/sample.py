"""Benchmark: sampling speed of the exported decoders, ONNX Runtime vs PyTorch eager, same weights.

For the `celeba` decoder (paper, 218x178, 40 attributes) and the `celeba64` decoder (resnet 64x64,
learned prior), at batch sizes 1, 64 and 1024: latency per call and images/s for
  torch   PyTorch eager fp32 (`model.generate` under inference_mode)
  ort     ONNX Runtime fp32 (the exported sampler graph)
and on a GPU (--device cuda, the default where torch sees one) also torch.compile under bf16
autocast, and ONNX Runtime CUDA fp32 and fp16 exports with IO binding (inputs on the device, the
output left there). CUDA graphs are not measured yet.
and the memory-traffic floor: the bytes each layer must read and write per image (activations in
and out, plus the weights shared by the batch), divided by this machine's measured copy bandwidth.
Weights are random (speed does not depend on training). Writes bench/results/sample.json.

    .venv/bin/python bench/sample.py [--batches 1,64,1024] [--models celeba,celeba64] [--seconds 2] [--device cuda --bandwidth 3350]
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.export import to_onnx  # noqa: E402
from toolkit.model import CVAE, ModelSpec, arch_options  # noqa: E402

MODELS = {
    "celeba": dict(attributes=40, image_size=(218, 178), arch="paper", prior="standard", options={}),
    "celeba64": dict(attributes=40, image_size=(64, 64), arch="resnet", prior="learned",
                     options={"width": 64, "levels": 4, "embed_dim": 128}),
}


def build(name: str) -> CVAE:
    cfg = MODELS[name]
    torch.manual_seed(0)
    options = arch_options(cfg["arch"], cfg["options"]) if cfg["options"] else {}
    spec = ModelSpec([f"a{i}" for i in range(cfg["attributes"])], cfg["image_size"], 128, cfg["arch"], prior=cfg["prior"], options=options)
    return CVAE(spec).eval()


def timed(call, seconds: float) -> float:
    """Median seconds per call: one warm-up, then calls until `seconds` have passed (at least 3)."""
    call()
    times = []
    while len(times) < 3 or sum(times) < seconds:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def traffic_floor(model: CVAE, batch: int) -> float:
    """Bytes per image that the decoder's layers must read and write at this batch size."""
    activations = 0
    hooks = []

    def count(module, inputs, output):
        nonlocal activations
        tensors = [t for t in inputs if torch.is_tensor(t)] + ([output] if torch.is_tensor(output) else [])
        activations += sum(t.numel() * t.element_size() for t in tensors)

    parts = [model.decoder] + ([model.prior_net] if getattr(model, "prior_net", None) is not None else [])
    for part in parts:
        for module in part.modules():
            if len(list(module.children())) == 0:
                hooks.append(module.register_forward_hook(count))
    with torch.inference_mode():
        model.generate(torch.zeros(1, model.spec.num_attributes), torch.zeros(1, model.spec.latent_dim))
    for hook in hooks:
        hook.remove()
    weights = sum(p.numel() * p.element_size() for part in parts for p in part.parameters())
    return activations + weights / batch


def copy_bandwidth() -> float:
    """Bytes/s of a large memory copy (read + write), the best a memory-bound layer can do here."""
    source = np.ones(64 * 2**20, dtype=np.float32)  # 256 MiB
    target = np.empty_like(source)
    seconds = timed(lambda: np.copyto(target, source), 1.0)
    return 2 * source.nbytes / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,64,1024")
    parser.add_argument("--models", default="celeba,celeba64")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bandwidth", type=float, help="memory bandwidth in GB/s for the floor (default: measured host copy)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cuda = args.device == "cuda"
    # On a GPU the floor is the device's memory bandwidth, which a host copy does not measure:
    # pass it with --bandwidth (GB/s, e.g. 3350 for an H100 SXM) there.
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else copy_bandwidth()
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    print(f"bandwidth: {bandwidth / 1e9:.1f} GB/s; ONNX Runtime provider: {provider}; torch threads: {torch.get_num_threads()}")
    device = torch.device(args.device)
    rows = []
    for name in args.models.split(","):
        model = build(name)
        sessions = {"ort": ort.InferenceSession(to_onnx(model), providers=[provider])}
        if cuda:
            sessions["ort_fp16"] = ort.InferenceSession(to_onnx(model, fp16=True), providers=[provider])
            assert all(s.get_providers()[0] == provider for s in sessions.values()), "ONNX Runtime fell back from CUDA"
        model = model.to(device)
        compiled = torch.compile(model.generate) if cuda else None
        for batch in batches:
            rng = np.random.default_rng(0)
            attributes = (rng.random((batch, model.spec.num_attributes)) > 0.5).astype(np.float32)
            noise = rng.standard_normal((batch, model.spec.latent_dim), dtype=np.float32)
            a, z = torch.from_numpy(attributes).to(device), torch.from_numpy(noise).to(device)
            ways = {}

            def sync():
                if cuda:
                    torch.cuda.synchronize()

            def eager():
                with torch.inference_mode():
                    model.generate(a, z)
                sync()

            ways["torch"] = eager
            if compiled is not None:

                def compiled_bf16():
                    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                        compiled(a, z)
                    sync()

                ways["torch_compile_bf16"] = compiled_bf16
            for label, session in sessions.items():
                if cuda:  # IO binding: inputs already on the device, the output stays there
                    binding = session.io_binding()
                    binding.bind_ortvalue_input("attributes", ort.OrtValue.ortvalue_from_numpy(attributes, "cuda", 0))
                    binding.bind_ortvalue_input("noise", ort.OrtValue.ortvalue_from_numpy(noise, "cuda", 0))
                    binding.bind_output("images", "cuda", 0)
                    ways[label] = lambda session=session, binding=binding: (session.run_with_iobinding(binding), binding.synchronize_outputs())
                else:
                    ways[label] = lambda session=session: session.run(["images"], {"attributes": attributes, "noise": noise})
            times = {label: timed(call, args.seconds) for label, call in ways.items()}
            floor = traffic_floor(model.cpu(), batch) * batch / bandwidth  # seconds per call at the floor
            model.to(device)
            best = min(times.values())
            row = {"model": name, "batch": batch, **{f"{k}_ms": v * 1e3 for k, v in times.items()},
                   **{f"{k}_images_per_s": batch / v for k, v in times.items()},
                   "ort_over_torch": times["torch"] / times["ort"], "floor_ms": floor * 1e3, "best_over_floor": best / floor}
            rows.append(row)
            cells = "  ".join(f"{k} {v * 1e3:9.2f} ms ({batch / v:9.1f} img/s)" for k, v in times.items())
            print(f"{name:9} batch {batch:5}: {cells}  ort/torch {row['ort_over_torch']:.2f}x  "
                  f"floor {row['floor_ms']:8.2f} ms (best is {row['best_over_floor']:.1f}x the floor)")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "sample.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "provider": provider, "device": args.device,
                                                 "bandwidth_bytes_per_s": bandwidth, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
