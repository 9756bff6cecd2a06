"""Real networks, dense and factored with each method, convert to TFLite and run in TFLite Micro."""

import numpy as np
import pytest
from helpers import plain

from calib import balanced_subset, load_dataset, preprocess
from pipeline.compress.decompose import decompose
from pipeline.onnx.export import export_onnx
from pipeline.onnx.quantize import quantize_onnx
from pipeline.onnx.run import reference_session, run
from pipeline.onnx.simplify import simplify_onnx
from pipeline.tflm import interpreter as tflm
from pipeline.tflm.convert import convert_to_tflite
from pipeline.tflm.firmware import model_ops
from pipeline.zoo import load_model
from targets import Quantization

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["seednet", "resnet20"])
@pytest.mark.parametrize("method", [None, "svd", "channel-svd", "cp", "tucker2"])
def test_model_converts_and_tflm_follows_onnxruntime(model, method, cifar_dir, resnet20_weights, tmp_path):
    spec = load_model(model, resnet20_weights if model == "resnet20" else None)
    train, test = load_dataset("train", cifar_dir), load_dataset("test", cifar_dir)
    calib = preprocess(train.x[balanced_subset(train.y, 64)], mean=spec.mean, std=spec.std)
    idx = balanced_subset(test.y, 40)
    x = preprocess(test.x[idx], mean=spec.mean, std=spec.std)
    module = spec.module
    if method:
        module, plan = decompose(module, settings=plain(method=method, rank="energy:0.9" if method == "cp" else "0.25", exclude=("conv1",) if model == "resnet20" else ()), input_shape=spec.input_shape, progress=False)
        assert any(p.method == method for p in plan.layers)
    raw, _ = export_onnx(module, tmp_path / "m.onnx", check_inputs=x[:8])
    simple, _ = simplify_onnx(raw, tmp_path / "s.onnx", check_inputs=x[:8])
    q = quantize_onnx(simple, tmp_path / "q.onnx", calibration=calib, settings=Quantization(activation_type="int8"))
    model_bytes = convert_to_tflite(q, tmp_path / "m.tflite").read_bytes()
    if method == "cp":
        assert "DEPTHWISE_CONV_2D" in model_ops(model_bytes)
    io = tflm.io_quant(model_bytes)
    micro = tflm.dequantize_output(tflm.run_tflm(model_bytes, tflm.quantize_input(x, io)), io)
    ort = run(reference_session(q), x)  # the QDQ file's own arithmetic, not x86 fused kernels
    agreement, steps = (micro.argmax(1) == ort.argmax(1)).mean(), np.abs(micro - ort).max() / io.output_scale
    if method == "cp":
        # a CP chain's coarse intermediate scales amplify each one-step rounding difference between the
        # runtimes (one 1x1 conv turned 1 input step into 48 output steps): only the classes are compared
        assert agreement >= 0.75
    else:
        assert agreement >= 0.95 and steps <= 16
