"""The TFLite conversion stage: a quantized (QDQ, int8 activations) ONNX graph to a full-int8 .tflite.

The ONNX Runtime model and the TFLite model share one calibration: every scale and zero point here is
read from the QDQ graph (`pipeline.tflm.qdq`). NCHW becomes NHWC at conversion time (weights transposed, axes
remapped, the flatten before a fully connected layer folded into its weight columns; `pipeline.tflm.layout`), so
no transpose is left but a model's own (a channel shuffle). The layer operators are here, those of mobile blocks in
`pipeline.tflm.convert_blocks`.
"""

import os
from pathlib import Path

import numpy as np
import onnx
from ai_edge_litert import schema_py_generated as tfl

from pipeline.errors import StageError
from pipeline.onnx.cost import _batch_one, load
from pipeline.tflm.convert_blocks import BlockOps
from pipeline.tflm.flatbuffer import FlatGraph, Quant
from pipeline.tflm.layout import NHWC, layout, layout_free, same_padding
from pipeline.tflm.ops import CONVERTERS
from pipeline.tflm.qdq import QDQ, QdqGraph, attrs
from pipeline.util import write_bytes

OPS = tfl.BuiltinOperator


class _Converter(BlockOps):
    def __init__(self, model: onnx.ModelProto):
        self.src = QdqGraph(model)
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
        return [int(np.prod([shape[a] for a in group])) for group in layout(len(shape))]

    def tfl_axis(self, name: str, axis: int) -> int:
        rank = len(self.shape(name))
        for i, group in enumerate(layout(rank)):
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
        same = [*same_padding(h, kernel[0], strides[0], dilations[0]), *same_padding(w, kernel[1], strides[1], dilations[1])]
        if [pads[0], pads[2], pads[1], pads[3]] == same:
            return self.tensor(name), tfl.Padding.SAME
        if node.op_type != "Conv":
            raise StageError(f"Node {node.name!r} ({node.op_type}) pads {pads} that SAME cannot express; only convs "
                             "take an explicit PAD")
        return self.explicit_pad(name, pads), tfl.Padding.VALID

    def conv(self, node):
        a = attrs(node)
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
        a = attrs(node)
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
        a = attrs(node)
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
        a = attrs(node)
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
        elif not layout_free(in_shape, out_shape):
            raise StageError(f"Node {node.name!r} reshapes {in_shape} to {out_shape}, which moves data in TFLite's "
                             "channels-last layout; expected a flatten, a squeeze of unit axes, or a split or merge "
                             "of the channel axis that keeps height and width (a channel shuffle)")
        new_shape = np.array(self.tfl_shape(node.output[0]), np.int32)
        options = tfl.ReshapeOptionsT()
        options.newShape = new_shape
        shape_t = self.out.constant(f"{node.name}_shape", new_shape)
        self.emit(node, OPS.RESHAPE, [self.tensor(x), shape_t], tfl.BuiltinOptions.ReshapeOptions, options)

    def pad(self, node):
        if attrs(node).get("mode", b"constant") not in (b"constant", "constant"):
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
    src = QdqGraph(model)
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
