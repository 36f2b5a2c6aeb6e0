"""toolkit.fusion: the GroupNorm (+ SiLU) subgraphs of an export replaced by ONNX Runtime's CUDA
GroupNorm, for sessions on CUDA. On the CPU: which norms are fused (those the CUDA kernel takes),
that the rewritten graph passes ONNX Runtime's own check of the contrib op's schema, and that it
computes what the unfused graph computes, with the contrib op evaluated from its definition (onnx's
reference evaluator; ONNX Runtime has no CPU kernel for it). The CUDA kernel itself: test_sampler's
GPU tests."""

from __future__ import annotations

import collections
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from toolkit import sessions
from toolkit.contract import preprocessing_dict
from toolkit.export import encoder_to_onnx, to_onnx
from toolkit.fusion import DOMAIN, fuse_group_norm, fused_model
from toolkit.model import CVAE, ModelSpec
from toolkit.sessions import CPU, CUDA, TENSORRT, SessionPlan, open_session, session_plan

LEVELS = 2


class GroupNorm(OpRun):
    """com.microsoft.GroupNorm as ONNX Runtime's contrib op schema defines it: NHWC input, `groups`
    groups of channels normalized over (H, W, channels of the group), gamma and beta per channel,
    then SiLU if activation is 1."""

    op_domain = DOMAIN

    def _run(self, x, gamma, beta, activation=None, channels_last=None, epsilon=None, groups=None):
        assert channels_last == 1
        n, h, w, c = x.shape
        y = x.astype(np.float64).reshape(n, h * w, groups, c // groups)
        y = (y - y.mean(axis=(1, 3), keepdims=True)) / np.sqrt(y.var(axis=(1, 3), keepdims=True) + epsilon)
        y = y.reshape(n, h, w, c) * gamma + beta
        if activation:
            y = y / (1 + np.exp(-y))
        return (y.astype(x.dtype),)


def _model(width: int) -> CVAE:
    spec = ModelSpec(
        attributes=["a", "b", "c"],
        image_size=(16, 16),
        latent_dim=8,
        arch="resnet",
        prior="learned",
        options={"width": width, "levels": LEVELS, "embed_dim": 16},
    )
    torch.manual_seed(0)
    model = CVAE(spec).eval()
    with torch.no_grad():  # trained-like values: no zero residual branches, gamma and beta far from 1 and 0
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1 if parameter.ndim > 1 else 0.5)
    return model


@pytest.fixture(scope="module")
def model() -> CVAE:
    return _model(64)  # channels 64, 128: 32 groups of 2 and of 4 channels


def _feed(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "attributes": (rng.random((batch, 3)) > 0.5).astype(np.float32),
        "noise": rng.standard_normal((batch, 8)).astype(np.float32),
    }


def _fused(data: bytes) -> tuple[onnx.ModelProto, int]:
    proto = onnx.load_from_string(data)
    return proto, fuse_group_norm(proto)


def _ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in proto.graph.node)


def test_every_group_norm_of_the_decoder_is_fused_and_silu_goes_with_it(model):
    data = to_onnx(model)
    before = _ops(onnx.load_from_string(data))
    proto, count = _fused(data)
    onnx.checker.check_model(proto, full_check=True)
    after = _ops(proto)
    norms = 2 * LEVELS + 1  # two per ResBlock, one before the output conv
    assert count == norms == before["InstanceNormalization"]
    assert after["GroupNorm"] == norms and after["InstanceNormalization"] == 0 and after["Transpose"] == 2 * norms
    fused = [node for node in proto.graph.node if node.op_type == "GroupNorm"]
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for node in fused]
    # SiLU follows each block's first norm and the last one; the second is followed by FiLM
    assert sum(a["activation"] for a in attributes) == LEVELS + 1
    assert before["Sigmoid"] - after["Sigmoid"] == LEVELS + 1
    assert all(
        a["groups"] == 32 and a["channels_last"] == 1 and a["epsilon"] == pytest.approx(1e-5) for a in attributes
    )
    assert all(node.domain == DOMAIN for node in fused)
    assert any(entry.domain == DOMAIN for entry in proto.opset_import)
    # what only the removed nodes read is gone too (ONNX Runtime warns about unused initializers)
    read = {name for node in proto.graph.node for name in node.input}
    assert all(init.name in read for init in proto.graph.initializer)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_the_fused_graph_computes_what_the_export_computes(model, fp16):
    data = to_onnx(model, fp16=fp16)
    proto, count = _fused(data)
    assert count == 2 * LEVELS + 1
    unfused = ort.InferenceSession(data, providers=[CPU])
    fused = ReferenceEvaluator(proto, new_ops=[GroupNorm])
    for batch in (1, 3):
        feed = _feed(batch, seed=batch)
        expected = unfused.run(None, feed)[0]
        got = fused.run(None, feed)[0]
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert expected.std() > 0.05  # images that vary, so that a wrong norm would show
        assert np.abs(got - expected).max() < (5e-3 if fp16 else 1e-5)


