"""The pads and spatial means ONNX Runtime would run in float between a DequantizeLinear and a QuantizeLinear, run in
integers instead: one tiny graph per case, outputs compared with the graph before the rewrite."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import pipeline.onnx.quantize as quantize
from pipeline.onnx.export import export_onnx
from pipeline.onnx.integer_ops import pads_on_integers, spatial_means_as_pools
from pipeline.onnx.quantize import quantize_onnx
from targets import Quantization

pytestmark = pytest.mark.runtime


def _run(model: onnx.ModelProto, x: np.ndarray, *, optimised: bool = True, saved_to: str = "") -> np.ndarray:
    options = ort.SessionOptions()
    if not optimised:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if saved_to:
        options.optimized_model_filepath = saved_to
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _qdq_pad(*, mode: str = "constant", value: float | None = None, zero_point: int = 3) -> onnx.ModelProto:
    """x (float) -> Q -> DQ -> Pad -> Q -> DQ -> y: what ORT's quantizer writes around a Pad (one scale and zero
    point on both sides, as it gives a Pad)."""
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "scale")
    zp = numpy_helper.from_array(np.array(zero_point, np.uint8), "zp")
    pads = numpy_helper.from_array(np.array([0, 2, 1, 1, 0, 2, 1, 1], np.int64), "pads")
    inits = [scale, zp, pads]
    pad_inputs = ["xd", "pads"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), "value"))
        pad_inputs.append("value")
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "scale", "zp"], ["xd"]),
             helper.make_node("Pad", pad_inputs, ["p"], mode=mode, name="pad"),
             helper.make_node("QuantizeLinear", ["p", "scale", "zp"], ["pq"]),
             helper.make_node("DequantizeLinear", ["pq", "scale", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "qdq_pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 7, 7])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _x(shape=(1, 4, 5, 5), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 9.0, size=shape).astype(np.float32)


@pytest.mark.parametrize("mode, value", [("constant", None), ("constant", 1.234), ("constant", -40.0), ("reflect", None),
                                         ("edge", None)])
def test_a_pad_between_dequantize_and_quantize_pads_the_integers_with_the_same_result(mode, value, tmp_path):
    model = _qdq_pad(mode=mode, value=value)
    x = _x()
    before = _run(model, x, optimised=False)
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert pads_on_integers(rewritten) == ["pad"]
    onnx.checker.check_model(rewritten, full_check=True)
    kinds = Counter(n.op_type for n in rewritten.graph.node)
    assert kinds == Counter({"QuantizeLinear": 1, "Pad": 1, "DequantizeLinear": 1})
    pad = next(n for n in rewritten.graph.node if n.op_type == "Pad")
    assert pad.input[0] == "xq"  # the integers
    for optimised in (False, True):
        assert np.array_equal(_run(rewritten, x, optimised=optimised), before)
    if value is not None:  # the padded border holds the value as QuantizeLinear rounds and saturates it
        expected = np.float32(0.05) * (np.clip(np.round(np.float32(value) / np.float32(0.05)) + 3, 0, 255) - 3)
        assert np.isclose(before[0, 0, 0, 0], expected)


def test_a_pad_whose_value_is_computed_at_run_time_or_whose_sides_differ_is_left_alone():
    model = _qdq_pad(value=1.0)
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "value"))
    model.graph.node.insert(0, helper.make_node("ReduceMax", ["x"], ["value"], keepdims=0))
    assert pads_on_integers(model) == []
    other = _qdq_pad()
    other.graph.initializer.append(numpy_helper.from_array(np.array(0.1, np.float32), "scale2"))
    other.graph.node[3].input[1] = "scale2"  # the Q after the Pad has a scale of its own
    other.graph.node[4].input[1] = "scale2"
    assert pads_on_integers(other) == []


@pytest.mark.parametrize("shared_scale", [False, True])
@pytest.mark.parametrize("keepdims", [1, 0])
def test_a_mean_over_height_and_width_becomes_a_pool(keepdims, shared_scale):
    axes = numpy_helper.from_array(np.array([-1, 2], np.int64), "axes")
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims, name="mean")
    graph = helper.make_graph([node], "mean", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [axes])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    x = _x((2, 4, 5, 6))
    before = _run(model, x)
    assert spatial_means_as_pools(model, shared_scale=shared_scale) == ["mean"]
    pool = "AveragePool" if shared_scale else "GlobalAveragePool"
    assert [n.op_type for n in model.graph.node] == [pool] + (["Flatten"] if not keepdims else [])
    if shared_scale:
        assert list(model.graph.node[0].attribute[0].ints) == [5, 6]  # the whole map
    assert not model.graph.initializer  # the axes went with the mean
    after = _run(model, x)
    assert after.shape == before.shape == ((2, 4, 1, 1) if keepdims else (2, 4))
    assert np.allclose(after, before, atol=1e-6)


def test_only_spatial_means_become_pools():
    channel = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1])], "c",
                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 5])],
                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = onnx.shape_inference.infer_shapes(helper.make_model(channel, opset_imports=[helper.make_opsetid("", 17)]))
    assert spatial_means_as_pools(model, shared_scale=True) == []
    pooled = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["y"], name="gap")], "g",
                               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 5])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 1, 1])])
    model = helper.make_model(pooled, opset_imports=[helper.make_opsetid("", 17)])
    assert spatial_means_as_pools(model, shared_scale=False) == []  # ORT's own global pool stays
    assert spatial_means_as_pools(model, shared_scale=True) == ["gap"]  # TFLite's needs the input's scale
    assert model.graph.node[0].op_type == "AveragePool"


class _ShortcutNet(nn.Module):
    """A downsampling residual block with CIFAR ResNet's option-A shortcut (a strided slice padded with zero
    channels) and a mean over H and W before the classifier."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = F.relu(self.conv(x) + shortcut)
        return self.fc(x.mean((2, 3)))


