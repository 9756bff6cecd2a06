"""The importer's operator table: ONNX op type -> a function that adds the torch equivalent to an fx graph.

Every Conv becomes an `nn.Conv2d`, every Gemm (or MatMul by a constant) an `nn.Linear`, every BatchNormalization
an `nn.BatchNorm2d`, so the factorisation methods, fine-tuning and BN re-estimation apply; everything else is the
torch function that computes the same thing.
"""

import math
import operator
import re
from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import fx, nn

from pipeline.errors import InputError
from pipeline.util import NEAREST_FLOOR, onnx_resize_rule
from pipeline.util import onnx_attributes as attrs
from pipeline.zoo.onnx_names import MAX_CHARS, layer_name


class Builder:
    """Walks the ONNX graph in order, adding one fx node (or module call) per ONNX node."""

    def __init__(self, graph: onnx.GraphProto, *, keras: dict[str, str] | None = None):
        self.keras = keras  # node -> Keras layer for tf2onnx's files (`onnx_names.keras_names`), else None
        self.root = nn.Module()
        self.fx = fx.Graph()
        self.consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim)
                      for v in (*graph.input, *graph.value_info, *graph.output)}
        self.values: dict[str, fx.Node] = {}
        self.names: set[str] = set()

    def const(self, name: str, node) -> np.ndarray:
        if name not in self.consts:
            raise InputError(f"Node {label(node)} needs {name!r} to be a constant; it is computed at run time, "
                             "which this importer does not follow (simplify the file with onnxsim first)")
        return self.consts[name]

    def value(self, name: str) -> fx.Node:
        """The fx node of a tensor; a constant operand becomes a buffer of the module."""
        if name not in self.values:
            array = np.array(self.consts[name], copy=True)  # writable: torch shares the memory
            self.values[name] = self.fx.get_attr(self.attach(name, torch.from_numpy(array), buffer=True))
        return self.values[name]

    def attach(self, onnx_name: str, thing, *, buffer: bool = False) -> str:
        """Register a layer or buffer under a Python name derived from the ONNX name (unique, readable)."""
        base = re.sub(r"\W+", "_", onnx_name).strip("_") or "node"
        base = (f"n_{base}" if base[0].isdigit() else base)[:MAX_CHARS - 4]  # room for a '_k' that makes it unique
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        if buffer:
            self.root.register_buffer(name, thing)
        else:
            self.root.add_module(name, thing)
        return name

    def call(self, node, layer: nn.Module, x: fx.Node) -> fx.Node:
        return self.fx.call_module(self.attach(layer_name(node, self.keras), layer), (x,))

    def fn(self, function: Callable, *args, **kwargs) -> fx.Node:
        return self.fx.call_function(function, tuple(args), kwargs)


def label(node) -> str:
    return f"{node.name or node.output[0]!r} ({node.op_type})"


def _optional(node, index: int) -> str | None:
    return node.input[index] if len(node.input) > index and node.input[index] else None


# ---- the operator table: ONNX op type -> function(builder, node) returning the output fx node ---------------

IMPORTERS: dict[str, Callable] = {}


def _imports(*op_types: str):
    def register(function):
        for op_type in op_types:
            IMPORTERS[op_type] = function
        return function
    return register


def _symmetric(pads: list[int]) -> tuple[int, ...] | None:
    """ONNX pads (begin..., end...) as torch's symmetric padding, or None when begin and end differ."""
    half = len(pads) // 2
    return tuple(pads[:half]) if pads[:half] == pads[half:] else None


def _pad_first(b: Builder, x, pads: list[int], value: float = 0.0):
    half = len(pads) // 2
    torch_pads = [p for i in reversed(range(half)) for p in (pads[i], pads[i + half])]
    return b.fn(F.pad, x, torch_pads, value=value)


@_imports("Conv")
def _conv(b: Builder, node):
    a = attrs(node)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise InputError(f"Node {label(node)} uses auto_pad={a['auto_pad']!r}; expected explicit pads "
                         "(onnxsim or a re-export writes them)")
    weight = b.const(node.input[1], node)
    if weight.ndim != 4:
        raise InputError(f"Node {label(node)} is a {weight.ndim - 2}-D convolution; expected 2-D (NCHW)")
    bias = _optional(node, 2)
    cout, cin_g, kh, kw = weight.shape
    group = a.get("group", 1)
    pads = list(a.get("pads", [0, 0, 0, 0]))
    symmetric = _symmetric(pads)
    layer = nn.Conv2d(cin_g * group, cout, (kh, kw), stride=tuple(a.get("strides", [1, 1])),
                      padding=symmetric or 0, dilation=tuple(a.get("dilations", [1, 1])), groups=group,
                      bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(b.const(bias, node).astype(np.float32)))
    x = b.value(node.input[0])
    return b.call(node, layer, x if symmetric is not None else _pad_first(b, x, [0, 0, *pads[:2], 0, 0, *pads[2:]]))


