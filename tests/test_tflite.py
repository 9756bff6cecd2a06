"""The TF-free TFLite writer, per operator: TFLite Micro must match ONNX Runtime's QDQ model within one
quantization step, and refuse what it cannot express before writing anything."""

import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ai_edge_litert import schema_py_generated as tfl
from torch import nn

from pipeline.errors import StageError
from pipeline.onnx.export import export_onnx
from pipeline.onnx.quantize import quantize_onnx
from pipeline.onnx.run import reference_session, run
from pipeline.onnx.simplify import simplify_onnx
from pipeline.tflm import interpreter as tflm
from pipeline.tflm.convert import convert_to_tflite
from pipeline.tflm.firmware import emit_mcu, model_ops
from pipeline.zoo.nets import OptionAShortcut
from targets import Quantization

pytestmark = pytest.mark.runtime
INT8 = Quantization(activation_type="int8")


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return F.relu(self.a(x) + self.b(x))


class Double(nn.Module):  # ADD alone: both operands are the quantized input
    def forward(self, x):
        return x + x


class Shortcut(nn.Module):  # ResNet option A: strided slice plus zero-padded channels
    def __init__(self):
        super().__init__()
        self.conv, self.short = nn.Conv2d(4, 8, 3, stride=2, padding=1), OptionAShortcut(4)

    def forward(self, x):
        return self.conv(x) + self.short(x)


class Head(nn.Module):  # flatten of a 4x4 map: its NCHW order must be folded into the weights
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(4, 6, 3, padding=1), nn.Linear(6 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1))


class GlobalMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


class SqueezeExcite(nn.Module):  # MobileNetV3: hard-swish, then channel weights from a sigmoid
    def __init__(self):
        super().__init__()
        self.conv, self.down, self.up = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)

    def forward(self, x):
        y = F.hardswish(self.conv(x))
        return y * torch.sigmoid(self.up(F.relu(self.down(F.adaptive_avg_pool2d(y, 1)))))


class Fire(nn.Module):  # SqueezeNet: two expand branches at different scales, concatenated
    def __init__(self):
        super().__init__()
        self.squeeze, self.e1, self.e3 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x):
        z = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.e1(z)), F.relu(self.e3(z))], 1)


class ChannelShuffle(nn.Module):  # ShuffleNet: split the channels into groups and transpose them
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.shape
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class Normalised(nn.Module):  # normalisation inside the graph, then a BatchNorm with no conv before it
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1), self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(-2, 2), self.bn.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.conv(self.bn((x - 0.5) / 0.25))


class Relu6Shared(nn.Module):  # the conv's output has a second reader, so the ReLU6 stays a node
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return F.relu6(y) + y


class Upsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=2, mode="nearest")


class SoftmaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        return F.softmax(self.fc(x.flatten(1)), 1)


class SqueezeUnsqueeze(nn.Module):  # a Keras-style head: squeeze after the mean, unsqueeze before a 1x1 conv
    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8, 6), nn.Conv2d(6, 5, 1)

    def forward(self, x):
        y = self.conv(x).mean((2, 3), keepdim=True).squeeze(3).squeeze(2)
        return self.out(self.fc(y).unsqueeze(-1).unsqueeze(-1))


class ConvHead(nn.Module):
    """SqueezeNet's own ending: a 1x1 conv classifier, global average pooling, then a shape op (or nothing) as the
    graph's last node. ORT's quantizer left the mean in float there, so the output had no scale for TFLite."""

    def __init__(self, ending: str):
        super().__init__()
        self.conv, self.classifier, self.ending = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 5, 1), ending

    def forward(self, x):
        y = self.classifier(F.relu(self.conv(x)))
        if self.ending == "mean":  # ReduceMean with keepdims=0: no shape op at all
            return y.mean((2, 3))
        y = F.adaptive_avg_pool2d(y, 1)
        if self.ending == "flatten":
            return torch.flatten(y, 1)
        if self.ending == "reshape":
            return y.reshape(y.shape[0], -1)
        return y.squeeze(3).squeeze(2)