def test_the_encoder_is_fused_too(model):
    data = encoder_to_onnx(model, preprocessing_dict(None, (16, 16)))
    proto, count = _fused(data)
    assert count == 2 * LEVELS + 1
    rng = np.random.default_rng(0)
    feed = {
        "images": rng.random((2, 3, 16, 16)).astype(np.float32),
        "attributes": (rng.random((2, 3)) > 0.5).astype(np.float32),
    }
    expected = ort.InferenceSession(data, providers=[CPU]).run(None, feed)
    got = ReferenceEvaluator(proto, new_ops=[GroupNorm]).run(None, feed)
    for e, g in zip(expected, got):
        assert np.abs(g - e).max() < 1e-4


def test_norms_the_cuda_kernel_cannot_take_keep_their_standard_ops():
    # width 32: the 32-channel norms have 1 channel per group (the kernel takes 2 per thread), the
    # 64-channel block's two norms have 2 and are fused
    model = _model(32)
    data = to_onnx(model)
    proto, count = _fused(data)
    assert count == 2
    assert _ops(proto)["InstanceNormalization"] == 3
    feed = _feed(2)
    expected = ort.InferenceSession(data, providers=[CPU]).run(None, feed)[0]
    got = ReferenceEvaluator(proto, new_ops=[GroupNorm]).run(None, feed)[0]
    assert np.abs(got - expected).max() < 1e-5


class _NormThenSiLU(torch.nn.Module):
    def __init__(self, also_return_norm: bool):
        super().__init__()
        self.norm = torch.nn.GroupNorm(4, 16)
        self.also_return_norm = also_return_norm
        with torch.no_grad():
            self.norm.weight.normal_(1.0, 0.5)
            self.norm.bias.normal_(0.0, 0.5)

    def forward(self, x):
        normed = self.norm(x)
        out = torch.nn.functional.silu(normed)
        return (out, normed) if self.also_return_norm else out


def _export(module: torch.nn.Module) -> bytes:
    x = torch.randn(2, 16, 6, 6)
    program = torch.onnx.export(
        module.eval(), (x,), dynamo=True, input_names=["x"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    return program.model_proto.SerializeToString()


def test_a_norm_whose_output_is_also_read_elsewhere_keeps_it():
    # the norm's output is a graph output as well as SiLU's input: SiLU cannot go into the kernel
    data = _export(_NormThenSiLU(also_return_norm=True))
    proto, count = _fused(data)
    assert count == 1
    (node,) = [node for node in proto.graph.node if node.op_type == "GroupNorm"]
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "activation")) == 0
    assert _ops(proto)["Sigmoid"] == 1
    feed = {"x": np.random.default_rng(0).standard_normal((3, 16, 6, 6)).astype(np.float32)}
    expected = ort.InferenceSession(data, providers=[CPU]).run(None, feed)
    got = ReferenceEvaluator(proto, new_ops=[GroupNorm]).run(None, feed)
    assert len(got) == 2 and all(np.abs(g - e).max() < 1e-5 for e, g in zip(expected, got))
    single, count = _fused(_export(_NormThenSiLU(also_return_norm=False)))
    assert count == 1 and _ops(single)["Sigmoid"] == 0


def test_onnx_runtime_accepts_the_contrib_ops_schema(model):
    # ONNX Runtime checks every node against its schema before it looks for kernels: on the CPU
    # the fused graph gets as far as "no CPU kernel for com.microsoft.GroupNorm", so inputs, types
    # and attributes are as the CUDA kernel's schema wants them
    for fp16 in (False, True):
        proto, _ = _fused(to_onnx(model, fp16=fp16))
        with pytest.raises(Exception, match=r"NOT_IMPLEMENTED.*GroupNorm"):
            ort.InferenceSession(proto.SerializeToString(), providers=[CPU])
        for node in proto.graph.node:  # without its required attributes: refused before kernels
            if node.op_type == "GroupNorm":
                del node.attribute[:]
        with pytest.raises(Exception, match=r"INVALID_GRAPH"):
            ort.InferenceSession(proto.SerializeToString(), providers=[CPU])