def _linear(b: Builder, node, weight: np.ndarray, bias: np.ndarray | None):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.array(weight, np.float32)))
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(np.broadcast_to(bias, weight.shape[:1]).astype(np.float32)))
    return b.call(node, layer, b.value(node.input[0]))


@_imports("Gemm")
def _gemm(b: Builder, node):
    a = attrs(node)
    if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
        raise InputError(f"Node {label(node)} has transA/alpha/beta; expected a plain linear layer")
    weight = b.const(node.input[1], node)
    bias = _optional(node, 2)
    return _linear(b, node, weight if a.get("transB", 0) else weight.T, b.const(bias, node) if bias else None)


@_imports("MatMul")
def _matmul(b: Builder, node):
    weight = b.const(node.input[1], node)
    if weight.ndim != 2:
        raise InputError(f"Node {label(node)} multiplies by a {weight.ndim}-D tensor; expected a 2-D weight")
    return _linear(b, node, weight.T, None)


@_imports("BatchNormalization")
def _batch_norm(b: Builder, node):
    scale, shift, mean, var = (b.const(n, node).astype(np.float32) for n in node.input[1:5])
    layer = nn.BatchNorm2d(len(scale), eps=attrs(node).get("epsilon", 1e-5))
    with torch.no_grad():
        for tensor, values in ((layer.weight, scale), (layer.bias, shift), (layer.running_mean, mean),
                               (layer.running_var, var)):
            tensor.copy_(torch.from_numpy(values))
    return b.call(node, layer, b.value(node.input[0]))


_UNARY = {"Relu": F.relu, "Sigmoid": torch.sigmoid, "HardSwish": F.hardswish, "Identity": None, "Dropout": None}


@_imports(*_UNARY)
def _unary(b: Builder, node):
    function = _UNARY[node.op_type]
    x = b.value(node.input[0])
    return x if function is None else b.fn(function, x)


@_imports("HardSigmoid")
def _hard_sigmoid(b: Builder, node):
    a = attrs(node)
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    x = b.value(node.input[0])
    if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5:
        return b.fn(F.hardsigmoid, x)
    return b.fn(torch.clamp, b.fn(torch.add, b.fn(torch.mul, x, alpha), beta), 0.0, 1.0)


@_imports("Clip")
def _clip(b: Builder, node):
    a = attrs(node)
    low = float(b.const(node.input[1], node)) if _optional(node, 1) else a.get("min")
    high = float(b.const(node.input[2], node)) if _optional(node, 2) else a.get("max")
    return b.fn(torch.clamp, b.value(node.input[0]), low, high)


_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}


@_imports(*_BINARY)
def _binary(b: Builder, node):
    return b.fn(_BINARY[node.op_type], b.value(node.input[0]), b.value(node.input[1]))


@_imports("MaxPool", "AveragePool")
def _pool(b: Builder, node):
    a = attrs(node)
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        raise InputError(f"Node {label(node)} is a dilated pool; expected dilation 1")
    kernel = tuple(a["kernel_shape"])
    strides = tuple(a.get("strides", [1, 1]))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    symmetric = _symmetric(pads)
    x = b.value(node.input[0])
    ceil = bool(a.get("ceil_mode", 0))
    if node.op_type == "MaxPool":
        if symmetric is None:
            x, symmetric = _pad_first(b, x, [0, 0, *pads[:2], 0, 0, *pads[2:]], value=-math.inf), (0, 0)
        return b.fn(F.max_pool2d, x, kernel, strides, symmetric, ceil_mode=ceil)
    if symmetric is None:
        raise InputError(f"Node {label(node)} pads {pads} unevenly; expected symmetric pads for an average pool")
    return b.fn(F.avg_pool2d, x, kernel, strides, symmetric, ceil_mode=ceil,
                count_include_pad=bool(a.get("count_include_pad", 0)))


@_imports("GlobalAveragePool")
def _global_average(b: Builder, node):
    return b.fn(torch.mean, b.value(node.input[0]), (2, 3), keepdim=True)