# name: (module, TFLite ops it must become, tolerance in output steps). Each op that requantizes (conv,
# linear, add, mean, average pool) may round one step differently from ORT; max pool, pad, slice and
# reshape move values unchanged. So a chain of n requantizing ops is held to n steps.
# the modules' weights come from seed 0, whatever this process drew before importing this file (an xdist worker
# imports other test files first, and some draw at import): the step counts below are those of these weights
_import_rng = torch.random.get_rng_state()
torch.manual_seed(0)
CASES = {
    "conv_same": (nn.Conv2d(4, 8, 3, padding=1), {"CONV_2D"}, 1),
    "conv_explicit_pad": (nn.Conv2d(4, 8, 3, padding=2), {"CONV_2D", "PAD"}, 1),
    "conv_stride2_asymmetric": (nn.Conv2d(4, 8, 3, stride=2, padding=1), {"CONV_2D", "PAD"}, 1),
    "conv_dilated_relu": (nn.Sequential(nn.Conv2d(4, 8, 3, dilation=2), nn.ReLU()), {"CONV_2D"}, 1),
    "depthwise": (nn.Conv2d(4, 4, (3, 1), padding=(1, 0), groups=4), {"DEPTHWISE_CONV_2D"}, 1),
    "depthwise_multiplier": (nn.Conv2d(4, 8, (1, 3), padding=(0, 1), groups=4), {"DEPTHWISE_CONV_2D"}, 1),
    "add": (Double(), {"ADD"}, 1),
    # each conv's one-step rounding reaches the add at its own scale, about twice the ReLU'd output's
    "residual_add": (Residual(), {"CONV_2D", "ADD"}, 3),
    "option_a_shortcut": (Shortcut(), {"CONV_2D", "ADD", "PAD", "STRIDED_SLICE"}, 2),
    "maxpool_flatten_linear": (Head(), {"CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED"}, 2),
    "avgpool": (nn.Sequential(nn.Conv2d(4, 4, 1), nn.AvgPool2d(2)), {"CONV_2D", "AVERAGE_POOL_2D"}, 2),
    # a mean over H and W is written as a pool sharing its input's scale (pipeline/onnx/integer_ops.py)
    "global_mean": (GlobalMean(), {"CONV_2D", "AVERAGE_POOL_2D", "RESHAPE", "FULLY_CONNECTED"}, 3),
    # hard-swish, sigmoid and mul each requantize; the sigmoid's 1/256 grid is coarse against the output's
    "squeeze_excite": (SqueezeExcite(), {"CONV_2D", "HARD_SWISH", "AVERAGE_POOL_2D", "LOGISTIC", "MUL"}, 3),
    # one branch is requantized to the concat's scale first: one more rounding on that branch
    "concat": (Fire(), {"CONV_2D", "QUANTIZE", "CONCATENATION"}, 2),
    "channel_shuffle": (ChannelShuffle(), {"CONV_2D", "RESHAPE", "TRANSPOSE"}, 1),
    # sub, div-as-mul, the batch norm as a depthwise 1x1 and the conv: four requantizing ops
    "normalise_batchnorm": (Normalised(), {"SUB", "MUL", "DEPTHWISE_CONV_2D", "CONV_2D"}, 4),
    "relu6_standalone": (Relu6Shared(), {"CONV_2D", "RELU6", "QUANTIZE", "ADD"}, 3),
    "resize_nearest": (Upsample(), {"CONV_2D", "RESIZE_NEAREST_NEIGHBOR"}, 1),
    "softmax": (SoftmaxHead(), {"RESHAPE", "FULLY_CONNECTED", "SOFTMAX"}, 2),
    "squeeze_unsqueeze": (SqueezeUnsqueeze(), {"CONV_2D", "AVERAGE_POOL_2D", "RESHAPE", "FULLY_CONNECTED"}, 4),
    # the graph endings real classifiers have: the last node moves values unchanged (a keepdims-free mean becomes a
    # pool and a flatten)
    **{f"conv_head_{ending}": (ConvHead(ending), {"CONV_2D", "AVERAGE_POOL_2D", "RESHAPE"}, 3)
       for ending in ("flatten", "reshape", "squeeze", "mean")},
}
torch.random.set_rng_state(_import_rng)


