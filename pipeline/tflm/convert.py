"""The TFLite conversion stage: a quantized (QDQ, int8 activations) ONNX graph to a full-int8 .tflite.

The ONNX Runtime model and the TFLite model share one calibration: every scale and zero point here is
read from the QDQ graph. NCHW becomes NHWC at conversion time (weights transposed, axes remapped, the
flatten before a fully connected layer folded into its weight columns), so no transpose is left.
"""

import os
from pathlib import Path

import numpy as np
import onnx
from ai_edge_litert import schema_py_generated as tfl
from onnx import numpy_helper

from pipeline.errors import StageError
from pipeline.onnx.cost import _batch_one, load
from pipeline.tflm.flatbuffer import FlatGraph, Quant
from pipeline.tflm.ops import CONVERTERS
from pipeline.util import write_bytes

OPS = tfl.BuiltinOperator
QDQ = {"QuantizeLinear", "DequantizeLinear"}
NHWC = (0, 2, 3, 1)


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Onnx:
    """Read-only views of the QDQ graph: constants, aliases through Q/DQ, and quantization of each tensor."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for node in g.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.shapes = {}
        for v in list(g.input) + list(g.output) + list(g.value_info):
            self.shapes[v.name] = tuple(d.dim_value or 1 for d in v.type.tensor_type.shape.dim)

    def readers(self, name: str) -> list:
        """The compute nodes that read a tensor, looking through its Q/DQ pairs."""
        found = []
        for node in self.consumers.get(name, []):
            found += self.readers(node.output[0]) if node.op_type in QDQ else [node]
        return found

    def canonical(self, name: str) -> str:
        """A Q output or DQ output of an activation stands for the float tensor it quantizes."""
        node = self.producer.get(name)
        while node is not None and node.op_type in QDQ and node.input[0] not in self.consts:
            name = node.input[0]
            node = self.producer.get(name)
        return name

    def weight(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
        """(quantized values, scale, zero point, axis) of a constant reached through DequantizeLinear."""
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in self.consts:
            return None
        zp = self.consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(1, np.int8)
        return self.consts[node.input[0]], np.atleast_1d(self.consts[node.input[1]]), np.atleast_1d(zp), _attrs(node).get("axis", 1)

    def real(self, name: str) -> np.ndarray:
        """A constant's real value, dequantized when it comes through DequantizeLinear."""
        w = self.weight(name)
        if w is None:
            if name not in self.consts:
                raise StageError(f"{name!r} is computed at run time; expected a constant")
            return self.consts[name].astype(np.float64)
        values, scale, zp, axis = w
        shape = [1] * values.ndim
        if scale.size > 1:
            shape[axis] = -1
        return (values.astype(np.float64) - zp.reshape(shape)) * scale.reshape(shape)

    def quant(self, name: str) -> Quant:
        """Scale and zero point of an activation: its QuantizeLinear, or the one after a reshape of it."""
        for node in self.consumers.get(name, []):
            if node.op_type == "QuantizeLinear":
                zp = self.consts.get(node.input[2]) if len(node.input) > 2 else None
                if zp is None or zp.dtype != np.int8:
                    raise StageError(f"Tensor {name!r} is quantized to {zp.dtype if zp is not None else 'uint8'}; "
                                     "TFLite Micro needs int8 activations (activation_type = \"int8\" in the profile)")
                return Quant(tuple(np.atleast_1d(self.consts[node.input[1]]).astype(float)), tuple(np.atleast_1d(zp).astype(int)))
        users = self.consumers.get(name, [])
        if len(users) == 1 and users[0].op_type in ("Reshape", "Flatten", "Relu"):
            return self.quant(users[0].output[0])
        raise StageError(f"Tensor {name!r} has no quantization parameters; expected a fully quantized QDQ graph")


