"""Costs read from an ONNX graph at batch 1: MACs and parameters per layer, and peak activation memory.

Written here rather than taken from a library: the counters on PyPI (onnx-tool, onnx_opcounter) either
pin old onnx releases or skip QDQ graphs, where weights reach a Conv through DequantizeLinear.
"""

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from pipeline.errors import InputError

COMPUTE_OPS = {"Conv", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"}
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass(frozen=True)
class OnnxLayerCost:
    name: str
    op: str
    macs: int
    params: int


@dataclass(frozen=True)
class OnnxCost:
    layers: tuple[OnnxLayerCost, ...]
    macs: int
    params: int
    peak_activation_bytes: int


def load(path: str | os.PathLike) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise InputError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from exc
    return model


def _batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    for value in model.graph.value_info:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param"):
            dims[0].dim_value = 1
    return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    shapes = {}
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim)
        shapes[value.name] = (dims, t.elem_type)
    return shapes


def onnx_cost(path: str | os.PathLike) -> OnnxCost:
    model = _batch_one(load(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    shapes = _shapes(model)
    producers = {out: node for node in graph.node for out in node.output}

    def weight_elements(name: str) -> tuple[tuple[int, ...], int]:
        """Shape and element count of a weight, looking through DequantizeLinear to its initializer."""
        if name in inits:
            dims = tuple(inits[name].dims)
            return dims, int(np.prod(dims)) if dims else 1
        node = producers.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in inits:
            return weight_elements(node.input[0])
        dims = shapes.get(name, ((), 0))[0]
        return dims, 0  # computed at run time: no stored parameters

    layers = []
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        out_dims = shapes.get(node.output[0], ((), 0))[0]
        weight_index = 3 if node.op_type.startswith("QLinear") else 1
        w_dims, w_count = weight_elements(node.input[weight_index])
        bias_index = {"Conv": 2, "Gemm": 2, "QLinearConv": 8}.get(node.op_type)
        b_count = weight_elements(node.input[bias_index])[1] if bias_index is not None and len(node.input) > bias_index and node.input[bias_index] else 0
        out_elements = int(np.prod(out_dims)) if out_dims else 0
        if "Conv" in node.op_type:
            macs = out_elements * int(np.prod(w_dims[1:]))
        else:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            k = w_dims[1] if (node.op_type == "Gemm" and trans_b) else w_dims[0]
            macs = out_elements * int(k)
        layers.append(OnnxLayerCost(node.name or node.output[0], node.op_type, macs, w_count + b_count))
    stored = sum(int(np.prod(i.dims)) for i in graph.initializer
                 if i.data_type in (TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32,
                                    TensorProto.FLOAT16) and np.prod(i.dims) > 1 and not _is_quant_param(i.name, graph))
    return OnnxCost(tuple(layers), sum(layer.macs for layer in layers), stored,
                    _peak_activation_bytes(graph, shapes, set(inits)))


def _is_quant_param(name: str, graph: onnx.GraphProto) -> bool:
    """Scales and zero points of Q/DQ nodes are bookkeeping, not weights."""
    return any(node.op_type in QUANT_OPS and name in node.input[1:] for node in graph.node)


def _peak_activation_bytes(graph: onnx.GraphProto, shapes: dict, constants: set[str]) -> int:
    """Largest total size of tensors alive at once, running nodes in graph order (already topological).

    A QDQ graph is first seen as the runtime fuses it: a DequantizeLinear output is its int8 input, and a
    float tensor read only by one QuantizeLinear is that Q's int8 output, so only quantized tensors count.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    alias = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            alias[node.output[0]] = node.input[0]
        elif node.op_type == "QuantizeLinear" and len(consumers.get(node.input[0], [])) == 1:
            alias[node.input[0]] = node.output[0]

    def canonical(name: str) -> str:
        seen = set()
        while name in alias and name not in seen:
            seen.add(name)
            name = alias[name]
        return name

    def size(name: str) -> int:
        dims, elem_type = shapes.get(name, ((), 0))
        if not elem_type or name in constants:
            return 0
        return int(np.prod(dims)) * helper.tensor_dtype_to_np_dtype(elem_type).itemsize

    steps = [([canonical(i) for i in node.input if i], [canonical(o) for o in node.output if o])
             for node in graph.node if node.op_type not in QUANT_OPS]
    last_use = {}
    for step, (inputs, _) in enumerate(steps):
        for name in inputs:
            last_use[name] = step
    for value in graph.output:
        last_use[canonical(value.name)] = len(steps)
    alive = {canonical(v.name) for v in graph.input if v.name not in constants}
    peak = sum(size(n) for n in alive)
    for step, (_, outputs) in enumerate(steps):
        alive |= set(outputs)
        peak = max(peak, sum(size(n) for n in alive))
        alive = {n for n in alive if last_use.get(n, -1) > step}
    return peak
