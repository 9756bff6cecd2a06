"""A TFLite flatbuffer assembled through the schema's object API (`ai_edge_litert.schema_py_generated`).

Hand-written because no TensorFlow-free library writes .tflite files; the object API does the byte layout.
"""

from dataclasses import dataclass, field

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as tfl

from pipeline.errors import StageError
from pipeline.memory_plan import best_plan, greedy_plan, overlaps

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
    plan: "OfflinePlan | None" = None  # set by `serialize`

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
        self.plan = offline_plan(subgraph, self.buffers)
        if self.plan is not None:  # TFLM places the activations where this says, not by its own greedy rule
            metadata = tfl.MetadataT()
            metadata.name, metadata.buffer = OFFLINE_PLAN, len(self.buffers)
            buffer = tfl.BufferT()
            buffer.data = np.frombuffer(np.asarray([1, 0, len(self.tensors), *self.plan.offsets], np.int32).tobytes(),
                                        np.uint8)
            model.buffers = [*self.buffers, buffer]
            model.metadata = [metadata]
        builder = flatbuffers.Builder(1 << 16)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


OFFLINE_PLAN = "OfflineMemoryAllocation"  # TFLM's metadata name for offline-planned tensor offsets
ALIGN = 16  # TFLM aligns every planned buffer
ITEMSIZE = {tfl.TensorType.INT8: 1, tfl.TensorType.UINT8: 1, tfl.TensorType.INT16: 2, tfl.TensorType.INT32: 4,
            tfl.TensorType.FLOAT32: 4}


@dataclass(frozen=True)
class OfflinePlan:
    """Where each tensor lives in the arena (-1: a constant, or left to TFLM), and what it needs."""

    offsets: tuple[int, ...]
    bytes: int  # the planned activations' end
    tflm_bytes: int  # what TFLM's own greedy rule would need for them
    order: str  # which placement order found it


def lifetimes(subgraph: tfl.SubGraphT, buffers: list) -> dict[int, list[int]]:
    """Each activation tensor's [bytes (aligned), first, last] as TFLM's allocation info marks them: inputs at 0,
    operator k (from 1) creates its outputs and last uses its inputs, the outputs live to the last operator."""
    constant = {i for i, t in enumerate(subgraph.tensors) if buffers[t.buffer].data is not None
                and len(buffers[t.buffer].data)}
    found: dict[int, list[int]] = {}

    def touch(i: int, scope: int) -> None:
        if i < 0 or i in constant:
            return
        t = subgraph.tensors[i]
        size = int(np.prod(t.shape)) * ITEMSIZE.get(t.type, 4)
        entry = found.setdefault(i, [-(-size // ALIGN) * ALIGN, scope, scope])
        entry[2] = max(entry[2], scope)

    for i in subgraph.inputs:
        touch(int(i), 0)
    for k, op in enumerate(subgraph.operators, start=1):
        for i in op.outputs:
            touch(int(i), k)
        for i in op.inputs:
            touch(int(i), k)
    for i in subgraph.outputs:
        touch(int(i), len(subgraph.operators))
    return found


def offline_plan(subgraph: tfl.SubGraphT, buffers: list) -> OfflinePlan | None:
    """The best placement `memory_plan.best_plan` finds for the activations, when it needs less than TFLM's own
    rule would; None otherwise (TFLM then plans as usual). Checked: no two tensors alive together overlap."""
    found = lifetimes(subgraph, buffers)
    ids = sorted(found)  # creation order is tensor order: the writer adds each tensor as its operator is written
    planned = [tuple(found[i]) for i in ids]
    name, offsets, size = best_plan(planned)
    greedy = greedy_plan(planned)
    if size >= greedy:
        return None
    clash = overlaps(planned, offsets)
    if clash:
        raise StageError(f"offline memory plan ({name}) overlaps tensors {clash[:3]} alive together")
    full = [-1] * len(subgraph.tensors)
    for i, offset in zip(ids, offsets, strict=True):
        full[i] = offset
    return OfflinePlan(tuple(full), size, greedy, name)


def builtin_name(code: int) -> str:
    return next(k for k, v in vars(tfl.BuiltinOperator).items() if v == code and not k.startswith("_"))


def opcode_name(code) -> str:
    """An operator code's builtin name: files written before schema 3a keep codes below 127 only in
    `deprecated_builtin_code` (MLPerf Tiny's reference models among them)."""
    return builtin_name(max(code.builtinCode, code.deprecatedBuiltinCode))
