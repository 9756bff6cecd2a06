"""Host latency of single layers and factored chains, as the target's int8 ONNX Runtime graph runs them.

Fewer MACs is not faster on ONNX Runtime (FINDINGS): thin 1x1 convs, odd channel counts and kx1/1xk
pairs cost reorders and kernel launches their MACs do not show. The allocation uses this table as a
second cost. Each layer is built as a one-node ONNX graph by hand (the exporter takes seconds per graph,
this takes milliseconds), quantized with the target's settings and timed at batch 1 on one thread.
"""

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pipeline.onnx.chain import to_onnx
from pipeline.onnx.quantize import quantize_onnx
from pipeline.ort.measure import latency_ms
from pipeline.util import host_machine
from targets import Quantization


def _inputs(layer: nn.Module, name: str, source: str, inits: list) -> list[str]:
    """The node's input names; its weight (and bias) become initializers."""
    inputs = [source]
    for kind, tensor in (("w", layer.weight), ("b", layer.bias)):
        if tensor is not None:
            inits.append(numpy_helper.from_array(tensor.detach().numpy(), f"{name}.{kind}"))
            inputs.append(f"{name}.{kind}")
    return inputs


def _node(layer: nn.Module, name: str, source: str, inits: list) -> onnx.NodeProto:
    inputs = _inputs(layer, name, source, inits)
    if isinstance(layer, nn.Linear):
        return helper.make_node("Gemm", inputs, [f"{name}.out"], name=name, transB=1)
    (ph, pw) = layer.padding
    return helper.make_node("Conv", inputs, [f"{name}.out"], name=name, kernel_shape=list(layer.kernel_size),
                            strides=list(layer.stride), dilations=list(layer.dilation), pads=[ph, pw, ph, pw],
                            group=layer.groups)


def layer_graph(module: nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto | None:
    """A Conv2d, a Linear, or a Sequential of them as an ONNX graph at batch 1; None for anything else."""
    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    nodes, inits, source = [], [], "input"
    for i, layer in enumerate(layers):
        if not (type(layer) is nn.Linear or (type(layer) is nn.Conv2d and not isinstance(layer.padding, str))):
            return None
        nodes.append(_node(layer, f"l{i}", source, inits))
        source = nodes[-1].output[0]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, *input_shape])],
                              [helper.make_tensor_value_info(source, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def synthetic_inputs(input_shape: tuple[int, ...], count: int, *, seed: int = 0) -> np.ndarray:
    """Post-ReLU-like inputs: the ranges calibration sees decide nothing about speed, only that they are sane."""
    return np.maximum(np.random.default_rng(seed).normal(size=(count, *input_shape)), 0).astype(np.float32)


def quantized_layer(module: nn.Module, input_shape: tuple[int, ...], folder: Path, *, quantization: Quantization,
                    seed: int = 0) -> tuple[Path, np.ndarray] | None:
    """`module` as a one-layer int8 ONNX file in `folder`, and the inputs it was calibrated on; None for what
    the graph cannot hold."""
    graph = layer_graph(module, input_shape)
    if graph is None:
        return None
    calibration = synthetic_inputs(input_shape, 8, seed=seed)
    onnx.save(graph, folder / "layer.onnx")
    return quantize_onnx(folder / "layer.onnx", folder / "layer.int8.onnx", calibration=calibration,
                         settings=quantization), calibration


def quantized_model(module: nn.Module, input_shape: tuple[int, ...], folder: Path, *, quantization: Quantization,
                    calibration: np.ndarray | None = None, sample: np.ndarray | None = None) -> tuple[Path, np.ndarray]:
    """The whole model exported, simplified and quantized as the deploy does it (`calibration`: the deploy's own,
    so the bytes and every cache keyed by them are the deploy's; else synthetic), and the input to count it on."""
    calibration = calibration if calibration is not None else synthetic_inputs(input_shape, 64)
    pair = to_onnx(module, folder, "dense", check_inputs=calibration[:8], calibration=calibration,
                   quantization=quantization)
    return pair.int8, sample if sample is not None else calibration[0]


def layer_latency_ms(module: nn.Module, input_shape: tuple[int, ...], *, quantization: Quantization, runs: int = 60,
                     warmup: int = 10, seed: int = 0) -> float | None:
    """Median single-thread latency of `module` quantized with `quantization`; None for what the graph cannot hold."""
    with tempfile.TemporaryDirectory() as tmp:
        made = quantized_layer(module, input_shape, Path(tmp), quantization=quantization, seed=seed)
        if made is None:
            return None
        int8, calibration = made
        return latency_ms(int8, sample=calibration[0], runs=runs, warmup=warmup)


class OrtLayerLatency:
    """The allocation's second cost on an ONNX Runtime target without a [board] core: `layer_latency_ms` with the
    target's int8 settings on this host. Not the board's figure, so it only weighs (`latency_weight`) and never
    counts a budget. Its fingerprint keys the sensitivity cache: the same settings on another host are timed again."""

    board = False

    def __init__(self, quantization: Quantization):
        self.quantization = quantization
        self.unit = "ms on this host (ONNX Runtime, one thread)"
        self.fingerprint = {**dataclasses.asdict(quantization), "host": host_machine()}

    def layers(self, items: list[tuple[nn.Module, tuple[int, ...]]]) -> list[float | None]:
        return [layer_latency_ms(module, shape, quantization=self.quantization) for module, shape in items]