def quantized(module, tmp_path, shape=(4, 16, 16), seed=0):
    torch.manual_seed(seed)
    module = module.eval()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, *shape)).astype(np.float32)
    raw, _ = export_onnx(module, tmp_path / "m.onnx", check_inputs=x[:8])
    simple, _ = simplify_onnx(raw, tmp_path / "s.onnx", check_inputs=x[:8])
    return quantize_onnx(simple, tmp_path / "q.onnx", calibration=x[:32], settings=INT8), x[32:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_tflm_matches_onnxruntime_qdq_within_one_step_per_requantizing_op(case, tmp_path):
    module, expected_ops, tolerance = CASES[case]
    q_onnx, x = quantized(module, tmp_path)
    model = convert_to_tflite(q_onnx, tmp_path / "m.tflite").read_bytes()
    assert set(model_ops(model)) == expected_ops
    io = tflm.io_quant(model)
    x_int8 = tflm.quantize_input(x, io)
    x_seen = (x_int8.astype(np.float32) - io.input_zero_point) * io.input_scale  # both runtimes see the same input
    ort = run(reference_session(q_onnx), x_seen.transpose(0, 3, 1, 2) if x_seen.ndim == 4 else x_seen)
    micro = tflm.dequantize_output(tflm.run_tflm(model, x_int8), io)
    if ort.ndim == 4:
        ort = ort.transpose(0, 2, 3, 1)
    steps = np.abs(micro.reshape(ort.shape) - ort) / io.output_scale
    assert steps.max() <= tolerance + 1e-4, f"{case}: {steps.max():.2f} steps"
    litert = tflm.dequantize_output(tflm.run_litert(model, x_int8), io)
    assert (np.abs(litert.reshape(ort.shape) - ort) / io.output_scale).max() <= tolerance + 1e-4


def test_unsupported_operator_fails_naming_the_node_before_writing(tmp_path):
    q_onnx, _ = quantized(nn.Sequential(nn.Conv2d(4, 4, 1), nn.Tanh()), tmp_path)
    with pytest.raises(StageError, match=r"node '.*' \(Tanh\) has no TFLite Micro builtin"):
        convert_to_tflite(q_onnx, tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


def test_uint8_activations_are_refused_with_the_setting_to_change(tmp_path):
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(16, 4, 8, 8)).astype(np.float32)
    raw, _ = export_onnx(nn.Conv2d(4, 4, 1).eval(), tmp_path / "m.onnx", check_inputs=x)
    q = quantize_onnx(raw, tmp_path / "q.onnx", calibration=x, settings=Quantization(activation_type="uint8"))
    with pytest.raises(StageError, match='activation_type = "int8"'):
        convert_to_tflite(q, tmp_path / "m.tflite")


def test_no_transpose_is_left_and_weights_are_nhwc(tmp_path):
    from ai_edge_litert import schema_py_generated as tfl

    q_onnx, _ = quantized(Head(), tmp_path)
    model = tfl.ModelT.InitFromPackedBuf(convert_to_tflite(q_onnx, tmp_path / "m.tflite").read_bytes(), 0)
    assert "TRANSPOSE" not in model_ops(convert_to_tflite(q_onnx, tmp_path / "m.tflite").read_bytes())
    shapes = {t.name.decode(): list(t.shape) for t in model.subgraphs[0].tensors}
    assert [s for n, s in shapes.items() if n.endswith("_weights")][0] == [6, 3, 3, 4]  # O, H, W, I
    graph = model.subgraphs[0]
    assert list(graph.tensors[graph.inputs[0]].shape) == [1, 16, 16, 4]
    assert graph.tensors[graph.inputs[0]].type == tfl.TensorType.INT8


def test_firmware_sources_hold_the_model_bytes_and_exactly_its_ops(tmp_path):
    q_onnx, _ = quantized(CASES["option_a_shortcut"][0], tmp_path)
    tflite = convert_to_tflite(q_onnx, tmp_path / "m.tflite")
    out = tmp_path / "fw"
    files = emit_mcu(out, tflite=tflite, arena_bytes=4096,
                     io={"input_scale": 0.5, "input_zero_point": -1, "output_scale": 0.25, "output_zero_point": 3})
    settings = files["settings_h"].read_text()
    assert "MicroMutableOpResolver<4>" in settings and "kTensorArenaSize = 4096" in settings
    assert sorted(line.split("resolver.")[1].split("(")[0] for line in settings.splitlines() if "resolver.Add" in line) == \
        ["AddAdd", "AddConv2D", "AddPad", "AddStridedSlice"]
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler to check the array")
    (tmp_path / "dump.cc").write_text('#include <cstdio>\n#include "model_data.h"\nint main() { '
                                      "fwrite(g_model_data, 1, g_model_data_len, stdout); "
                                      "return reinterpret_cast<unsigned long>(g_model_data) % 16; }\n")
    binary = tmp_path / "dump"
    subprocess.run(["g++", "-std=c++17", "-I", str(out), str(tmp_path / "dump.cc"), str(files["data_cc"]), "-o", str(binary)],
                   check=True)
    done = subprocess.run([str(binary)], capture_output=True, check=False)
    assert done.returncode == 0  # 16-byte aligned
    assert done.stdout == tflite.read_bytes()


def test_smallest_arena_is_the_recorded_one_within_a_few_bytes(tmp_path):
    q_onnx, x = quantized(CASES["maxpool_flatten_linear"][0], tmp_path)
    model = convert_to_tflite(q_onnx, tmp_path / "m.tflite").read_bytes()
    recorded = tflm.arena_bytes(model)
    smallest = tflm.smallest_arena(model, tflm.quantize_input(x[:1], tflm.io_quant(model))[0], hint=recorded)
    assert recorded - 16 <= smallest <= recorded + 16
    assert not tflm.runs_in_arena(model, smallest - 64, tflm.quantize_input(x[:1], tflm.io_quant(model))[0])


def test_one_operator_table_drives_the_converter_the_resolver_and_the_readme():
    import re
    from pathlib import Path

    from pipeline.tflm.convert import _Converter  # with its BlockOps mixin
    from pipeline.tflm.ops import OPERATORS, RESOLVER_CALLS, readme_table

    root = Path(__file__).resolve().parents[1]
    readme = root.joinpath("README.md").read_text()
    block = readme.split("<!-- tflite-operators -->\n")[1].split("\n<!-- /tflite-operators -->")[0]
    assert block == readme_table()
    assert all(f"`{op.onnx}`" in block and (op.builtin is None or f"`{op.builtin}`" in block) for op in OPERATORS)
    for op in OPERATORS:
        assert callable(getattr(_Converter, op.convert)), op
        assert op.builtin is None or hasattr(tfl.BuiltinOperator, op.builtin), op
    header = root.parent / "shared/third_party/tflite-micro/tensorflow/lite/micro/micro_mutable_op_resolver.h"
    if header.is_file():  # TFLM's own resolver declares every call model_settings.h makes
        declared = set(re.findall(r"TfLiteStatus (Add\w+)\(", header.read_text()))
        assert set(RESOLVER_CALLS.values()) <= declared


def test_peak_activation_counts_the_pad_tensors_the_converter_adds(tmp_path):
    """A stride-2 conv with symmetric padding on an even input is no TFLite SAME: the converter adds a PAD op
    whose padded tensor lives beside the input. The figure is the deployed graph's, and no more than TFLM's arena."""
    from pipeline.onnx.cost import onnx_cost
    from pipeline.tflm.measure import peak_activation_bytes

    module = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU())
    q_onnx, _ = quantized(module, tmp_path)
    model = convert_to_tflite(q_onnx, tmp_path / "m.tflite").read_bytes()
    assert "PAD" in model_ops(model)
    # int8: the input 4x16x16 (1,024 B) and its padded copy 4x18x18 (1,296 B) alive together
    assert peak_activation_bytes(model) == 1024 + 1296
    assert onnx_cost(q_onnx).peak_activation_bytes < peak_activation_bytes(model) <= tflm.arena_bytes(model)
