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
LOGISTIC_QUANT = Quant((1 / 256,), (-128,))  # what TFLite's int8 LOGISTIC and SOFTMAX write: [0, 1) in 256 steps
QDQ = {"QuantizeLinear", "DequantizeLinear"}
NHWC = (0, 2, 3, 1)
# Rank 5 appears in a channel shuffle, N x groups x C/groups x H x W. It is stored as N x HW x groups x C/groups:
# splitting the channel axis stays a reshape that moves no data, as in NCHW, and the shuffle is a 4-D transpose,
# which CMSIS-NN's kernel runs (it has no 5-D one).
SHUFFLE = ((0,), (3, 4), (1,), (2,))


def _layout(rank: int) -> tuple[tuple[int, ...], ...]:
    """TFLite axis i holds the ONNX axes layout[i] (merged): channels last for image-like tensors, else ONNX order."""
    return tuple((i,) for i in NHWC) if rank == 4 else SHUFFLE if rank == 5 else tuple((i,) for i in range(rank))


def _to_tflite_layout(array: np.ndarray) -> np.ndarray:
    groups = _layout(array.ndim)
    order = [axis for group in groups for axis in group]
    return array.transpose(order).reshape([int(np.prod([array.shape[a] for a in g])) for g in groups])


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
        if len(users) == 1 and users[0].op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Relu"):
            return self.quant(users[0].output[0])
        raise StageError(f"Tensor {name!r} has no quantization parameters; expected a fully quantized QDQ graph")


