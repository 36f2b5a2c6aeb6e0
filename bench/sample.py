"""Benchmark: sampling speed of the exported decoders, ONNX Runtime vs PyTorch eager, same weights.

For the `celeba` decoder (paper, 218x178, 40 attributes) and the `celeba64` decoder (resnet 64x64,
learned prior), at batch sizes 1, 64 and 1024: latency per call and images/s for
  torch   PyTorch eager fp32 (`model.generate` under inference_mode)
  ort     ONNX Runtime fp32 (the exported sampler graph)
and on the CPU also
  ort_int8  ONNX Runtime int8: the fp32 export quantized as `cvae-tk export --int8` does
            (toolkit.quantize: static QDQ, int8 per-channel weights, uint8 activations), calibrated on
            random 0/1 attributes and prior noise (the weights are random too); `int8_over_fp32` is
            the fp32 time over the int8 time (same inputs, same run), and the int8 images' distance
            from the fp32 ones is printed in grey levels
and on a GPU (--device cuda, the default where torch sees one) also
  torch_compile_bf16   torch.compile of `generate` under bf16 autocast
  ort / ort_fp16       ONNX Runtime CUDA, fp32 and --fp16 exports, IO binding (inputs on the
                       device, the output left there)
  ort_graph / ort_fp16_graph   the same, recorded once as a CUDA graph and replayed (fixed batch,
                       as `Sampler(..., cuda_graph=True)` runs it)
  *_nhwc_graph         the same with the CUDA provider's prefer_nhwc (channels-last convolutions)
  ort_fused / ort_fp16_fused (and their _graph, _nhwc_graph)   the same exports with each GroupNorm
                       (+ SiLU) as ONNX Runtime's one CUDA kernel (toolkit.fusion), as the Sampler
                       opens them on CUDA; only for decoders that have GroupNorms (celeba64)
  ort_subpixel / ort_fp16_subpixel (and their _graph, _nhwc_graph)   an experiment: the exports
                       with each non-overlapping ConvTranspose as 1x1 Conv + DepthToSpace
                       (`subpixel` below; the paper decoder's two), their images' distance from
                       the plain export's printed; not what the Sampler runs
  ort_trt_fp16         ONNX Runtime's TensorRT provider, fp16, one engine per batch size, IO binding
                       (as `Sampler(..., device="tensorrt")`; reported unavailable without the
                       TensorRT 10 libraries: pip install 'cvae-tk[tensorrt]')
and the memory-traffic floor: the bytes each layer must read and write per image (activations in
and out, plus the weights shared by the batch), divided by the measured copy bandwidth (on a GPU:
a device-to-device copy). `floor16` is the same for 16-bit activations and weights, the floor of
the fp16 / bf16 paths.
Weights are random (speed does not depend on training). Writes bench/results/sample.json.

    .venv/bin/python bench/sample.py [--batches 1,64,1024] [--models celeba,celeba64] [--seconds 2] [--device cuda] [--bandwidth GB/s] [--calibration 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit import quantize  # noqa: E402
from toolkit.export import to_onnx  # noqa: E402
from toolkit.fusion import fuse_group_norm  # noqa: E402
from toolkit.model import CVAE, ModelSpec, arch_options  # noqa: E402

MODELS = {
    "celeba": dict(attributes=40, image_size=(218, 178), arch="paper", prior="standard", options={}),
    "celeba64": dict(
        attributes=40,
        image_size=(64, 64),
        arch="resnet",
        prior="learned",
        options={"width": 64, "levels": 4, "embed_dim": 128},
    ),
}


def build(name: str) -> CVAE:
    cfg = MODELS[name]
    torch.manual_seed(0)
    options = arch_options(cfg["arch"], cfg["options"]) if cfg["options"] else {}
    spec = ModelSpec(
        [f"a{i}" for i in range(cfg["attributes"])],
        cfg["image_size"],
        128,
        cfg["arch"],
        prior=cfg["prior"],
        options=options,
    )
    return CVAE(spec).eval()


def subpixel(model: onnx.ModelProto) -> int:
    """An experiment for the paper decoder (not in the Sampler until a GPU says it pays): rewrite,
    in place, each ConvTranspose whose kernel equals its stride (no overlap: 2x2, stride 2) as the
    same arithmetic in two standard ops, a 1x1 Conv to Cout*k*k channels ordered (co, row, col)
    and DepthToSpace(k, CRD), the sub-pixel form that runs as a plain GEMM where cuDNN's
    transposed convolutions were the paper decoder's gap to its memory floor. Exact (max difference
    0 on the CPU provider, fp32 and fp16); on the CPU it is slower (0.6x at batch 64). Returns how
    many were rewritten."""
    constants = {init.name: init for init in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = constants.get(node.input[1]) if node.op_type == "ConvTranspose" else None
        if weight is not None:
            w = onnx.numpy_helper.to_array(weight)
            cin, cout, kh, kw = w.shape
            plain = (
                kh == kw
                and list(attributes.get("strides", [1, 1])) == [kh, kw]
                and not any(attributes.get("pads", [0])) and not any(attributes.get("output_padding", [0]))
                and attributes.get("group", 1) == 1 and "output_shape" not in attributes
                and list(attributes.get("dilations", [1, 1])) == [1, 1]
            )  # fmt: skip
            bias = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if plain and (len(node.input) < 3 or not node.input[2] or bias is not None):
                name = f"subpixel_{count}"
                count += 1
                inputs = [node.input[0], f"{name}_w"]
                model.graph.initializer.append(
                    onnx.numpy_helper.from_array(
                        np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(cout * kh * kw, cin, 1, 1)), f"{name}_w"
                    )
                )
                if bias is not None:
                    b = np.repeat(onnx.numpy_helper.to_array(bias), kh * kw)
                    model.graph.initializer.append(onnx.numpy_helper.from_array(b, f"{name}_b"))
                    inputs.append(f"{name}_b")
                nodes += [
                    onnx.helper.make_node("Conv", inputs, [f"{name}_y"], name, kernel_shape=[1, 1]),
                    onnx.helper.make_node(
                        "DepthToSpace", [f"{name}_y"], [node.output[0]], f"{name}_d2s", blocksize=kh, mode="CRD"
                    ),
                ]
                continue
        nodes.append(node)
    read = {name for node in nodes for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in read]
    del model.graph.node[:], model.graph.initializer[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(kept)
    return count


def timed(call, seconds: float) -> float:
    """Median seconds per call: one warm-up, then calls until `seconds` have passed (at least 3)."""
    call()
    times = []
    while len(times) < 3 or sum(times) < seconds:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def traffic_floor(model: CVAE, batch: int, bytes_per_value: int = 4) -> float:
    """Bytes per image that the decoder's layers must read and write at this batch size."""
    activations = 0
    hooks = []

    def count(module, inputs, output):
        nonlocal activations
        tensors = [t for t in inputs if torch.is_tensor(t)] + ([output] if torch.is_tensor(output) else [])
        activations += sum(
            t.numel() * (bytes_per_value if t.is_floating_point() else t.element_size()) for t in tensors
        )

    parts = [model.decoder] + ([model.prior_net] if getattr(model, "prior_net", None) is not None else [])
    for part in parts:
        for module in part.modules():
            if len(list(module.children())) == 0:
                hooks.append(module.register_forward_hook(count))
    with torch.inference_mode():
        model.generate(torch.zeros(1, model.spec.num_attributes), torch.zeros(1, model.spec.latent_dim))
    for hook in hooks:
        hook.remove()
    weights = sum(p.numel() * bytes_per_value for part in parts for p in part.parameters())
    return activations + weights / batch


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large memory copy (read + write), the best a memory-bound layer can do here."""
    if device == "cuda":
        source = torch.ones(512 * 2**20, dtype=torch.float32, device="cuda")  # 2 GiB, far beyond L2
        target = torch.empty_like(source)

        def copy():
            target.copy_(source)
            torch.cuda.synchronize()

        seconds = timed(copy, 1.0)
        del source, target
        return 2 * 512 * 2**20 * 4 / seconds
    source = np.ones(64 * 2**20, dtype=np.float32)  # 256 MiB
    target = np.empty_like(source)
    seconds = timed(lambda: np.copyto(target, source), 1.0)
    return 2 * source.nbytes / seconds


def tensorrt_session(onnx_bytes: bytes, batch: int, attributes: np.ndarray, noise: np.ndarray, cache: Path):
    """A TensorRT fp16 session for one batch size (its engine built before timing) and its bound
    buffers: returns the call to time. Raises where ONNX Runtime cannot run TensorRT."""
    from toolkit.sessions import preload_tensorrt, tensorrt_options

    preload_tensorrt()
    cache.mkdir(parents=True, exist_ok=True)
    options = tensorrt_options({}, batch, cache)  # what Sampler(device="tensorrt") asks for; one batch size here
    session = ort.InferenceSession(
        onnx_bytes, providers=[("TensorrtExecutionProvider", options), "CUDAExecutionProvider"]
    )
    if session.get_providers()[0] != "TensorrtExecutionProvider":
        raise RuntimeError(f"TensorRT did not load (providers {session.get_providers()})")
    binding = session.io_binding()
    binding.bind_ortvalue_input("attributes", ort.OrtValue.ortvalue_from_numpy(attributes, "cuda", 0))
    binding.bind_ortvalue_input("noise", ort.OrtValue.ortvalue_from_numpy(noise, "cuda", 0))
    binding.bind_output("images", "cuda", 0)

    def call():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    started = time.perf_counter()
    call()  # builds the engine for this shape
    print(f"  (TensorRT engine for batch {batch}: {time.perf_counter() - started:.1f} s)")
    return call


def graph_session(onnx_bytes: bytes, batch: int, attributes: np.ndarray, noise: np.ndarray, **cuda_options):
    """A CUDA-graph session for one batch size and its bound buffers: returns the call to time."""
    options = ort.SessionOptions()
    options.add_free_dimension_override_by_name("batch", batch)
    cuda_options = {"enable_cuda_graph": "1", **cuda_options}
    session = ort.InferenceSession(onnx_bytes, options, providers=[("CUDAExecutionProvider", cuda_options)])
    binding = session.io_binding()
    inputs = {
        "attributes": ort.OrtValue.ortvalue_from_numpy(attributes, "cuda", 0),
        "noise": ort.OrtValue.ortvalue_from_numpy(noise, "cuda", 0),
    }
    for name, value in inputs.items():
        binding.bind_ortvalue_input(name, value)
    output = ort.OrtValue.ortvalue_from_shape_and_type(
        [batch, *session.get_outputs()[0].shape[1:]], np.float32, "cuda", 0
    )
    binding.bind_ortvalue_output("images", output)

    def call():
        session.run_with_iobinding(binding)  # the first calls record the graph, later ones replay it
        binding.synchronize_outputs()

    call._keep = (session, inputs, output)  # the graph reads and writes these buffers
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,64,1024")
    parser.add_argument("--models", default="celeba,celeba64")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--calibration", type=int, default=128, help="calibration samples of the int8 export (CPU only)"
    )
    parser.add_argument(
        "--bandwidth", type=float, help="memory bandwidth in GB/s for the floor (default: measured host copy)"
    )
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cuda = args.device == "cuda"
    # The floor uses the measured copy bandwidth of the device that runs the decoder (or --bandwidth).
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else copy_bandwidth(args.device)
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"{gpu}; bandwidth: {bandwidth / 1e9:.1f} GB/s; ONNX Runtime {ort.__version__} provider: {provider}; "
        f"torch {torch.__version__}, threads: {torch.get_num_threads()}",
        flush=True,
    )
    device = torch.device(args.device)
    rows = []
    for name in args.models.split(","):
        model = build(name)
        exports = {"ort": to_onnx(model)}
        sessions = {"ort": ort.InferenceSession(exports["ort"], providers=[provider])}
        if not cuda:  # int8 QDQ is a CPU format here
            calibration_attributes = (
                np.random.default_rng(0).random((args.calibration, model.spec.num_attributes)) > 0.5
            ).astype(np.float32)
            names = ["attributes", "noise"]
            started = time.perf_counter()
            exports["ort_int8"] = quantize.quantize_bytes(
                exports["ort"],
                quantize.feeds(names, calibration_attributes, model.spec.latent_dim, quantize.CALIBRATION_BATCH, 0),
            )
            sessions["ort_int8"] = ort.InferenceSession(exports["ort_int8"], providers=[provider])
            levels = quantize.parity_levels(exports["ort"], exports["ort_int8"], calibration_attributes)
            print(
                f"{name}: int8 quantized in {time.perf_counter() - started:.1f} s; grey levels from fp32: {quantize.describe(levels)}",
                flush=True,
            )
        if cuda:
            exports["ort_fp16"] = to_onnx(model, fp16=True)
            for label in ("ort", "ort_fp16"):  # GroupNorm (+ SiLU) as one kernel, as the Sampler opens it on CUDA
                proto = onnx.load_from_string(exports[label])
                if fuse_group_norm(proto):
                    exports[f"{label}_fused"] = proto.SerializeToString()
                proto = onnx.load_from_string(exports[label])
                if subpixel(proto):  # the paper decoder's transposed convolutions as Conv + DepthToSpace
                    exports[f"{label}_subpixel"] = proto.SerializeToString()
            for label in list(exports):
                try:
                    sessions.setdefault(label, ort.InferenceSession(exports[label], providers=[provider]))
                except Exception as error:  # report and go on: the other ways still count
                    print(f"{label} unavailable: {' '.join(str(error).split())[:300]}")
                    del exports[label]
            assert all(s.get_providers()[0] == provider for s in sessions.values()), "ONNX Runtime fell back from CUDA"
            probe = {  # the rewritten graphs must give the plain export's images
                "attributes": (np.random.default_rng(1).random((8, model.spec.num_attributes)) > 0.5).astype(
                    np.float32
                ),
                "noise": np.random.default_rng(2).standard_normal((8, model.spec.latent_dim), dtype=np.float32),
            }
            for label in [label for label in sessions if label.endswith(("_fused", "_subpixel"))]:
                plain = sessions[label.rsplit("_", 1)[0]].run(["images"], probe)[0].astype(np.float32)
                got = sessions[label].run(["images"], probe)[0].astype(np.float32)
                print(f"{name}: {label} within {np.abs(got - plain).max() * 255:.2f} grey levels of its plain export")
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
                    ways[label] = lambda session=session, binding=binding: (
                        session.run_with_iobinding(binding),
                        binding.synchronize_outputs(),
                    )
                else:
                    ways[label] = lambda session=session: session.run(
                        ["images"], {"attributes": attributes, "noise": noise}
                    )
            if cuda:
                for label in list(exports):
                    # prefer_nhwc: convolutions in channels-last layout, which tensor cores want
                    for suffix, extra in (("_graph", {}), ("_nhwc_graph", {"prefer_nhwc": "1"})):
                        try:
                            ways[f"{label}{suffix}"] = graph_session(exports[label], batch, attributes, noise, **extra)
                        except Exception as error:  # report and go on: the other ways still count
                            print(f"{label}{suffix} unavailable: {str(error).splitlines()[0][:300]}")
                try:
                    cache = Path(tempfile.gettempdir()) / f"cvae-bench-trt-{os.getpid()}" / f"{name}-{batch}"
                    ways["ort_trt_fp16"] = tensorrt_session(exports["ort"], batch, attributes, noise, cache)
                except Exception as error:
                    print(f"ort_trt_fp16 unavailable: {' '.join(str(error).split())[:300]}")
            times = {}
            for label, call in ways.items():
                started = time.perf_counter()
                try:
                    times[label] = timed(call, args.seconds)
                except Exception as error:  # one broken way (a compiler missing, say) must not hide the others
                    print(f"  {label} failed: {' '.join(str(error).split())[:300]}")
                    continue
                if label.startswith("torch_compile"):
                    print(f"  ({label} warm-up and timing took {time.perf_counter() - started:.1f} s)")
            floor = traffic_floor(model.cpu(), batch) * batch / bandwidth  # seconds per call at the floor
            floor16 = traffic_floor(model, batch, 2) * batch / bandwidth
            model.to(device)
            best_label = min(times, key=times.get)
            best = times[best_label]
            low_precision = "fp16" in best_label or "bf16" in best_label
            row = {
                "model": name,
                "batch": batch,
                **{f"{k}_ms": v * 1e3 for k, v in times.items()},
                **{f"{k}_images_per_s": batch / v for k, v in times.items()},
                "ort_over_torch": times.get("torch", float("nan")) / times.get("ort", float("nan")),
                **(
                    {"int8_over_fp32": times["ort"] / times["ort_int8"]}
                    if "ort_int8" in times and "ort" in times
                    else {}
                ),
                "floor_ms": floor * 1e3,
                "floor16_ms": floor16 * 1e3,
                "best": best_label,
                "best_over_floor": best / (floor16 if low_precision else floor),
            }
            rows.append(row)
            cells = "  ".join(f"{k} {v * 1e3:9.2f} ms ({batch / v:9.1f} img/s)" for k, v in times.items())
            int8 = f"int8/fp32 speed-up {row['int8_over_fp32']:.2f}x  " if "int8_over_fp32" in row else ""
            print(
                f"{name:9} batch {batch:5}: {cells}  ort/torch {row['ort_over_torch']:.2f}x  {int8}"
                f"floor {row['floor_ms']:8.3f} ms, floor16 {row['floor16_ms']:8.3f} ms "
                f"(best, {best_label}, is {row['best_over_floor']:.1f}x its floor)",
                flush=True,
            )
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "sample.json").write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "provider": provider,
                "device": gpu,
                "bandwidth_bytes_per_s": bandwidth,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
