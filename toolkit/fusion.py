"""GroupNorm (+ SiLU) as one kernel on ONNX Runtime's CUDA provider: a rewrite of the graph in
memory, made when a session opens on CUDA (toolkit.sessions); the file on disk stays the portable one.

torch exports `nn.GroupNorm` as standard ops that every runtime runs (CPU, CUDA, TensorRT, the web):

    x [N, C, H, W] -> Reshape [N, G, -1] -> InstanceNormalization (scale 1, bias 0)
      -> Reshape as Shape(x) -> Mul gamma [C, 1, 1] -> Add beta [C, 1, 1] [-> Sigmoid, Mul: SiLU]

On CUDA that is 5-7 memory-bound kernels per norm, each reading and writing the whole activation.
ONNX Runtime has one kernel for all of it, the contrib op com.microsoft.GroupNorm (the kernel its
Stable Diffusion pipelines use; CUDA only, channels-last), which `fuse_group_norm` puts in place
of each match:

    x -> Transpose NCHW->NHWC -> GroupNorm(groups G, epsilon, activation 1 if SiLU) -> Transpose NHWC->NCHW

With the CUDA provider's prefer_nhwc the convolutions around it run channels-last too and ONNX
Runtime's transpose optimizer cancels the Transposes against theirs; without it they are two
copies, still fewer passes than the unfused ops.

Only what the CUDA kernel takes is fused (onnxruntime/contrib_ops/cuda/diffusion, 1.31): channels
per group even and at most 512 (two channels per thread, one group within a block), gamma and beta
as float32 (an fp16 graph's are converted). A norm that does not qualify keeps its standard ops.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

DOMAIN = "com.microsoft"
MAX_CHANNELS_PER_GROUP = 512  # the CUDA kernel's largest block of channels
NCHW_TO_NHWC, NHWC_TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


class _Graph:
    """Who makes and who reads each tensor, and the constants' values."""

    def __init__(self, graph: onnx.GraphProto):
        self.nodes = list(graph.node)  # held: the nodes are told apart by id() below
        self.producer = {name: node for node in self.nodes for name in node.output}
        self.readers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {value.name for value in graph.output}
        self.constants = {init.name: init for init in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def only_reader(self, name: str, op_type: str):
        """The one node that reads `name`, if it is an `op_type` and `name` is no graph output."""
        readers = self.readers.get(name, [])
        if len(readers) == 1 and readers[0].op_type == op_type and name not in self.outputs:
            return readers[0]
        return None

    def made_by(self, name: str, op_type: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None


def _other_input(node, name: str) -> str | None:
    others = [value for value in node.input if value != name]
    return others[0] if len(node.input) == 2 and len(others) == 1 else None


def _per_channel(graph: _Graph, name: str | None) -> np.ndarray | None:
    """A [C, 1, 1] constant's C values (gamma or beta), else None."""
    value = None if name is None else graph.value(name)
    if value is None or value.ndim != 3 or value.shape[1:] != (1, 1):
        return None
    return value.reshape(-1)


def _match(graph: _Graph, norm) -> dict | None:
    """The GroupNorm subgraph around InstanceNormalization `norm`, or None where it is not one that
    the CUDA kernel can take."""
    first = graph.made_by(norm.input[0], "Reshape")
    if first is None or len(norm.input) != 3:
        return None
    scale, bias = graph.value(norm.input[1]), graph.value(norm.input[2])
    shape = graph.value(first.input[1])
    if scale is None or bias is None or shape is None or scale.ndim != 1:
        return None
    groups = scale.shape[0]
    if not (np.all(scale == 1) and np.all(bias == 0) and shape.tolist() == [0, groups, -1]):
        return None
    x = first.input[0]
    back = graph.only_reader(norm.output[0], "Reshape")
    size = back and graph.made_by(back.input[1], "Shape")
    whole_shape = size and all(a.name == "start" and a.i == 0 for a in size.attribute)  # no start > 0, no end
    if not whole_shape or size.input[0] != x or graph.only_reader(first.output[0], "InstanceNormalization") is None:
        return None
    times = graph.only_reader(back.output[0], "Mul")
    gamma = times and _per_channel(graph, _other_input(times, back.output[0]))
    plus = times and gamma is not None and graph.only_reader(times.output[0], "Add")
    beta = plus and _per_channel(graph, _other_input(plus, times.output[0]))
    if beta is None or beta.shape != gamma.shape or gamma.shape[0] % groups:
        return None
    per_group = gamma.shape[0] // groups
    if per_group % 2 or per_group > MAX_CHANNELS_PER_GROUP:
        return None
    epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
    nodes, out = [first, norm, back, times, plus], plus.output[0]
    if graph.readers.get(size.output[0]) == [back]:
        nodes.append(size)
    # SiLU: the Add's output read only by a Sigmoid and by the Mul of it with the Sigmoid's output
    readers = graph.readers.get(out, [])
    sigmoid = next((node for node in readers if node.op_type == "Sigmoid"), None)
    silu = sigmoid and graph.only_reader(sigmoid.output[0], "Mul")
    if (
        silu
        and len(readers) == 2
        and silu in readers
        and sorted(silu.input) == sorted([out, sigmoid.output[0]])
        and out not in graph.outputs
        and sigmoid.output[0] not in graph.outputs
    ):
        nodes += [sigmoid, silu]
        out = silu.output[0]
    else:
        silu = None
    return dict(
        x=x, out=out, nodes=nodes, groups=groups, epsilon=epsilon, gamma=gamma, beta=beta, silu=silu is not None
    )


def fuse_group_norm(model: onnx.ModelProto) -> int:
    """Replace, in place, every GroupNorm (+ SiLU) subgraph of `model` that the CUDA kernel takes
    by com.microsoft.GroupNorm between two Transposes; returns how many were replaced."""
    graph = _Graph(model.graph)
    matches = []
    taken: set[int] = set()
    for norm in graph.nodes:
        if norm.op_type == "InstanceNormalization" and norm.domain in ("", "ai.onnx"):
            found = _match(graph, norm)
            if found and not taken & {id(node) for node in found["nodes"]}:
                taken |= {id(node) for node in found["nodes"]}
                matches.append(found)
    if not matches:
        return 0
    replacements: dict[int, list] = {}
    for index, found in enumerate(matches):
        name = f"cvae_tk_group_norm_{index}"
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(found["gamma"].astype(np.float32), f"{name}_gamma"),
                numpy_helper.from_array(found["beta"].astype(np.float32), f"{name}_beta"),
            ]
        )
        replacements[id(found["nodes"][-1])] = [  # where the last node was: everything it read is made by then
            helper.make_node("Transpose", [found["x"]], [f"{name}_nhwc"], f"{name}_to_nhwc", perm=NCHW_TO_NHWC),
            helper.make_node(
                "GroupNorm",
                [f"{name}_nhwc", f"{name}_gamma", f"{name}_beta"],
                [f"{name}_out"],
                name,
                domain=DOMAIN,
                groups=int(found["groups"]),
                epsilon=float(found["epsilon"]),
                activation=int(found["silu"]),
                channels_last=1,
            ),
            helper.make_node("Transpose", [f"{name}_out"], [found["out"]], f"{name}_to_nchw", perm=NHWC_TO_NCHW),
        ]
    nodes = []
    for node in graph.nodes:
        if id(node) in replacements:
            nodes += replacements[id(node)]
        elif id(node) not in taken:
            kept = onnx.NodeProto()
            kept.CopyFrom(node)  # a copy: the originals go with the clear below
            nodes.append(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    # the removed nodes' constants (shapes, ones and zeros, gamma and beta) that nothing reads now
    read = {name for node in nodes for name in node.input} | graph.outputs
    dropped = {name for node in graph.nodes if id(node) in taken for name in node.input} - read
    kept = [init for init in model.graph.initializer if init.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if not any(entry.domain == DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(matches)


def fused_model(path: str | os.PathLike) -> bytes | None:
    """The model at `path` with its GroupNorms fused (`fuse_group_norm`), serialized; None where
    nothing was fused, or the file is not one to rewrite in memory (not an ONNX model: ONNX Runtime
    says what is wrong when it opens the file itself; weights in external files, which a model
    given as bytes could not find)."""
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # protobuf raises several types for what is not a model
        return None
    if any(uses_external_data(tensor) for tensor in model.graph.initializer):
        return None
    if fuse_group_norm(model) == 0:
        return None
    return model.SerializeToString()
