"""What a .tflite file is, read from its flatbuffer without running it: float (compressed like any model, through
its ONNX conversion), full int8 (measured as it is: its float weights are gone) or a mix of both (refused)."""

from dataclasses import dataclass
from pathlib import Path

from ai_edge_litert import schema_py_generated as tfl

from pipeline.errors import InputError

_NAMES = {code: name for name, code in vars(tfl.BuiltinOperator).items() if not name.startswith("_")}
_CONVERSIONS = ("QUANTIZE", "DEQUANTIZE")  # a full-int8 file's float edges


@dataclass(frozen=True)
class TfliteFile:
    precision: str  # "float" or "int8"
    input_shape: tuple[int, int, int]  # C x H x W of one sample (the file's is N x H x W x C)
    input_type: str  # "INT8", "FLOAT32", ...
    operators: tuple[str, ...]  # the builtins it runs, in order


def read_tflite(path: str | Path) -> TfliteFile:
    """The file's precision, input and operators; a file mixing float and integer operators is an error naming both."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Model {str(path)!r} does not exist (expected a .tflite file)")
    try:
        model = tfl.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
        graph = model.subgraphs[0]
    except Exception as exc:  # the flatbuffer reader's own errors say little
        raise InputError(f"Model {str(path)!r} is not a readable TFLite model ({type(exc).__name__})") from exc
    types = {v: k for k, v in vars(tfl.TensorType).items() if not k.startswith("_")}
    float_ops, int_ops, names = [], [], []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = _NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), f"custom {code.customCode!r}")
        names.append(name)
        data = [graph.tensors[i].type for i in op.inputs if i >= 0][:1]
        if name not in _CONVERSIONS:
            (float_ops if data == [tfl.TensorType.FLOAT32] else int_ops).append(name)
    if float_ops and int_ops:
        raise InputError(f"TFLite model {str(path)!r} mixes float operators ({len(float_ops)}: "
                         f"{', '.join(sorted(set(float_ops))[:4])}) and integer ones ({len(int_ops)}: "
                         f"{', '.join(sorted(set(int_ops))[:4])}); expected all float (to compress) or full int8 "
                         f"(to measure as it is)")
    tensor = graph.tensors[graph.inputs[0]]
    shape = [int(d) for d in tensor.shape]
    if len(shape) != 4:
        raise InputError(f"TFLite model {str(path)!r} takes an input of shape {shape}; expected N x H x W x C")
    return TfliteFile("int8" if int_ops else "float", (shape[3], shape[1], shape[2]), types.get(tensor.type, "?"),
                      tuple(names))
