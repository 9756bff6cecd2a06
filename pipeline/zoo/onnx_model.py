"""An ONNX file as a torch module the pipeline can factor, fine-tune and export again.

The graph becomes a `torch.fx.GraphModule`: every Conv an `nn.Conv2d`, every Gemm (or MatMul by a constant) an
`nn.Linear`, every BatchNormalization an `nn.BatchNorm2d` (so the methods, fine-tuning and BN re-estimation apply),
everything else the torch function that computes the same thing (the table: `pipeline.zoo.onnx_ops`). The module
is checked against ONNX Runtime running the user's own file; a mismatch names the first node whose output differs.

Written here rather than taken from onnx2torch: onnx2torch imports torchvision, and the torchvision wheels on PyPI
for torch 2.13 are CUDA builds that do not import beside the CPU torch this project pins (`operator torchvision::nms
does not exist`). onnx2pytorch and onnx-pytorch are unmaintained (last releases 2021). The ops a CNN for a
microcontroller uses are few, and one table of small functions covers them.
"""

import collections
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper, shape_inference
from torch import fx

from pipeline.errors import InputError
from pipeline.util import onnx_data_inputs
from pipeline.zoo.onnx_names import keras_names
from pipeline.zoo.onnx_ops import IMPORTERS, SUPPORTED, Builder, attrs, label

# The opsets this importer reads: torch exports 17-20, tf2onnx 13-18; before 11 Pad/Clip/Resize took attributes
OPSETS = range(11, 23)
CHECK_TOLERANCE = 1e-4  # of the output's largest magnitude: fp32 rounding over a few dozen layers stays far below


@dataclass(frozen=True)
class OnnxImport:
    """What reading an ONNX file found: the module, its one sample's input shape and how it matched ORT."""

    module: fx.GraphModule
    input_shape: tuple[int, int, int]
    normalised_inside: bool  # the graph's first ops shift and scale its input by constants (mean 0, std 1 outside)
    opset: int
    nodes: int
    max_abs_diff: float  # |module - ONNX Runtime on the file| on the check inputs

    def record(self) -> dict:
        return {"opset": self.opset, "nodes": self.nodes, "max_abs_diff": self.max_abs_diff,
                "normalised_inside": self.normalised_inside}


# ---- reading, checking and explaining ------------------------------------------------------------------------

def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX file, or one InputError saying what it is instead."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Model {str(path)!r} does not exist (expected an ONNX file)")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError and others for a file that is not a model
        raise InputError(f"Model {str(path)!r} is not a valid ONNX model ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'unreadable'})") from exc
    if len(model.graph.node) == 0:
        raise InputError(f"Model {str(path)!r} has no nodes; expected an ONNX graph")
    return model


def _opset(model: onnx.ModelProto, path) -> int:
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version not in OPSETS:
        raise InputError(f"Model {str(path)!r} uses ONNX opset {version}; this importer reads opsets "
                         f"{OPSETS.start}-{OPSETS.stop - 1} (re-export it, or convert it with "
                         "onnx.version_converter.convert_version)")
    return version


def _input_shape(model: onnx.ModelProto, path, given) -> tuple[int, int, int]:
    inputs = onnx_data_inputs(model.graph)
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise InputError(f"Model {str(path)!r} has {len(inputs)} inputs and {len(model.graph.output)} outputs; "
                         "expected one image-like input and one output of class scores")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise InputError(f"Model {str(path)!r}: input {inputs[0].name!r} has {len(dims)} axes; expected N x C x H x W")
    readers = [n for n in model.graph.node if inputs[0].name in n.input]
    if len(readers) == 1 and readers[0].op_type == "Transpose" and list(attrs(readers[0]).get("perm", [])) == [0, 3, 1, 2]:
        raise InputError(f"Model {str(path)!r} takes its input channels-last (N x H x W x C, transposed to NCHW by its "
                         f"first node); expected N x C x H x W: convert it with tf2onnx's --inputs-as-nchw "
                         f"{inputs[0].name} (from_keras/from_function: inputs_as_nchw=[{inputs[0].name!r}])")
    found = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[1:])
    if given is not None:
        given = tuple(int(v) for v in given)
        if any(f is not None and f != g for f, g in zip(found, given, strict=True)):
            raise InputError(f"Model {str(path)!r} takes C x H x W = {found}; INPUT_SHAPE= gave {given}")
        return given
    if None in found:
        named = "x".join(str(f) if f is not None else "?" for f in found)
        raise InputError(f"Model {str(path)!r} has dynamic input axes ({named}); give the shape of one sample "
                         "with INPUT_SHAPE=CxHxW (make) or --input-shape")
    return found


