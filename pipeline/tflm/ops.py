"""The one TFLite operator table: which ONNX ops the writer converts, by which converter method, into which
TFLite builtins, and the TFLM op-resolver call each builtin needs. It drives the converter's dispatch and
its refusal of anything else, the resolver in `model_settings.h`, and the README's supported-op list (a test
keeps the README true)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Operator:
    onnx: str  # ONNX op type
    convert: str  # the converter's method that writes it
    builtin: str | None  # the TFLite builtin it becomes; None when fused into the op before it
    resolver: str | None  # TFLM's MicroMutableOpResolver call that registers that builtin


OPERATORS = (
    Operator("Conv", "conv", "CONV_2D", "AddConv2D"),
    Operator("Conv", "conv", "DEPTHWISE_CONV_2D", "AddDepthwiseConv2D"),  # group == channels
    Operator("Conv", "conv", "PAD", "AddPad"),  # pads that SAME cannot express become an explicit PAD
    Operator("Gemm", "fully_connected", "FULLY_CONNECTED", "AddFullyConnected"),
    Operator("MatMul", "fully_connected", "FULLY_CONNECTED", "AddFullyConnected"),
    Operator("Add", "binary", "ADD", "AddAdd"),
    Operator("Sub", "binary", "SUB", "AddSub"),
    Operator("Mul", "binary", "MUL", "AddMul"),  # broadcasts: a squeeze-and-excite's per-channel weights
    Operator("Div", "binary", "MUL", "AddMul"),  # by a constant only: multiplies by its reciprocal
    Operator("Relu", "relu", None, None),  # fused into the conv, linear layer or add before it
    Operator("Clip", "clip", "RELU6", "AddRelu6"),  # after a single-reader op it is fused: ORT folds it into the range
    Operator("Clip", "clip", "QUANTIZE", "AddQuantize"),  # to the output's scale, which ORT calibrates apart
    Operator("Sigmoid", "sigmoid", "LOGISTIC", "AddLogistic"),
    Operator("HardSwish", "hard_swish", "HARD_SWISH", "AddHardSwish"),
    Operator("HardSigmoid", "hard_swish", "HARD_SWISH", "AddHardSwish"),  # x * hardsigmoid(x), as ORT splits it
    Operator("Softmax", "softmax", "SOFTMAX", "AddSoftmax"),
    Operator("BatchNormalization", "batch_norm", "DEPTHWISE_CONV_2D", "AddDepthwiseConv2D"),  # none to fold into
    Operator("Concat", "concat", "CONCATENATION", "AddConcatenation"),
    Operator("Concat", "concat", "QUANTIZE", "AddQuantize"),  # an input at another scale is requantized first
    Operator("Transpose", "transpose", "TRANSPOSE", "AddTranspose"),
    Operator("Resize", "resize", "RESIZE_NEAREST_NEIGHBOR", "AddResizeNearestNeighbor"),
    Operator("MaxPool", "pool", "MAX_POOL_2D", "AddMaxPool2D"),
    Operator("AveragePool", "pool", "AVERAGE_POOL_2D", "AddAveragePool2D"),
    Operator("GlobalAveragePool", "mean", "MEAN", "AddMean"),
    Operator("ReduceMean", "mean", "MEAN", "AddMean"),
    Operator("Reshape", "reshape", "RESHAPE", "AddReshape"),
    Operator("Flatten", "reshape", "RESHAPE", "AddReshape"),
    Operator("Squeeze", "reshape", "RESHAPE", "AddReshape"),
    Operator("Unsqueeze", "reshape", "RESHAPE", "AddReshape"),
    Operator("Pad", "pad", "PAD", "AddPad"),
    Operator("Slice", "slice", "STRIDED_SLICE", "AddStridedSlice"),
)

# The TFLM kernel sources each builtin needs (under tensorflow/lite/micro/kernels/): CMSIS-NN's where it has one.
KERNEL_SOURCES = {
    "CONV_2D": ("cmsis_nn/conv.cc", "conv_common.cc"),
    "DEPTHWISE_CONV_2D": ("cmsis_nn/depthwise_conv.cc", "depthwise_conv_common.cc"),
    "FULLY_CONNECTED": ("cmsis_nn/fully_connected.cc", "fully_connected_common.cc"),
    "ADD": ("cmsis_nn/add.cc", "add_common.cc"),
    "MAX_POOL_2D": ("cmsis_nn/pooling.cc", "pooling_common.cc"),
    "AVERAGE_POOL_2D": ("cmsis_nn/pooling.cc", "pooling_common.cc"),
    "MEAN": ("reduce.cc", "reduce_common.cc"),
    "RESHAPE": ("reshape.cc", "reshape_common.cc"),
    "PAD": ("cmsis_nn/pad.cc", "pad_common.cc"),
    "STRIDED_SLICE": ("strided_slice.cc", "strided_slice_common.cc"),
    "SUB": ("sub.cc", "sub_common.cc"),
    "MUL": ("cmsis_nn/mul.cc", "mul_common.cc"),
    "RELU6": ("activations.cc", "activations_common.cc"),
    "LOGISTIC": ("logistic.cc", "logistic_common.cc"),
    "HARD_SWISH": ("hard_swish.cc", "hard_swish_common.cc"),
    "SOFTMAX": ("cmsis_nn/softmax.cc", "softmax_common.cc"),
    "CONCATENATION": ("concatenation.cc",),
    "QUANTIZE": ("quantize.cc", "quantize_common.cc"),
    "TRANSPOSE": ("cmsis_nn/transpose.cc", "transpose_common.cc"),
    "RESIZE_NEAREST_NEIGHBOR": ("resize_nearest_neighbor.cc",),
}

CONVERTERS = {op.onnx: op.convert for op in OPERATORS}  # ONNX op type -> converter method
RESOLVER_CALLS = {op.builtin: op.resolver for op in OPERATORS if op.builtin}  # builtin -> resolver call
BUILTINS = tuple(dict.fromkeys(op.builtin for op in OPERATORS if op.builtin))  # in table order


def readme_table() -> str:
    """The README's operator table: one row per set of ONNX ops that become the same builtins."""
    by_onnx: dict[str, list[Operator]] = {}
    for op in OPERATORS:
        by_onnx.setdefault(op.onnx, []).append(op)
    rows: dict[tuple, list[str]] = {}
    for onnx_op, ops in by_onnx.items():
        key = (", ".join(f"`{o.builtin}`" if o.builtin else "fused into the op before it" for o in ops),
               ", ".join(dict.fromkeys(f"`{o.resolver}`" for o in ops if o.resolver)) or "-")
        rows.setdefault(key, []).append(f"`{onnx_op}`")
    lines = ["| ONNX op | TFLite builtins | TFLM resolver calls |", "|---|---|---|"]
    return "\n".join(lines + [f"| {', '.join(names)} | {builtins} | {calls} |" for (builtins, calls), names in rows.items()])