def _layout_free(in_shape: tuple, out_shape: tuple) -> bool:
    """Whether a reshape moves no data once both tensors are stored in their TFLite layout: the elements, numbered
    in ONNX order, come out of both TFLite tensors in the same order (shapes are small: this is exact and cheap)."""
    numbered = np.arange(int(np.prod(in_shape))).reshape(in_shape)
    return np.array_equal(_to_tflite_layout(numbered).ravel(), _to_tflite_layout(numbered.reshape(out_shape)).ravel())


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
        self.fused: set[str] = set()  # nodes another node's converter already wrote (the Mul of a hard-swish)

    # ---- tensors ----
    def shape(self, name: str) -> tuple[int, ...]:
        return self.src.shapes[name]

    def tfl_shape(self, name: str) -> list[int]:
        shape = self.shape(name)
        return [int(np.prod([shape[a] for a in group])) for group in _layout(len(shape))]

    def tfl_axis(self, name: str, axis: int) -> int:
        rank = len(self.shape(name))
        for i, group in enumerate(_layout(rank)):
            if group == (int(axis) % rank,):
                return i
        raise StageError(f"Tensor {name!r}: axis {axis} of a channel-shuffle tensor is merged with another in TFLite; "
                         "expected an operation along the batch or a channel axis")

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
        elif not _layout_free(in_shape, out_shape):
            raise StageError(f"Node {node.name!r} reshapes {in_shape} to {out_shape}, which moves data in TFLite's "
                             "channels-last layout; expected a flatten, a squeeze of unit axes, or a split or merge "
                             "of the channel axis that keeps height and width (a channel shuffle)")
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

    # ---- element-wise, activations, shapes (the operators real embedded models add) ----
    def requantized(self, name: str, quant: Quant) -> int:
        """The tensor at `quant`: itself when it already is, else a QUANTIZE op's int8-to-int8 copy."""
        index = self.tensor(name)
        if self.quant_of(name).same_as(quant):
            return index
        out = self.out.activation(f"{self.src.canonical(name)}_requantized", self.tfl_shape(name), quant)
        self.out.op(OPS.QUANTIZE, [index], [out], tfl.BuiltinOptions.QuantizeOptions, tfl.QuantizeOptionsT())
        return out

    def operand(self, node, name: str, like: str) -> int:
        """An input of an element-wise op: an activation, or a constant laid out to broadcast against `like`."""
        if self.src.canonical(name) not in self.src.consts and self.src.weight(name) is None:
            return self.tensor(name)
        real = self.src.real(name)
        rank = len(self.shape(like))
        if 0 < real.ndim < rank:  # ONNX broadcasts from the right: give it the activation's rank first
            real = real.reshape((1,) * (rank - real.ndim) + real.shape)
        if real.ndim == rank:
            real = _to_tflite_layout(real)
        weight = self.src.weight(name)
        if weight is not None and weight[1].size == 1:
            scale, zp = float(weight[1][0]), int(weight[2].ravel()[0])
        else:  # a float constant: symmetric int8 represents each of its (usually few) values to 1/254 of the largest
            scale, zp = float(np.max(np.abs(real))) / 127 or 1.0, 0
        values = np.clip(np.round(real / scale) + zp, -128, 127).astype(np.int8)
        return self.out.constant(f"{node.name}_{name}", values, Quant((scale,), (zp,)))

    def binary(self, node):
        if node.name in self.fused:
            return
        a, b = node.input
        like = a if self.src.canonical(a) not in self.src.consts and self.src.weight(a) is None else b
        if node.op_type == "Div":  # only by a constant: multiply by its reciprocal
            if self.src.weight(b) is None and self.src.canonical(b) not in self.src.consts:
                raise StageError(f"Node {node.name!r} (Div) divides by a computed tensor; expected a constant divisor")
            divisor = self.src.real(b)
            self.src.consts[f"{node.name}_reciprocal"] = (1.0 / divisor).astype(np.float32)
            b = f"{node.name}_reciprocal"
        code, options_type, options = {
            "Add": (OPS.ADD, tfl.BuiltinOptions.AddOptions, tfl.AddOptionsT),
            "Sub": (OPS.SUB, tfl.BuiltinOptions.SubOptions, tfl.SubOptionsT),
            "Mul": (OPS.MUL, tfl.BuiltinOptions.MulOptions, tfl.MulOptionsT),
            "Div": (OPS.MUL, tfl.BuiltinOptions.MulOptions, tfl.MulOptionsT)}[node.op_type]
        self.emit(node, code, [self.operand(node, a, like), self.operand(node, b, like)], options_type, options())

    def softmax(self, node):
        axis = _attrs(node).get("axis", -1)
        if self.tfl_axis(node.input[0], axis) != len(self.shape(node.input[0])) - 1:
            raise StageError(f"Node {node.name!r} (Softmax) normalises over axis {axis}; TFLite's SOFTMAX takes the "
                             "last (channel) axis")
        self.require_output_quant(node, LOGISTIC_QUANT)
        options = tfl.SoftmaxOptionsT()
        options.beta = 1.0
        self.emit(node, OPS.SOFTMAX, [self.tensor(node.input[0])], tfl.BuiltinOptions.SoftmaxOptions, options)

    def sigmoid(self, node):
        self.require_output_quant(node, LOGISTIC_QUANT)
        self.emit(node, OPS.LOGISTIC, [self.tensor(node.input[0])])

    def require_output_quant(self, node, quant: Quant) -> None:
        if not self.quant_of(node.output[0]).same_as(quant):
            raise StageError(f"Node {node.name!r} ({node.op_type}) output is quantized to {self.quant_of(node.output[0])}; "
                             f"TFLite's int8 kernel writes scale 1/256, zero point -128 (the quantize stage sets it)")

    def hard_swish(self, node):
        """HardSwish, or the HardSigmoid-times-input pair ONNX Runtime's pre-processing splits it into."""
        x = node.input[0]
        if node.op_type == "HardSigmoid":
            a = _attrs(node)
            readers = self.src.readers(node.output[0])
            mul = readers[0] if len(readers) == 1 and readers[0].op_type == "Mul" else None
            inputs = {self.src.canonical(i) for i in mul.input} if mul else set()
            if not (np.isclose(a.get("alpha", 0.2), 1 / 6) and a.get("beta", 0.5) == 0.5 and mul
                    and inputs == {self.src.canonical(x), self.src.canonical(node.output[0])}):
                raise StageError(f"Node {node.name!r} (HardSigmoid) is not half of a hard-swish (x * hardsigmoid(x)); "
                                 "TFLite Micro has no HardSigmoid kernel")
            self.fused.add(mul.name)
            node = mul
        self.emit(node, OPS.HARD_SWISH, [self.tensor(x)])

    def clip(self, node):
        """A ReLU6 that stays a node: ORT's quantizer folds a Clip after a single-reader op into that op's output
        range (the int8 clamp is the activation), so only one whose input has other readers gets here."""
        a = _attrs(node)
        low = float(self.src.real(node.input[1])) if len(node.input) > 1 and node.input[1] else a.get("min", -np.inf)
        high = float(self.src.real(node.input[2])) if len(node.input) > 2 and node.input[2] else a.get("max", np.inf)
        if (low, high) != (0.0, 6.0):
            raise StageError(f"Node {node.name!r} (Clip) clips to [{low:g}, {high:g}]; expected ReLU6's [0, 6]")
        x = node.input[0]
        if self.quant_of(x).same_as(self.quant_of(node.output[0])):
            self.emit(node, OPS.RELU6, [self.tensor(x)])
            return
        # TFLite's int8 RELU6 clamps in its input's scale and writes that scale: requantize after it
        clamped = self.out.activation(f"{node.name}_clamped", self.tfl_shape(x), self.quant_of(x))
        self.out.op(OPS.RELU6, [self.tensor(x)], [clamped])
        self.emit(node, OPS.QUANTIZE, [clamped], tfl.BuiltinOptions.QuantizeOptions, tfl.QuantizeOptionsT())

    def concat(self, node):
        out_quant = self.quant_of(node.output[0])
        options = tfl.ConcatenationOptionsT()
        options.axis = self.tfl_axis(node.output[0], _attrs(node)["axis"])
        # TFLite's int8 CONCATENATION copies bytes: every input must already be at the output's scale
        inputs = [self.requantized(name, out_quant) for name in node.input]
        self.emit(node, OPS.CONCATENATION, inputs, tfl.BuiltinOptions.ConcatenationOptions, options)

    def transpose(self, node):
        x = node.input[0]
        perm = [int(p) for p in _attrs(node)["perm"]]
        groups = _layout(len(perm))
        moved = [tuple(perm[a] for a in group) for group in groups]  # the input axes each output axis holds
        if any(m not in groups for m in moved):
            raise StageError(f"Node {node.name!r} (Transpose) permutes {perm}, which separates height and width; "
                             "expected a channel shuffle or a layout change")
        tfl_perm = np.array([groups.index(m) for m in moved], np.int32)
        self.require_same_quant(node, x, node.output[0])
        if list(tfl_perm) == list(range(len(perm))):  # a layout change ONNX needed and channels-last already has
            self.index[self.src.canonical(node.output[0])] = self.tensor(x)
            return
        self.emit(node, OPS.TRANSPOSE, [self.tensor(x), self.out.constant(f"{node.name}_perm", tfl_perm)],
                  tfl.BuiltinOptions.TransposeOptions, tfl.TransposeOptionsT())

    def batch_norm(self, node):
        """A BatchNormalization with no conv before it to fold into: a per-channel affine map, which is a 1x1
        depthwise conv whose int8 weights are exact (each channel's one weight is its own scale's 127)."""
        gamma, beta, mean, var = (self.src.real(n) for n in node.input[1:5])
        weight = gamma / np.sqrt(var + _attrs(node).get("epsilon", 1e-5))
        shift = beta - mean * weight
        channels = len(weight)
        w_scale = np.where(np.abs(weight) > 0, np.abs(weight) / 127, 1.0)
        x = node.input[0]
        x_scale = self.quant_of(x).scale[0]
        options = tfl.DepthwiseConv2DOptionsT()
        options.padding, options.strideH, options.strideW, options.depthMultiplier = tfl.Padding.VALID, 1, 1, 1
        options.dilationHFactor = options.dilationWFactor = 1
        wt = self.out.constant(f"{node.name}_weights", np.round(weight / w_scale).astype(np.int8).reshape(1, 1, 1, channels),
                               Quant(tuple(w_scale), (0,) * channels, 3))
        bt = self.out.constant(f"{node.name}_bias", np.round(shift / (x_scale * w_scale)).astype(np.int32),
                               Quant(tuple(x_scale * w_scale), (0,) * channels))
        self.emit(node, OPS.DEPTHWISE_CONV_2D, [self.tensor(x), wt, bt], tfl.BuiltinOptions.DepthwiseConv2DOptions, options)

    def resize(self, node):
        a = _attrs(node)
        settings = tuple(v.decode() if isinstance(v, bytes) else v for v in (
            a.get("mode", b"nearest"), a.get("coordinate_transformation_mode", b"half_pixel"),
            a.get("nearest_mode", b"round_prefer_floor")))
        if settings != ("nearest", "asymmetric", "floor"):
            raise StageError(f"Node {node.name!r} (Resize) uses {', '.join(settings)}; TFLite's RESIZE_NEAREST_NEIGHBOR "
                             "is nearest, asymmetric, floor")
        self.require_same_quant(node, node.input[0], node.output[0])
        size = self.out.constant(f"{node.name}_size", np.array(self.shape(node.output[0])[2:], np.int32))
        self.emit(node, OPS.RESIZE_NEAREST_NEIGHBOR, [self.tensor(node.input[0]), size],
                  tfl.BuiltinOptions.ResizeNearestNeighborOptions, tfl.ResizeNearestNeighborOptionsT())

    def run(self, graph) -> bytes:
        for node in graph.node:
            if node.op_type in CONVERTERS:
                getattr(self, CONVERTERS[node.op_type])(node)
        self.out.inputs = [self.tensor(v.name) for v in graph.input]
        self.out.outputs = [self.tensor(v.name) for v in graph.output]
        return self.out.serialize()