def _same_padding(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


class _Converter:
    def __init__(self, model: onnx.ModelProto):
        self.src = _Onnx(model)
        self.out = FlatGraph()
        self.index: dict[str, int] = {}  # canonical ONNX tensor -> TFLite tensor
        self.flattened: dict[str, tuple[int, int, int]] = {}  # 2D tensor flattened from NHWC (C, H, W)
        self.producer_op: dict[str, object] = {}

    # ---- tensors ----
    def shape(self, name: str) -> tuple[int, ...]:
        return self.src.shapes[name]

    def tfl_shape(self, name: str) -> list[int]:
        shape = self.shape(name)
        return [shape[i] for i in NHWC] if len(shape) == 4 else list(shape)

    def tensor(self, name: str) -> int:
        name = self.src.canonical(name)
        if name not in self.index:
            self.index[name] = self.out.activation(name, self.tfl_shape(name), self.src.quant(name))
        return self.index[name]

    def quant_of(self, name: str) -> Quant:
        return self.src.quant(self.src.canonical(name))

    def require_same_quant(self, node, a: str, b: str) -> None:
        if not self.quant_of(a).same_as(self.quant_of(b)):
            raise StageError(f"Node {node.name!r} ({node.op_type}) changes scale or zero point; TFLite's "
                             f"{node.op_type} needs equal input and output quantization")

    def emit(self, node, code, inputs, options_type=0, options=None):
        out_name = self.src.canonical(node.output[0])
        op = self.out.op(code, inputs, [self.tensor(node.output[0])], options_type, options)
        self.producer_op[out_name] = op
        return op

    # ---- operators ----
    def explicit_pad(self, name: str, pads: list[int]) -> int:
        """A PAD op for ONNX pads that SAME/VALID cannot express; pads with the zero point (real 0)."""
        top, left, bottom, right = pads
        shape = self.tfl_shape(name)
        padded = [shape[0], shape[1] + top + bottom, shape[2] + left + right, shape[3]]
        out = self.out.activation(f"{name}_padded", padded, self.quant_of(name))
        paddings = self.out.constant(f"{name}_paddings", np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32))
        self.out.op(OPS.PAD, [self.tensor(name), paddings], [out], tfl.BuiltinOptions.PadOptions, tfl.PadOptionsT())
        return out

    def spatial_input(self, node, name: str, kernel, strides, dilations, pads) -> tuple[int, int]:
        """The input tensor and TFLite padding mode, with a PAD op in front when needed."""
        if not any(pads):
            return self.tensor(name), tfl.Padding.VALID
        _, _, h, w = self.shape(name)
        same = [*_same_padding(h, kernel[0], strides[0], dilations[0]), *_same_padding(w, kernel[1], strides[1], dilations[1])]
        if [pads[0], pads[2], pads[1], pads[3]] == same:
            return self.tensor(name), tfl.Padding.SAME
        if node.op_type != "Conv":
            raise StageError(f"Node {node.name!r} ({node.op_type}) pads {pads} that SAME cannot express; only convs "
                             "take an explicit PAD")
        return self.explicit_pad(name, pads), tfl.Padding.VALID

    def conv(self, node):
        a = _attrs(node)
        x = node.input[0]
        w = self.src.weight(node.input[1])
        if w is None:
            raise StageError(f"Node {node.name!r} (Conv) has no int8 weight constant; expected a QDQ-quantized graph")
        values, w_scale, w_zp, _ = w
        if np.any(w_zp != 0) or values.dtype != np.int8:
            raise StageError(f"Node {node.name!r} (Conv): weights {values.dtype} with zero point {w_zp.max()}; "
                             "TFLite needs symmetric int8 weights")
        cout, cin_g, kh, kw = values.shape
        group, cin = a.get("group", 1), self.shape(x)[1]
        strides, dilations = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
        pads = a.get("pads", [0, 0, 0, 0])
        w_scale = np.broadcast_to(w_scale, (cout,)).astype(np.float64)
        x_scale = self.quant_of(x).scale[0]
        bias = self.src.real(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(cout)
        bias_q = np.round(bias / (x_scale * w_scale)).astype(np.int32)
        inp, padding = self.spatial_input(node, x, (kh, kw), strides, dilations, pads)
        if group == 1:
            weights = values.transpose(0, 2, 3, 1)
            code, qdim = OPS.CONV_2D, 0
            options = tfl.Conv2DOptionsT()
            options_type = tfl.BuiltinOptions.Conv2DOptions
        elif group == cin and cin_g == 1:
            weights = values.transpose(1, 2, 3, 0)
            code, qdim = OPS.DEPTHWISE_CONV_2D, 3
            options = tfl.DepthwiseConv2DOptionsT()
            options.depthMultiplier = cout // cin
            options_type = tfl.BuiltinOptions.DepthwiseConv2DOptions
        else:
            raise StageError(f"Node {node.name!r} (Conv) is a grouped conv (group={group}); TFLite Micro runs "
                             "plain and depthwise convs only")
        options.padding, options.strideH, options.strideW = padding, strides[0], strides[1]
        options.dilationHFactor, options.dilationWFactor = dilations[0], dilations[1]
        wt = self.out.constant(f"{node.name}_weights", weights, Quant(tuple(w_scale), (0,) * cout, qdim))
        bt = self.out.constant(f"{node.name}_bias", bias_q, Quant(tuple(x_scale * w_scale), (0,) * cout))
        self.emit(node, code, [inp, wt, bt], options_type, options)

    def fully_connected(self, node):
        a = _attrs(node)
        if node.op_type == "Gemm" and (a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0)):
            raise StageError(f"Node {node.name!r} (Gemm) has alpha/beta/transA; expected a plain linear layer")
        w = self.src.weight(node.input[1])
        if w is None:
            raise StageError(f"Node {node.name!r} ({node.op_type}) has no int8 weight constant")
        values, w_scale, w_zp, _ = w
        if np.any(w_zp != 0):
            raise StageError(f"Node {node.name!r}: weight zero point {w_zp.max()}; TFLite needs symmetric int8 weights")
        transposed = node.op_type == "Gemm" and a.get("transB", 0)
        weights = values if transposed else values.T  # TFLite wants [out, in]
        out_features = weights.shape[0]
        x = self.src.canonical(node.input[0])
        if x in self.flattened:  # ONNX flattened C,H,W; the TFLite tensor was flattened as H,W,C
            c, h, wd = self.flattened[x]
            weights = weights.reshape(out_features, c, h, wd).transpose(0, 2, 3, 1).reshape(out_features, -1)
        w_scale = np.broadcast_to(w_scale, (out_features,)).astype(np.float64)
        x_scale = self.quant_of(x).scale[0]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        bias = self.src.real(node.input[2]) if has_bias else np.zeros(out_features)
        wt = self.out.constant(f"{node.name}_weights", np.ascontiguousarray(weights), Quant(tuple(w_scale), (0,) * out_features, 0))
        bt = self.out.constant(f"{node.name}_bias", np.round(bias / (x_scale * w_scale)).astype(np.int32),
                               Quant(tuple(x_scale * w_scale), (0,) * out_features))
        self.emit(node, OPS.FULLY_CONNECTED, [self.tensor(x), wt, bt], tfl.BuiltinOptions.FullyConnectedOptions,
                  tfl.FullyConnectedOptionsT())

    def add(self, node):
        a, b = node.input
        if self.shape(a) != self.shape(b):
            raise StageError(f"Node {node.name!r} (Add) broadcasts {self.shape(a)} with {self.shape(b)}; expected equal shapes")
        self.emit(node, OPS.ADD, [self.tensor(a), self.tensor(b)], tfl.BuiltinOptions.AddOptions, tfl.AddOptionsT())

    def relu(self, node):
        source = self.src.canonical(node.input[0])
        op = self.producer_op.get(source)
        if op is None or len(self.src.consumers.get(source, [])) != 1 or not hasattr(op.builtinOptions, "fusedActivationFunction"):
            raise StageError(f"Node {node.name!r} (Relu) does not follow a conv, linear layer or add it can fuse into")
        op.builtinOptions.fusedActivationFunction = tfl.ActivationFunctionType.RELU
        self.index[self.src.canonical(node.output[0])] = self.index[source]

    def pool(self, node):
        a = _attrs(node)
        if a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", [1, 1])):
            raise StageError(f"Node {node.name!r} ({node.op_type}) uses ceil_mode or dilation; TFLite pools have neither")
        kernel, strides = a["kernel_shape"], a.get("strides", [1, 1])
        inp, padding = self.spatial_input(node, node.input[0], kernel, strides, (1, 1), a.get("pads", [0, 0, 0, 0]))
        self.require_same_quant(node, node.input[0], node.output[0])
        options = tfl.Pool2DOptionsT()
        options.padding, options.strideH, options.strideW = padding, strides[0], strides[1]
        options.filterHeight, options.filterWidth = kernel
        code = OPS.MAX_POOL_2D if node.op_type == "MaxPool" else OPS.AVERAGE_POOL_2D
        self.emit(node, code, [inp], tfl.BuiltinOptions.Pool2DOptions, options)

    def mean(self, node):
        a = _attrs(node)
        axes = a.get("axes") or (list(self.src.consts[node.input[1]]) if len(node.input) > 1 else [2, 3])
        if node.op_type == "GlobalAveragePool":
            axes, keep = [2, 3], 1
        else:
            keep = a.get("keepdims", 1)
        if sorted(int(x) % 4 for x in axes) != [2, 3]:
            raise StageError(f"Node {node.name!r} ({node.op_type}) averages axes {list(axes)}; expected the spatial axes 2, 3")
        axis = self.out.constant(f"{node.name}_axes", np.array([1, 2], np.int32))
        options = tfl.ReducerOptionsT()
        options.keepDims = bool(keep)
        self.emit(node, OPS.MEAN, [self.tensor(node.input[0]), axis], tfl.BuiltinOptions.ReducerOptions, options)

    def reshape(self, node):
        x, y = self.src.canonical(node.input[0]), self.src.canonical(node.output[0])
        self.require_same_quant(node, x, y)
        in_shape, out_shape = self.shape(x), self.shape(node.output[0])
        if len(in_shape) == 4 and len(out_shape) == 2 and in_shape[2] * in_shape[3] > 1:
            self.flattened[y] = in_shape[1:]
            if any(reader.op_type not in ("Gemm", "MatMul") for reader in self.src.readers(node.output[0])):
                raise StageError(f"Node {node.name!r} flattens a feature map for something other than a linear layer")
        elif len(in_shape) == 4 and len(out_shape) != 2 and in_shape != out_shape:
            raise StageError(f"Node {node.name!r} reshapes {in_shape} to {out_shape}; only flattening is layout-free")
        new_shape = np.array(self.tfl_shape(node.output[0]), np.int32)
        options = tfl.ReshapeOptionsT()
        options.newShape = new_shape
        shape_t = self.out.constant(f"{node.name}_shape", new_shape)
        self.emit(node, OPS.RESHAPE, [self.tensor(x), shape_t], tfl.BuiltinOptions.ReshapeOptions, options)

    def pad(self, node):
        if _attrs(node).get("mode", b"constant") not in (b"constant", "constant"):
            raise StageError(f"Node {node.name!r} (Pad) is not constant padding")
        pads = self.src.consts[node.input[1]].astype(int)
        if len(node.input) > 2 and node.input[2] and float(self.src.real(node.input[2]).ravel()[0]) != 0.0:
            raise StageError(f"Node {node.name!r} (Pad) pads with a non-zero value")
        self.require_same_quant(node, node.input[0], node.output[0])
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        order = NHWC if rank == 4 else range(rank)
        paddings = np.array([[begin[i], end[i]] for i in order], np.int32)
        pt = self.out.constant(f"{node.name}_paddings", paddings)
        self.emit(node, OPS.PAD, [self.tensor(node.input[0]), pt], tfl.BuiltinOptions.PadOptions, tfl.PadOptionsT())

    def slice(self, node):
        consts = self.src.consts
        shape = self.shape(node.input[0])
        rank = len(shape)
        starts, ends = consts[node.input[1]], consts[node.input[2]]
        axes = consts[node.input[3]] if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
        steps = consts[node.input[4]] if len(node.input) > 4 and node.input[4] else np.ones(len(starts), int)
        begin, end, stride = [0] * rank, list(shape), [1] * rank
        for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
            ax = int(ax) % rank
            if st <= 0:
                raise StageError(f"Node {node.name!r} (Slice) has step {st}; expected positive steps")
            begin[ax] = int(np.clip(s if s >= 0 else s + shape[ax], 0, shape[ax]))
            end[ax] = int(np.clip(e if e >= 0 else e + shape[ax], 0, shape[ax]))
            stride[ax] = int(st)
        self.require_same_quant(node, node.input[0], node.output[0])
        order = NHWC if rank == 4 else range(rank)
        tensors = [self.out.constant(f"{node.name}_{k}", np.array([v[i] for i in order], np.int32))
                   for k, v in (("begin", begin), ("end", end), ("strides", stride))]
        self.emit(node, OPS.STRIDED_SLICE, [self.tensor(node.input[0]), *tensors],
                  tfl.BuiltinOptions.StridedSliceOptions, tfl.StridedSliceOptionsT())

    def run(self, graph) -> bytes:
        for node in graph.node:
            if node.op_type in CONVERTERS:
                getattr(self, CONVERTERS[node.op_type])(node)
        self.out.inputs = [self.tensor(v.name) for v in graph.input]
        self.out.outputs = [self.tensor(v.name) for v in graph.output]
        return self.out.serialize()


def convert_to_tflite(quantized_onnx: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a full-int8 .tflite equivalent to the QDQ ONNX model (batch 1, NHWC, int8 input and output)."""
    model = _batch_one(load(quantized_onnx))
    unsupported = [n for n in model.graph.node if n.op_type not in {*CONVERTERS, *QDQ, "Constant"}]
    if unsupported:
        names = ", ".join(f"{n.name or n.output[0]!r} ({n.op_type})" for n in unsupported[:5])
        raise StageError(f"Cannot convert to TFLite: node {names} has no TFLite Micro builtin here; "
                         f"supported: {', '.join(sorted(CONVERTERS))}")
    return write_bytes(out, _Converter(model).run(model.graph))
