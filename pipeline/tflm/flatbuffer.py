"""A TFLite flatbuffer assembled through the schema's object API (`ai_edge_litert.schema_py_generated`).

Hand-written because no TensorFlow-free library writes .tflite files; the object API does the byte layout.
"""

from dataclasses import dataclass, field

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as tfl

TYPES = {np.dtype(np.int8): tfl.TensorType.INT8, np.dtype(np.int32): tfl.TensorType.INT32,
         np.dtype(np.float32): tfl.TensorType.FLOAT32, np.dtype(np.uint8): tfl.TensorType.UINT8}


@dataclass(frozen=True)
class Quant:
    """Affine quantization: real = scale * (q - zero_point), per tensor or per channel along `axis`."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    def same_as(self, other: "Quant") -> bool:
        return (self.zero_point == other.zero_point
                and np.allclose(self.scale, other.scale, rtol=1e-6, atol=0))


@dataclass
class FlatGraph:
    """One subgraph being assembled: tensors, constant buffers, operators and their opcode table."""

    tensors: list = field(default_factory=list)
    buffers: list = field(default_factory=lambda: [tfl.BufferT()])  # buffer 0: the empty sentinel
    operators: list = field(default_factory=list)
    opcodes: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    def _tensor(self, name: str, shape, dtype, quant: Quant | None, buffer: int) -> int:
        t = tfl.TensorT()
        t.name, t.shape, t.type, t.buffer = name, np.asarray(shape, np.int32), TYPES[np.dtype(dtype)], buffer
        if quant is not None:
            q = tfl.QuantizationParametersT()
            q.scale = np.asarray(quant.scale, np.float32)
            q.zeroPoint = np.asarray(quant.zero_point, np.int64)
            q.quantizedDimension = quant.axis
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def constant(self, name: str, array: np.ndarray, quant: Quant | None = None) -> int:
        buffer = tfl.BufferT()
        buffer.data = np.frombuffer(np.ascontiguousarray(array).tobytes(), np.uint8)
        self.buffers.append(buffer)
        return self._tensor(name, array.shape, array.dtype, quant, len(self.buffers) - 1)

    def activation(self, name: str, shape, quant: Quant, dtype=np.int8) -> int:
        return self._tensor(name, shape, dtype, quant, 0)

    def op(self, code: int, inputs: list[int], outputs: list[int], options_type: int = 0, options=None) -> tfl.OperatorT:
        if code not in self.opcodes:
            self.opcodes[code] = len(self.opcodes)
        op = tfl.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = self.opcodes[code], np.asarray(inputs, np.int32), np.asarray(outputs, np.int32)
        op.builtinOptionsType, op.builtinOptions = options_type, options
        self.operators.append(op)
        return op

    def serialize(self, description: str = "cnn-deploy") -> bytes:
        subgraph = tfl.SubGraphT()
        subgraph.tensors, subgraph.operators, subgraph.name = self.tensors, self.operators, "main"
        subgraph.inputs, subgraph.outputs = np.asarray(self.inputs, np.int32), np.asarray(self.outputs, np.int32)
        model = tfl.ModelT()
        model.version, model.description, model.subgraphs, model.buffers = 3, description, [subgraph], self.buffers
        codes = []
        for code in sorted(self.opcodes, key=self.opcodes.get):
            oc = tfl.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
            codes.append(oc)
        model.operatorCodes = codes
        builder = flatbuffers.Builder(1 << 16)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def builtin_name(code: int) -> str:
    return next(k for k, v in vars(tfl.BuiltinOperator).items() if v == code and not k.startswith("_"))
