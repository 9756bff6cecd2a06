"""Properties over random conv configurations: ONNX MAC counts equal the torch count, and the TFLite
writer's int8 model matches ONNX Runtime's within one quantization step."""

import numpy as np
import pytest
import torch
from helpers import plain, tflm_steps_from_onnxruntime
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.compress.budget.macs import count
from pipeline.compress.decompose import decompose
from pipeline.onnx.cost import onnx_cost
from pipeline.onnx.export import export_onnx

pytestmark = [pytest.mark.runtime, pytest.mark.slow]
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def conv_nets(draw):
    cin = draw(st.integers(1, 6))
    depthwise = draw(st.booleans()) and cin > 1
    cout = cin * draw(st.integers(1, 2)) if depthwise else draw(st.integers(1, 8))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    layers = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
                        groups=cin if depthwise else 1, bias=draw(st.booleans()))]
    if draw(st.booleans()):
        layers.append(nn.ReLU())
    size = max(kernel[0] * dilation[0], kernel[1] * dilation[1]) + draw(st.integers(1, 8))
    torch.manual_seed(draw(st.integers(0, 1000)))
    return nn.Sequential(*layers).eval(), (cin, size, size + draw(st.integers(0, 3)))


@FEW
@given(case=conv_nets(), factor=st.sampled_from([None, "svd", "tucker2", "cp"]))
def test_onnx_graph_macs_equal_the_torch_count(case, factor, tmp_path):
    net, shape = case
    if factor and net[0].groups == 1:
        net, _ = decompose(net, settings=plain(method=factor, rank="0.5"), input_shape=shape, progress=False)
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    path, _ = export_onnx(net, tmp_path / "m.onnx", check_inputs=x)
    assert onnx_cost(path).macs == sum(c.macs for c in count(net, shape).values())


@FEW
@given(case=conv_nets())
def test_tflite_writer_matches_onnxruntime_within_one_step(case, tmp_path):
    net, shape = case
    x = np.random.default_rng(1).normal(size=(48, *shape)).astype(np.float32)
    assert tflm_steps_from_onnxruntime(net, x, tmp_path) <= 1.0 + 1e-4
