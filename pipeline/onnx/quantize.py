"""The quantize stage: ONNX Runtime static int8 quantization, calibrated on training images."""

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from pipeline.onnx.integer_ops import pads_on_integers, spatial_means_as_pools
from pipeline.util import atomic_path
from targets import Quantization

_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}
_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}


# ONNX Runtime quantizes the ops of its registries; these it leaves in float unless asked, while TFLite Micro runs
# them in int8 (a normalising Sub/Div at the input, a hard-swish ORT's pre-processing splits into HardSigmoid * x,
# a mean over H and W: as a classifier's last node, with a reshape or squeeze after it, nothing else quantized it)
ALSO_QUANTIZED = ("Sub", "Div", "HardSwish", "HardSigmoid", "ReduceMean")
OP_TYPES = tuple(sorted({*QLinearOpsRegistry, *QDQRegistry, *ALSO_QUANTIZED}))
# TFLite's int8 LOGISTIC and SOFTMAX write [0, 1) as 256 steps from -128; calibrating them otherwise would need a
# requantize after each, and ORT and TFLite Micro would then round differently
UNIT_INTERVAL_OUTPUTS = ("Sigmoid", "Softmax")


def _unit_interval_overrides(model_path: Path, activation_type: str) -> dict:
    zero_point = np.array(-128 if activation_type == "int8" else 0, np.int8 if activation_type == "int8" else np.uint8)
    return {node.output[0]: [{"scale": np.array(1 / 256, np.float32), "zero_point": zero_point}]
            for node in onnx.load(str(model_path)).graph.node if node.op_type in UNIT_INTERVAL_OUTPUTS}


class ArrayReader(CalibrationDataReader):
    """Feeds calibration images one at a time; `rewind` lets the calibrator read them again."""

    def __init__(self, input_name: str, x: np.ndarray):
        self.input_name, self.x, self.position = input_name, x, 0

    def get_next(self):
        if self.position >= len(self.x):
            return None
        self.position += 1
        return {self.input_name: self.x[self.position - 1:self.position]}

    def rewind(self) -> None:
        self.position = 0


def quantize_onnx(model_path: str | os.PathLike, out: str | os.PathLike, *, calibration: np.ndarray,
                  settings: Quantization, input_name: str = "input") -> Path:
    """Pre-process (shape inference, fusions), then quantize statically with the profile's settings. A mean over
    H and W becomes the pool the runtime's int8 kernels run (`pipeline.onnx.integer_ops`): a GlobalAveragePool in a
    uint8 graph (ONNX Runtime's), an AveragePool sharing its input's scale in an int8 one (TFLite's); a uint8 graph
    also pads its integers."""
    for_onnxruntime = settings.activation_type == "uint8"
    with tempfile.TemporaryDirectory() as tmp, atomic_path(out) as target:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=False)
        graph = onnx.load(str(prepared))
        if spatial_means_as_pools(graph, shared_scale=not for_onnxruntime):
            onnx.save(graph, str(prepared))
        quantize_static(
            str(prepared), str(target), ArrayReader(input_name, calibration),
            quant_format=_FORMATS[settings.format], per_channel=settings.per_channel,
            activation_type=_TYPES[settings.activation_type], weight_type=_TYPES[settings.weight_type],
            calibrate_method=_METHODS[settings.calibration_method], reduce_range=settings.reduce_range,
            op_types_to_quantize=list(OP_TYPES),
            extra_options={"CalibTensorRangeSymmetric": False,
                           "TensorQuantOverrides": _unit_interval_overrides(prepared, settings.activation_type)},
        )
        if for_onnxruntime:
            graph = onnx.load(str(target))
            if pads_on_integers(graph):
                onnx.save(graph, str(target))
    return Path(out)
