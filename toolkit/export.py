"""Export a trained run's conditional decoder as a complete ONNX sampler.

    cvae-tk export --onnx runs/digits            -> export/digits.onnx

The graph (the contract that `toolkit.sampler` and any application rely on):
    inputs   attributes  float32 [B, A]  0/1 per attribute, in the order of the metadata's names
             noise       float32 [B, Z]  standard normal, whatever the model's prior: with the learned
                                         prior the graph computes z = mu_p(x) + exp(0.5 logvar_p(x)) * noise
    output   images      float32 [B, 3, H, W] in [0, 1]
B is dynamic. One self-contained file. metadata_props (all strings; JSON where noted):
    cvae_tk.format = "sampler/1", attributes (JSON list), latent_dim, image_size (JSON [H, W]),
    value_range (JSON [0, 1]), recipe, step, beta, arch, prior (standard | learned), toolkit_version.

Parity with PyTorch is checked on ONNX Runtime's CPU provider at batch sizes 1, 3 and 17 before
the file is written: it goes to a temporary name and is renamed only once the check passes.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import toolkit
from toolkit.errors import UserError
from toolkit.model import CVAE, load_model

OPSET = 18
FORMAT = "sampler/1"
PARITY_BATCHES = (1, 3, 17)
PARITY_TOLERANCE = 1e-4


class SamplerGraph(torch.nn.Module):
    """What is exported: (attributes, noise) -> images, sampling z from the model's prior (learned
    prior included) via CVAE.generate."""

    def __init__(self, model: CVAE):
        super().__init__()
        self.model = model

    def forward(self, attributes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.model.generate(attributes, noise)


def metadata(model: CVAE) -> dict[str, str]:
    spec = model.spec
    extra = spec.extra or {}
    return {
        "cvae_tk.format": FORMAT,
        "attributes": json.dumps(list(spec.attributes)),
        "latent_dim": str(spec.latent_dim),
        "image_size": json.dumps(list(spec.image_size)),
        "value_range": json.dumps([0, 1]),
        "arch": spec.arch,
        "prior": spec.prior,
        "recipe": str(extra.get("recipe", "")),
        "step": str(extra.get("step", "")),
        "beta": str(extra.get("beta", "")),
        "toolkit_version": toolkit.__version__,
    }


def to_onnx(model: CVAE, opset: int = OPSET) -> bytes:
    """The serialized ONNX sampler for `model` (metadata included), not yet checked."""
    import onnx

    graph = SamplerGraph(model).eval()
    spec = model.spec
    example = (torch.zeros(2, spec.num_attributes), torch.randn(2, spec.latent_dim))  # batch >= 2: a dynamic dim
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        # torch warns that both inputs' batch axes share one name: that is the intent
        warnings.filterwarnings("ignore", message=".*axis name.*")
        program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            input_names=["attributes", "noise"],
            output_names=["images"],
            dynamic_shapes={"attributes": {0: batch}, "noise": {0: batch}},
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    for key, value in metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "cvae-tk"
    proto.producer_version = toolkit.__version__
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def parity_error(model: CVAE, onnx_bytes: bytes, batch_sizes=PARITY_BATCHES, seed: int = 0) -> float:
    """Max abs difference between ONNX Runtime (CPU provider) and PyTorch over the given batch sizes."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for size in batch_sizes:
        attributes = (torch.rand(size, model.spec.num_attributes, generator=generator) > 0.5).float()
        noise = torch.randn(size, model.spec.latent_dim, generator=generator)
        with torch.no_grad():
            expected = model.generate(attributes, noise).numpy()
        (got,) = session.run(["images"], {"attributes": attributes.numpy(), "noise": noise.numpy()})
        if got.shape != expected.shape:
            raise RuntimeError(f"ONNX output shape {got.shape} != PyTorch {expected.shape} at batch {size}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def export_onnx(run_dir: str | Path, out: str | Path | None = None, opset: int = OPSET) -> tuple[Path, float]:
    """Export `run_dir` to `out` (default export/<run name>.onnx); returns (path written, parity error)."""
    model = load_model(run_dir)
    out = Path(out) if out else Path("export") / f"{Path(run_dir).resolve().name}.onnx"
    onnx_bytes = to_onnx(model, opset)
    error = parity_error(model, onnx_bytes)
    if error >= PARITY_TOLERANCE:
        raise UserError(
            f"export of {run_dir} failed its parity check: max abs difference {error:.3g} against PyTorch "
            f"(limit {PARITY_TOLERANCE:g}, batches {PARITY_BATCHES}); nothing was written"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(onnx_bytes)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out, error
