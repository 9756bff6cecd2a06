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
    Operator("Add", "add", "ADD", "AddAdd"),
    Operator("Relu", "relu", None, None),  # fused into the conv, linear layer or add before it
    Operator("MaxPool", "pool", "MAX_POOL_2D", "AddMaxPool2D"),
    Operator("AveragePool", "pool", "AVERAGE_POOL_2D", "AddAveragePool2D"),
    Operator("GlobalAveragePool", "mean", "MEAN", "AddMean"),
    Operator("ReduceMean", "mean", "MEAN", "AddMean"),
    Operator("Reshape", "reshape", "RESHAPE", "AddReshape"),
    Operator("Flatten", "reshape", "RESHAPE", "AddReshape"),
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
}

CONVERTERS = {op.onnx: op.convert for op in OPERATORS}  # ONNX op type -> converter method
RESOLVER_CALLS = {op.builtin: op.resolver for op in OPERATORS if op.builtin}  # builtin -> resolver call
BUILTINS = tuple(dict.fromkeys(op.builtin for op in OPERATORS if op.builtin))  # in table order