def _fixed(model: onnx.ModelProto, shape: tuple[int, int, int]) -> onnx.ModelProto:
    """A copy with batch 1 and the sample shape written in, shape inference run, and constants folded."""
    import onnxsim  # imports torch and onnxruntime itself: ~5 s, so only when an ONNX file is read

    model = _dequantized_weights(onnx.ModelProto.FromString(model.SerializeToString()))
    dims = onnx_data_inputs(model.graph)[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, (1, *shape), strict=True):
        dim.Clear()
        dim.dim_value = size
    try:
        simplified, ok = onnxsim.simplify(model, check_n=0)
        model = simplified if ok else model
    except Exception:  # onnxsim raises bare RuntimeErrors; the unsimplified graph may still import
        pass
    return shape_inference.infer_shapes(_conv_bias_adds(model), strict_mode=False)


def _conv_bias_adds(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each Add of a per-channel constant straight after a Conv that nothing else reads (what tf2onnx leaves of a
    Keras BatchNorm's shift; onnxsim keeps it) folded into the Conv's bias: the same function, and a graph whose
    channels a cut can follow (Torch-Pruning cuts a conv's bias with it, not a constant that broadcasts over its
    output, so MLPerf Tiny's ResNet-8 offered no channel cut). In place; returns the model."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = collections.Counter(i for n in graph.node for i in n.input)
    readers.update(o.name for o in graph.output)
    folded = []
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        for tensor, constant in (add.input, add.input[::-1]):
            conv = producer.get(tensor)
            if conv is None or conv.op_type != "Conv" or readers[tensor] != 1 or constant not in inits \
                    or conv.input[1] not in inits:
                continue
            channels = inits[conv.input[1]].dims[0]
            value = numpy_helper.to_array(inits[constant]).astype(np.float32)
            if value.shape not in ((1, channels, 1, 1), (channels, 1, 1)):
                continue  # not one value per output channel
            bias = numpy_helper.to_array(inits[conv.input[2]]) if len(conv.input) > 2 and conv.input[2] \
                else np.zeros(channels, np.float32)
            name = f"{conv.output[0]}__bias_with_{constant}"
            graph.initializer.append(numpy_helper.from_array((bias + value.reshape(channels)).astype(np.float32), name))
            del conv.input[2:]
            conv.input.append(name)
            conv.output[0] = add.output[0]
            folded.append(add)
            break
    for add in folded:
        graph.node.remove(add)
    return model


def _dequantized_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights stored int8 and dequantized when run (DequantizeLinear of constants: a float .tflite with compressed
    weights, MLPerf Tiny's DS-CNN among them) become the float constants they stand for; onnxsim leaves them."""
    inits = {i.name: i for i in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and all(i in inits for i in node.input if i):
            q, scale, *zero = (numpy_helper.to_array(inits[i]) for i in node.input if i)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if scale.ndim == 1 and q.ndim:
                shape[axis % q.ndim] = -1  # per-channel: scale and zero point run along `axis`
            zero_point = zero[0].astype(np.float32).reshape(shape) if zero else 0.0
            value = (q.astype(np.float32) - zero_point) * scale.astype(np.float32).reshape(shape)
            model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def _normalised_inside(graph: onnx.GraphProto) -> bool:
    """True when the input's first reader shifts or scales it by constants: the data then arrives unnormalised.
    Read on the file as given: simplification may fold the scale into the first conv."""
    consts = {i.name for i in graph.initializer}
    for node in graph.node:  # and what is computed from constants alone (tf2onnx leaves a Keras scale's Cast)
        if all(i in consts for i in node.input if i):
            consts.update(node.output)
    readers = [n for n in graph.node if onnx_data_inputs(graph)[0].name in n.input]
    return len(readers) == 1 and readers[0].op_type in ("Sub", "Add", "Mul", "Div") and \
        any(i in consts for i in readers[0].input)


def _build(model: onnx.ModelProto, path, keras: dict[str, str] | None) -> tuple[fx.GraphModule, dict[str, str]]:
    """The module (layers named after their Keras layers where `keras` knows them), and which fx node computes each
    ONNX tensor (for naming the node where they part)."""
    b = Builder(model.graph, keras=keras)
    for node in model.graph.node:
        if node.op_type == "Constant":
            b.consts[node.output[0]] = numpy_helper.to_array(attrs(node)["value"])
    b.values[onnx_data_inputs(model.graph)[0].name] = b.fx.placeholder("x")
    unsupported = [n for n in model.graph.node if n.op_type not in IMPORTERS and n.op_type != "Constant"]
    if unsupported:
        first = unsupported[0]
        raise InputError(f"Model {str(path)!r}: node {label(first)} has an operator this importer does not "
                         f"convert ({len(unsupported)} such nodes: "
                         f"{', '.join(sorted({n.op_type for n in unsupported}))}); supported: {', '.join(SUPPORTED)}")
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        if any(n and n not in b.values and n not in b.consts for n in node.input):
            raise InputError(f"Model {str(path)!r}: node {label(node)} reads a tensor no earlier node wrote; "
                             "expected a topologically sorted graph")
        if node.output[0] in b.consts or all(n in b.consts for n in node.input if n):
            continue  # folded by onnxsim already, or a constant expression left for the readers to take
        b.values[node.output[0]] = IMPORTERS[node.op_type](b, node)
    b.fx.output(b.values[model.graph.output[0].name])
    module = fx.GraphModule(b.root, b.fx, class_name="OnnxModel")
    return module.eval(), {name: value.name for name, value in b.values.items() if isinstance(value, fx.Node)}


def _session(model: bytes) -> ort.InferenceSession:
    """ONNX Runtime on the CPU (the model stage reads files before any later stage's helpers are in play)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise InputError(f"ONNX Runtime cannot run the model ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:300]}); expected a model it runs, the reference") from exc


def _check_inputs(shape: tuple[int, int, int], count: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(count, *shape)).astype(np.float32)


def _first_difference(fixed: onnx.ModelProto, module: fx.GraphModule, fx_names: dict[str, str], x: np.ndarray) -> str:
    """The first node (in graph order) whose output differs between the module and ONNX Runtime."""
    probe = onnx.ModelProto.FromString(fixed.SerializeToString())
    names = [o for n in probe.graph.node for o in n.output if o in fx_names]
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    sess = _session(probe.SerializeToString())
    wanted = [o.name for o in sess.get_outputs()]
    got = dict(zip(wanted, sess.run(wanted, {sess.get_inputs()[0].name: x[:1]}), strict=True))
    seen, failed = {}, []

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            try:
                seen[n.name] = result = super().run_node(n)
            except Exception:  # torch's own error for this node: where the module and the file part
                failed.append(n.name)
                raise
            return result

    with torch.no_grad():
        try:
            Recorder(module).run(torch.from_numpy(x[:1]))
        except Exception:
            pass  # `failed` names the node; the nodes before it are compared below
    by_output = {o: n for n in probe.graph.node for o in n.output}
    for name in names:
        if fx_names[name] in failed:
            return f"{label(by_output[name])}, which the module cannot compute"
        if fx_names[name] not in seen:
            continue  # a node after the failure, or one the module computes inside another
        expected, actual = got[name], seen[fx_names[name]].numpy()
        if expected.shape != actual.shape or not np.allclose(actual, expected, rtol=1e-3, atol=1e-4):
            node = by_output[name]
            diff = "shape " + str(actual.shape) if expected.shape != actual.shape else \
                f"{float(np.max(np.abs(actual - expected))):.3g}"
            return f"{label(node)}, output {name!r} differs by {diff}"
    return "no single node (the difference builds up along the graph)"


def import_onnx(path: str | os.PathLike, *, input_shape=None) -> OnnxImport:
    """Read an ONNX classifier into a torch module and check it computes what ONNX Runtime computes on the file."""
    original = read_onnx(path)
    opset = _opset(original, path)
    shape = _input_shape(original, path, input_shape)
    fixed = _fixed(original, shape)
    module, fx_names = _build(fixed, path, keras_names(original))
    x = _check_inputs(shape)
    sess = _session(Path(path).read_bytes())
    expected = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])
    with torch.no_grad():
        try:
            actual = module(torch.from_numpy(x)).numpy()
        except Exception as exc:  # torch's error for whichever node it could not compute
            raise InputError(f"Model {str(path)!r} converted, but the module does not run "
                             f"({str(exc).splitlines()[0]}); the first differing node: "
                             f"{_first_difference(fixed, module, fx_names, x)}") from exc
    diff = float(np.max(np.abs(actual - expected))) if actual.shape == expected.shape else math.inf
    if not diff <= CHECK_TOLERANCE * max(1.0, float(np.max(np.abs(expected)))):
        raise InputError(f"Model {str(path)!r}: the converted module differs from ONNX Runtime on the file by "
                         f"{diff:.3g} (expected at most {CHECK_TOLERANCE:g} of the output's scale); first "
                         f"differing node: {_first_difference(fixed, module, fx_names, x)}")
    return OnnxImport(module=module, input_shape=shape, normalised_inside=_normalised_inside(original.graph),
                      opset=opset, nodes=len(original.graph.node), max_abs_diff=diff)

