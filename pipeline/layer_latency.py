"""Host latency of single layers and factored chains, as the target's int8 ONNX Runtime graph runs them.

Fewer MACs is not faster on ONNX Runtime (FINDINGS): thin 1x1 convs, odd channel counts and kx1/1xk
pairs cost reorders and kernel launches their MACs do not show. The allocation uses this table as a
second cost. Each layer is built as a one-node ONNX graph by hand (the exporter takes seconds per graph,
this takes milliseconds), quantized with the target's settings and timed at batch 1 on one thread.
"""

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pipeline.onnx_run import session
from pipeline.quantize import quantize_onnx


def _conv_node(conv: nn.Conv2d, name: str, source: str, inits: list) -> onnx.NodeProto:
    inits.append(numpy_helper.from_array(conv.weight.detach().numpy(), f"{name}.w"))
    inputs = [source, f"{name}.w"]
    if conv.bias is not None:
        inits.append(numpy_helper.from_array(conv.bias.detach().numpy(), f"{name}.b"))
        inputs.append(f"{name}.b")
    (ph, pw) = conv.padding
    return helper.make_node("Conv", inputs, [f"{name}.out"], name=name, kernel_shape=list(conv.kernel_size),
                            strides=list(conv.stride), dilations=list(conv.dilation), pads=[ph, pw, ph, pw],
                            group=conv.groups)


def _gemm_node(fc: nn.Linear, name: str, source: str, inits: list) -> onnx.NodeProto:
    inits.append(numpy_helper.from_array(fc.weight.detach().numpy(), f"{name}.w"))
    inputs = [source, f"{name}.w"]
    if fc.bias is not None:
        inits.append(numpy_helper.from_array(fc.bias.detach().numpy(), f"{name}.b"))
        inputs.append(f"{name}.b")
    return helper.make_node("Gemm", inputs, [f"{name}.out"], name=name, transB=1)


def layer_graph(module: nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto | None:
    """A Conv2d, a Linear, or a Sequential of them as an ONNX graph at batch 1; None for anything else."""
    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    nodes, inits, source = [], [], "input"
    for i, layer in enumerate(layers):
        if type(layer) is nn.Conv2d and not isinstance(layer.padding, str):
            nodes.append(_conv_node(layer, f"l{i}", source, inits))
        elif type(layer) is nn.Linear:
            nodes.append(_gemm_node(layer, f"l{i}", source, inits))
        else:
            return None
        source = nodes[-1].output[0]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, *input_shape])],
                              [helper.make_tensor_value_info(source, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def latency_ms(module: nn.Module, input_shape: tuple[int, ...], *, quantization, runs: int = 60,
               warmup: int = 10, seed: int = 0) -> float | None:
    """Median single-thread latency of `module` quantized with `quantization` (a targets.Quantization)."""
    graph = layer_graph(module, input_shape)
    if graph is None:
        return None
    rng = np.random.default_rng(seed)
    # post-ReLU-like inputs: the ranges calibration sees decide nothing about speed, only that they are sane
    calibration = np.maximum(rng.normal(size=(8, *input_shape)), 0).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "layer.onnx"
        onnx.save(graph, fp32)
        int8 = quantize_onnx(fp32, Path(tmp) / "layer.int8.onnx", calibration=calibration, settings=quantization)
        sess = session(int8, threads=1)
        feed = {"input": calibration[:1]}
        for _ in range(warmup):
            sess.run(None, feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