@_imports("ReduceMean")
def _reduce_mean(b: Builder, node):
    a = attrs(node)
    axes = a.get("axes") or (list(b.const(node.input[1], node)) if _optional(node, 1) else None)
    if axes is None or 0 in axes:
        raise InputError(f"Node {label(node)} averages over the batch axis; expected per-sample axes")
    return b.fn(torch.mean, b.value(node.input[0]), tuple(int(v) for v in axes), keepdim=bool(a.get("keepdims", 1)))


@_imports("Flatten")
def _flatten(b: Builder, node):
    if attrs(node).get("axis", 1) != 1:
        raise InputError(f"Node {label(node)} flattens from axis {attrs(node)['axis']}; expected axis 1")
    return b.fn(torch.flatten, b.value(node.input[0]), 1)


@_imports("Reshape")
def _reshape(b: Builder, node):
    shape = [int(v) for v in b.const(node.input[1], node)]
    x = b.value(node.input[0])
    # the first axis is the batch: kept whatever size the file wrote for it, so the module takes any batch
    return b.fn(torch.reshape, x, (b.fn(operator.getitem, b.fn(getattr, x, "shape"), 0), *shape[1:]))


@_imports("Transpose")
def _transpose(b: Builder, node):
    perm = [int(v) for v in attrs(node)["perm"]]
    if perm[0] != 0:
        raise InputError(f"Node {label(node)} moves the batch axis (perm {perm}); expected it to stay first")
    return b.fn(torch.permute, b.value(node.input[0]), perm)


@_imports("Concat")
def _concat(b: Builder, node):
    return b.fn(torch.cat, [b.value(n) for n in node.input], attrs(node)["axis"])


@_imports("Softmax")
def _softmax(b: Builder, node):
    return b.fn(F.softmax, b.value(node.input[0]), attrs(node).get("axis", -1))


@_imports("Slice")
def _slice(b: Builder, node):
    starts, ends = b.const(node.input[1], node), b.const(node.input[2], node)
    axes = b.const(node.input[3], node) if _optional(node, 3) else np.arange(len(starts))
    steps = b.const(node.input[4], node) if _optional(node, 4) else np.ones(len(starts), np.int64)
    rank = b.ranks.get(node.input[0], 4)
    index = [slice(None)] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = int(axis) % rank
        if axis == 0 or step <= 0:
            raise InputError(f"Node {label(node)} slices the batch axis or steps backwards; expected neither")
        index[axis] = slice(int(start), int(min(end, 2**62)), int(step))
    return b.fn(operator.getitem, b.value(node.input[0]), tuple(index))


@_imports("Pad")
def _pad(b: Builder, node):
    mode = attrs(node).get("mode", b"constant")
    if mode not in (b"constant", "constant"):
        raise InputError(f"Node {label(node)} pads in mode {mode!r}; expected constant padding")
    pads = [int(v) for v in b.const(node.input[1], node)]
    value = float(b.const(node.input[2], node)) if _optional(node, 2) else 0.0
    return _pad_first(b, b.value(node.input[0]), pads, value)


@_imports("Resize")
def _resize(b: Builder, node):
    settings = onnx_resize_rule(node)
    if settings != NEAREST_FLOOR:
        raise InputError(f"Node {label(node)} resizes with {', '.join(settings)}; expected nearest with asymmetric "
                         "coordinates and floor (what torch's F.interpolate(mode='nearest') exports)")
    x = b.value(node.input[0])
    sizes = b.const(node.input[3], node) if _optional(node, 3) else None
    if sizes is not None and len(sizes):
        return b.fn(F.interpolate, x, size=tuple(int(v) for v in sizes[2:]), mode="nearest")
    scales = b.const(node.input[2], node)
    return b.fn(F.interpolate, x, scale_factor=tuple(float(v) for v in scales[2:]), mode="nearest")


@_imports("Squeeze", "Unsqueeze")
def _squeeze(b: Builder, node):
    axes = attrs(node).get("axes") or ([int(v) for v in b.const(node.input[1], node)] if _optional(node, 1) else None)
    if not axes or 0 in axes:
        raise InputError(f"Node {label(node)} has no axes or touches the batch axis; expected per-sample axes")
    x = b.value(node.input[0])
    step = torch.squeeze if node.op_type == "Squeeze" else torch.unsqueeze
    for axis in sorted(axes, reverse=node.op_type == "Squeeze"):
        x = b.fn(step, x, axis)
    return x


SUPPORTED = tuple(sorted(IMPORTERS))