def test_a_uint8_model_runs_its_shortcut_pad_and_mean_in_integers_with_the_outputs_unchanged(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x = np.random.default_rng(1).normal(size=(16, 3, 16, 16)).astype(np.float32)
    fp32, _ = export_onnx(_ShortcutNet().eval(), tmp_path / "net.onnx", check_inputs=x)
    rewritten = quantize_onnx(fp32, tmp_path / "new.onnx", calibration=x, settings=Quantization())
    optimised = str(tmp_path / "optimised.onnx")
    got = _run(onnx.load(str(rewritten)), x, saved_to=optimised)
    kinds = Counter(n.op_type for n in onnx.load(optimised).graph.node)
    # ONNX Runtime's own kernels: the pad on uint8 data, the mean fused into QLinearGlobalAveragePool; the one
    # QuantizeLinear and DequantizeLinear left are the model's input and output
    assert kinds["QLinearGlobalAveragePool"] == 1 and kinds["ReduceMean"] == 0 and kinds["Pad"] == 1
    assert kinds["QuantizeLinear"] == kinds["DequantizeLinear"] == 1
    monkeypatch.setattr(quantize, "pads_on_integers", lambda graph: [])
    monkeypatch.setattr(quantize, "spatial_means_as_pools", lambda graph, **_: [])
    plain = quantize_onnx(fp32, tmp_path / "plain.onnx", calibration=x, settings=Quantization())
    kinds = Counter(n.op_type for n in onnx.load(str(plain)).graph.node)
    assert kinds["ReduceMean"] == 1  # the rewrite was really off
    assert np.allclose(got, _run(onnx.load(str(plain)), x), atol=1e-5)


def test_an_int8_model_averages_with_its_input_scale_and_keeps_the_pad_the_tflite_writer_reads(tmp_path):
    torch.manual_seed(0)
    x = np.random.default_rng(1).normal(size=(8, 3, 16, 16)).astype(np.float32)
    fp32, _ = export_onnx(_ShortcutNet().eval(), tmp_path / "net.onnx", check_inputs=x)
    q = onnx.load(str(quantize_onnx(fp32, tmp_path / "q.onnx", calibration=x,
                                    settings=Quantization(activation_type="int8"))))
    producer = {o: n for n in q.graph.node for o in n.output}
    pad = next(n for n in q.graph.node if n.op_type == "Pad")
    assert producer[pad.input[0]].op_type == "DequantizeLinear"
    pool = next(n for n in q.graph.node if n.op_type == "AveragePool")
    reader = next(n for n in q.graph.node if n.input and n.input[0] == pool.output[0])
    assert reader.op_type == "QuantizeLinear" and list(reader.input[1:]) == list(producer[pool.input[0]].input[1:])
    assert not any(n.op_type in ("ReduceMean", "GlobalAveragePool") for n in q.graph.node)
