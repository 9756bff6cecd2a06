"""Converters for the operators mobile and embedded nets add to plain conv stacks: element-wise arithmetic,
sigmoid, hard-swish, softmax, ReLU6, concat, the channel shuffle's transpose, a standalone BatchNorm and nearest
resize. A mixin of the converter (`pipeline.tflm.convert`): it uses the converter's tensors and emit."""

import numpy as np
from ai_edge_litert import schema_py_generated as tfl

from pipeline.errors import StageError
from pipeline.tflm.flatbuffer import Quant
from pipeline.tflm.layout import layout, to_tflite_layout
from pipeline.tflm.qdq import attrs
from pipeline.util import NEAREST_FLOOR, onnx_resize_rule

OPS = tfl.BuiltinOperator
LOGISTIC_QUANT = Quant((1 / 256,), (-128,))  # what TFLite's int8 LOGISTIC and SOFTMAX write: [0, 1) in 256 steps


class BlockOps:
    def requantized(self, name: str, quant: Quant) -> int:
        """The tensor at `quant`: itself when it already is, else a QUANTIZE op's int8-to-int8 copy."""
        index = self.tensor(name)
        if self.quant_of(name).same_as(quant):
            return index
        out = self.out.activation(f"{self.src.canonical(name)}_requantized", self.tfl_shape(name), quant)
        self.out.op(OPS.QUANTIZE, [index], [out], tfl.BuiltinOptions.QuantizeOptions, tfl.QuantizeOptionsT())
        return out

    def operand(self, node, name: str, like: str, *, reciprocal: bool = False) -> int:
        """An input of an element-wise op: an activation, or a constant (or its reciprocal, for a Div) laid out to
        broadcast against `like`."""
        if not self.src.is_constant(name):
            return self.tensor(name)
        real = self.src.real(name)
        rank = len(self.shape(like))
        if 0 < real.ndim < rank:  # ONNX broadcasts from the right: give it the activation's rank first
            real = real.reshape((1,) * (rank - real.ndim) + real.shape)
        if real.ndim == rank:
            real = to_tflite_layout(real)
        weight = None if reciprocal else self.src.weight(name)
        if reciprocal:
            real = 1.0 / real
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
        divide = node.op_type == "Div"
        if divide and not self.src.is_constant(b):
            raise StageError(f"Node {node.name!r} (Div) divides by a computed tensor; expected a constant divisor")
        code, options_type, options = {
            "Add": (OPS.ADD, tfl.BuiltinOptions.AddOptions, tfl.AddOptionsT),
            "Sub": (OPS.SUB, tfl.BuiltinOptions.SubOptions, tfl.SubOptionsT),
            "Mul": (OPS.MUL, tfl.BuiltinOptions.MulOptions, tfl.MulOptionsT),
            "Div": (OPS.MUL, tfl.BuiltinOptions.MulOptions, tfl.MulOptionsT)}[node.op_type]  # by the reciprocal
        like = b if self.src.is_constant(a) else a
        self.emit(node, code, [self.operand(node, a, like), self.operand(node, b, like, reciprocal=divide)],
                  options_type, options())

    def softmax(self, node):
        axis = attrs(node).get("axis", -1)
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
            a = attrs(node)
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
        a = attrs(node)
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
        options.axis = self.tfl_axis(node.output[0], attrs(node)["axis"])
        # TFLite's int8 CONCATENATION copies bytes: every input must already be at the output's scale
        inputs = [self.requantized(name, out_quant) for name in node.input]
        self.emit(node, OPS.CONCATENATION, inputs, tfl.BuiltinOptions.ConcatenationOptions, options)

    def transpose(self, node):
        x = node.input[0]
        perm = [int(p) for p in attrs(node)["perm"]]
        groups = layout(len(perm))
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
        weight = gamma / np.sqrt(var + attrs(node).get("epsilon", 1e-5))
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
        settings = onnx_resize_rule(node)
        if settings != NEAREST_FLOOR:
            raise StageError(f"Node {node.name!r} (Resize) uses {', '.join(settings)}; TFLite's RESIZE_NEAREST_NEIGHBOR "
                             "is nearest, asymmetric, floor")
        self.require_same_quant(node, node.input[0], node.output[0])
        size = self.out.constant(f"{node.name}_size", np.array(self.shape(node.output[0])[2:], np.int32))
        self.emit(node, OPS.RESIZE_NEAREST_NEIGHBOR, [self.tensor(node.input[0]), size],
                  tfl.BuiltinOptions.ResizeNearestNeighborOptions, tfl.ResizeNearestNeighborOptionsT())