def test_fused_model_is_none_where_there_is_nothing_to_rewrite(model, exported, tmp_path):
    assert fused_model(exported) is None  # the digits recipe's paper decoder has no GroupNorm
    for name, content in {"empty": b"", "text": b"not a model\n"}.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(content)
        assert fused_model(path) is None, name
    assert fused_model(tmp_path / "missing.onnx") is None
    resnet = tmp_path / "resnet.onnx"
    resnet.write_bytes(to_onnx(model))
    assert onnx.load_from_string(fused_model(resnet)).graph.node  # bytes of the fused graph
    external = tmp_path / "external" / "resnet.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(str(resnet)), str(external), save_as_external_data=True, size_threshold=0)
    assert fused_model(external) is None  # a model given as bytes could not find its weights' file


def test_cuda_plans_fuse_and_tensorrt_and_cpu_plans_do_not(exported, monkeypatch):
    assert session_plan(exported, "cpu").fuse_group_norm is False
    monkeypatch.setattr(sessions, "wants_cuda", lambda device: True)
    assert session_plan(exported, "cuda").fuse_group_norm is True
    assert session_plan(exported, "auto", graph_batch=4).fuse_group_norm is True
    assert session_plan(exported, "tensorrt").fuse_group_norm is False
    assert session_plan(exported, "tensorrt").providers[0][0] == TENSORRT


def test_a_fused_graph_that_does_not_load_falls_back_to_the_file_with_a_warning(model, tmp_path):
    # On this machine the CPU provider stands in for a CUDA that lacks the kernel: the session must
    # still open, on the file as it is, and say why it is slower
    path = tmp_path / "resnet.onnx"
    path.write_bytes(to_onnx(model))
    plan = SessionPlan([CPU], fuse_group_norm=True)
    with pytest.warns(RuntimeWarning, match="GroupNorm fusion for CUDA did not load.*unfused graph"):
        session = open_session(path, "cpu", plan)
    feed = _feed(2)
    expected = ort.InferenceSession(str(path), providers=[CPU]).run(None, feed)[0]
    assert np.array_equal(session.run(None, feed)[0], expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU's own plan: nothing fused, nothing to warn about
        open_session(path, "cpu", session_plan(path, "cpu"))


def test_the_cuda_session_is_given_the_fused_graph(model, tmp_path, monkeypatch):
    path = tmp_path / "resnet.onnx"
    path.write_bytes(to_onnx(model))
    given = []

    class Recording:
        def __init__(self, what, options=None, providers=None, **kwargs):
            given.append((what, providers))

        def get_providers(self):
            return [CUDA, CPU]

        def disable_fallback(self):
            pass

    monkeypatch.setattr(sessions.ort, "InferenceSession", Recording)
    monkeypatch.setattr(sessions, "wants_cuda", lambda device: True)
    monkeypatch.setattr(sessions, "cuda_device_present", lambda: True)
    open_session(path, "cuda", session_plan(path, "cuda"))
    ((what, providers),) = given
    assert isinstance(what, bytes) and providers[0][0] == CUDA
    assert _ops(onnx.load_from_string(what))["GroupNorm"] == 2 * LEVELS + 1
    assert path.read_bytes() == to_onnx(model)  # the file is not changed


@pytest.mark.skipif("not __import__('toolkit.sessions').sessions.cuda_device_present()", reason="needs a GPU")
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_on_cuda_the_fused_kernel_gives_the_cpu_images(model, tmp_path, fp16):
    from toolkit.sampler import Sampler

    path = tmp_path / "resnet.onnx"
    path.write_bytes(to_onnx(model, fp16=fp16))
    try:
        ort.InferenceSession(to_onnx(model), providers=[CUDA])
    except Exception:
        pytest.skip("ONNX Runtime cannot use CUDA here")
    attributes = np.eye(3, dtype=np.float32)
    expected = Sampler(path, device="cpu").sample(attributes, n=15, seed=2)  # the unfused graph
    for cuda_graph in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the fused graph loads: no fallback
            cuda = Sampler(path, device="cuda", batch_size=64, cuda_graph=cuda_graph)
        got = cuda.sample(attributes, n=15, seed=2)  # 45 rows: more than the old kernel's 32
        difference = np.abs(got.astype(int) - expected)
        assert difference.max() <= (3 if fp16 else 1), (cuda_graph, difference.max())
