"""export -> simplify -> quantize -> emit on tiny models, and costs read back from the ONNX graph."""

import tempfile
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from helpers import plain
from torch import nn

from pipeline.compress.budget.macs import count
from pipeline.compress.decompose import decompose
from pipeline.errors import InputError, StageError
from pipeline.onnx.cost import onnx_cost
from pipeline.onnx.export import export_onnx
from pipeline.onnx.quantize import quantize_onnx
from pipeline.onnx.run import run, session
from pipeline.onnx.simplify import simplify_onnx
from pipeline.ort.emit import emit_onnxruntime
from pipeline.zoo.nets import CifarResNet, SeedNet
from targets import Quantization

pytestmark = pytest.mark.runtime


def inputs(n=32, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)


def ops(path):
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def factored_resnet():
    torch.manual_seed(0)
    net = CifarResNet(20).eval()
    return decompose(net, settings=plain(method="tucker2", rank="0.5", layers=("layer2.*",)), input_shape=(3, 32, 32), progress=False)


def test_export_matches_torch_and_onnx_macs_match_the_torch_count(tmp_path, factored_resnet):
    model, plan = factored_resnet
    path, diff = export_onnx(model, tmp_path / "f.onnx", check_inputs=inputs())
    assert diff < 1e-4
    cost = onnx_cost(path)
    assert cost.macs == sum(c.macs for c in count(model, (3, 32, 32)).values())
    assert cost.macs == plan.macs_after
    assert ops(path)["Conv"] == 19 + 2 * sum(1 for p in plan.layers if p.method == "tucker2")


def test_export_beyond_tolerance_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(StageError, match="differs from torch by"):
        export_onnx(SeedNet(), tmp_path / "s.onnx", check_inputs=inputs(4), tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_simplify_keeps_outputs_and_quantize_inserts_qdq_around_every_conv(tmp_path, factored_resnet):
    model, plan = factored_resnet
    raw, _ = export_onnx(model, tmp_path / "raw.onnx", check_inputs=inputs())
    simple, note = simplify_onnx(raw, tmp_path / "simple.onnx", check_inputs=inputs())
    assert note == ""
    assert ops(simple)["BatchNormalization"] == 0  # folded into the convs
    assert np.allclose(run(session(simple), inputs(8, 1)), run(session(raw), inputs(8, 1)), atol=1e-5)
    quantized = quantize_onnx(simple, tmp_path / "q.onnx", calibration=inputs(16, 2), settings=Quantization())
    counts = ops(quantized)
    expected_convs = 19 + 2 * sum(1 for p in plan.layers if p.method == "tucker2")
    assert counts["Conv"] == expected_convs
    assert counts["QuantizeLinear"] >= expected_convs and counts["DequantizeLinear"] >= 2 * expected_convs
    weights = [i for i in onnx.load(str(quantized)).graph.initializer if len(i.dims) == 4]
    assert weights and all(w.data_type == onnx.TensorProto.INT8 for w in weights)


def test_simplify_failure_keeps_the_unsimplified_graph_and_says_so(tmp_path, monkeypatch):
    raw, _ = export_onnx(SeedNet(), tmp_path / "raw.onnx", check_inputs=inputs(4))

    def broken(model, **kwargs):
        raise RuntimeError("[ShapeInferenceError] unsupported")

    monkeypatch.setattr("onnxsim.simplify", broken)
    out, note = simplify_onnx(raw, tmp_path / "s.onnx", check_inputs=inputs(4))
    assert "onnxsim failed, unsimplified graph kept: [ShapeInferenceError]" in note
    assert out.read_bytes() == raw.read_bytes()


def test_int8_model_tracks_float_on_a_trained_net(tmp_path):
    from pipeline.zoo import load_model

    spec = load_model("seednet")
    x = inputs(64, 3)
    fp32, _ = export_onnx(spec.module, tmp_path / "s.onnx", check_inputs=x)
    q = quantize_onnx(fp32, tmp_path / "q.onnx", calibration=x[:32], settings=Quantization(reduce_range=True))
    a, b = run(session(fp32), x), run(session(q), x)
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.85
    assert onnx_cost(q).macs == onnx_cost(fp32).macs == 651_720
    assert onnx_cost(q).params == onnx_cost(fp32).params == 62_006


def test_ort_format_model_loads_and_agrees_with_the_int8_onnx(tmp_path, monkeypatch):
    fp32, _ = export_onnx(SeedNet(), tmp_path / "s.onnx", check_inputs=inputs(8))
    q = quantize_onnx(fp32, tmp_path / "q.onnx", calibration=inputs(16), settings=Quantization())
    (tmp_path / "out").mkdir()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    files = emit_onnxruntime(tmp_path / "out", int8_onnx=q, fp32_onnx=fp32)
    assert list(scratch.iterdir()) == []  # neither the work folder nor its lock is left in the temp folder
    x = inputs(16, 5)
    assert np.array_equal(run(session(files["int8_ort"]), x), run(session(files["int8_onnx"]), x))
    config = files["ort_config"].read_text()
    assert "QLinearConv" in config and str(tmp_path) not in config


def test_peak_activation_hand_checked(tmp_path):
    # conv: input 64 B + conv output 128 B alive; relu: conv output 128 B + relu output 128 B -> peak 256 B
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
    path, _ = export_onnx(net, tmp_path / "p.onnx", check_inputs=np.ones((2, 1, 4, 4), np.float32))
    assert onnx_cost(path).peak_activation_bytes == 256


def test_a_corrupt_onnx_file_is_refused_readably(tmp_path):
    fp32, _ = export_onnx(SeedNet(), tmp_path / "s.onnx", check_inputs=inputs(2))
    fp32.write_bytes(fp32.read_bytes()[:1000])
    with pytest.raises(InputError, match="not a valid ONNX model"):
        onnx_cost(fp32)
    with pytest.raises(InputError, match="could not be loaded"):
        session(fp32)
