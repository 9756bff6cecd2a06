"""Read-only views of a quantized (QDQ) ONNX graph: constants, aliases through Q/DQ pairs, and the scale and
zero point of each tensor. What the TFLite writer reads; it writes nothing."""

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.errors import StageError
from pipeline.tflm.flatbuffer import Quant
from pipeline.util import onnx_attributes as attrs

QDQ = {"QuantizeLinear", "DequantizeLinear"}


class QdqGraph:
    """Read-only views of the QDQ graph: constants, aliases through Q/DQ, and quantization of each tensor."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for node in g.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(attrs(node)["value"])
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
        return self.consts[node.input[0]], np.atleast_1d(self.consts[node.input[1]]), np.atleast_1d(zp), attrs(node).get("axis", 1)

    def is_constant(self, name: str) -> bool:
        """A constant, directly or through its DequantizeLinear; else an activation computed at run time."""
        return self.canonical(name) in self.consts or self.weight(name) is not None

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
