"""The offline memory plan the TFLite writer records: TFLite Micro runs the model bit for bit as without it, in a
smaller arena, and no two tensors alive together share bytes."""

import numpy as np
import pytest
import torch
from ai_edge_litert import schema_py_generated as tfl
from torch import nn

from pipeline.memory_plan import best_plan, greedy_plan, overlaps, peak
from pipeline.tflm import interpreter
from pipeline.tflm.flatbuffer import OFFLINE_PLAN, lifetimes

pytestmark = pytest.mark.runtime


def test_plans_never_overlap_and_never_beat_the_peak():
    rng = np.random.default_rng(0)
    for _ in range(20):
        buffers = []
        for _ in range(15):
            first = int(rng.integers(0, 10))
            buffers.append((16 * int(rng.integers(1, 50)), first, first + int(rng.integers(0, 4))))
        name, offsets, size = best_plan(buffers)
        assert not overlaps(buffers, offsets) and peak(buffers) <= size <= greedy_plan(buffers)


def _without_plan(model_bytes: bytes) -> bytes:
    import flatbuffers

    model = tfl.ModelT.InitFromPackedBuf(model_bytes, 0)
    model.metadata = None
    builder = flatbuffers.Builder(1 << 16)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_a_residual_net_runs_bit_exact_in_a_smaller_arena(tmp_path):
    from pipeline.onnx.chain import to_onnx
    from pipeline.tflm.convert import convert_to_tflite
    from pipeline.zoo.tiny import ResNet8
    from targets import load_target

    torch.manual_seed(0)
    x = np.random.default_rng(0).uniform(size=(24, 3, 32, 32)).astype(np.float32)
    pair = to_onnx(ResNet8().eval(), tmp_path, "m", check_inputs=x[:2], calibration=x[:16],
                   quantization=load_target("cortex-m4").quantization)
    planned = convert_to_tflite(pair.int8, tmp_path / "m.tflite").read_bytes()
    model = tfl.ModelT.InitFromPackedBuf(planned, 0)
    assert [m.name.decode() for m in model.metadata] == [OFFLINE_PLAN]
    offsets = np.frombuffer(bytes(model.buffers[model.metadata[0].buffer].data), np.int32)
    assert offsets[:3].tolist() == [1, 0, len(model.subgraphs[0].tensors)]
    found = lifetimes(model.subgraphs[0], model.buffers)
    ids = sorted(found)
    assert not overlaps([tuple(found[i]) for i in ids], [int(offsets[3 + i]) for i in ids])
    plain = _without_plan(planned)
    io = interpreter.io_quant(planned)
    x_int8 = interpreter.quantize_input(x[16:], io)
    assert np.array_equal(interpreter.run_tflm(planned, x_int8), interpreter.run_tflm(plain, x_int8))
    # ResNet-8: TFLM's own rule places the activations in 51,264 B, the plan in their peak, 49,152 B
    assert interpreter.arena_bytes(plain) - interpreter.arena_bytes(planned) == 51264 - 49152


def test_no_plan_is_written_where_tflms_own_rule_is_as_good(tmp_path):
    from pipeline.onnx.chain import to_onnx
    from pipeline.tflm.convert import convert_to_tflite
    from targets import load_target

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = np.random.default_rng(0).uniform(size=(16, 3, 8, 8)).astype(np.float32)
    pair = to_onnx(net, tmp_path, "m", check_inputs=x[:2], calibration=x, quantization=load_target("cortex-m4").quantization)
    model = tfl.ModelT.InitFromPackedBuf(convert_to_tflite(pair.int8, tmp_path / "m.tflite").read_bytes(), 0)
    assert not model.metadata