def tflite_bytes(quantized: onnx.ModelProto) -> bytes:
    """A full-int8 .tflite (batch 1, NHWC, int8 input and output) equivalent to the QDQ ONNX model."""
    model = _batch_one(quantized)
    unsupported = [n for n in model.graph.node if n.op_type not in {*CONVERTERS, *QDQ, "Constant"}]
    if unsupported:
        names = ", ".join(f"{n.name or n.output[0]!r} ({n.op_type})" for n in unsupported[:5])
        raise StageError(f"Cannot convert to TFLite: node {names} has no TFLite Micro builtin here; "
                         f"supported: {', '.join(sorted(CONVERTERS))}")
    return _Converter(model).run(model.graph)


def convert_to_tflite(quantized_onnx: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write `out`, the .tflite of the QDQ ONNX file (see `tflite_bytes`); nothing is written when it fails."""
    return write_bytes(out, tflite_bytes(load(quantized_onnx)))


def before_final_softmax(quantized_onnx: str | os.PathLike) -> onnx.ModelProto | None:
    """The QDQ graph cut just before a Softmax that ends it (its output the quantized logits), or None.

    A softmax turns a one-step difference in the logits into many steps of its 1/256 grid, so two runtimes that
    agree on the logits can differ there by tens of steps: runtimes are compared on the logits instead."""
    model = load(quantized_onnx)
    graph = model.graph
    src = _Onnx(model)
    node = src.producer.get(graph.output[0].name)
    while node is not None and node.op_type in QDQ:
        node = src.producer.get(node.input[0])
    if node is None or node.op_type != "Softmax":
        return None
    keep = set()
    stack = [node.input[0]]
    while stack:  # every node the softmax's input depends on
        producer = src.producer.get(stack.pop())
        if producer is not None and id(producer) not in keep:
            keep.add(id(producer))
            stack.extend(producer.input)
    cut = onnx.ModelProto.FromString(model.SerializeToString())
    del cut.graph.node[:]
    cut.graph.node.extend(n for n in graph.node if id(n) in keep)
    del cut.graph.output[:]
    cut.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    return cut
