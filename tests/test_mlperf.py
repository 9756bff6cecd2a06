"""The MLPerf Tiny side-by-side table: MLPerf Tiny's own int8 files beside ours and the published board figures,
with the caveats; synthetic inputs over the int8 input's range for the tasks without data here."""

import numpy as np
import pytest

from pipeline.bench.mlperf import REFERENCES, input_normalisation, mlperf_dir, render, synthetic_data
from pipeline.tflm import interpreter


def _figures(ms, arena, top1=None):
    return {"macs": 1, "ms": ms, "cycles": 1, "arena_bytes": arena, "flash_model_bytes": 1, "top1": top1,
            "bit_exact": True}


def test_the_table_puts_the_reference_files_and_ours_beside_the_published_board_figures():
    rows = [{"model": "resnet8", "scored": True, "eval_samples": 1000, "published_ms": REFERENCES["resnet8"].published,
             "reference": _figures(270.1, 55_984, 0.88), "dense": _figures(274.8, 56_288, 0.8595),
             "factored": _figures(160.4, 36_740, 0.8345)},
            {"model": "dscnn", "scored": False, "eval_samples": 200, "published_ms": REFERENCES["dscnn"].published,
             "reference": _figures(61.0, 25_600), "ours_missing": "no TensorFlow environment: run `make setup-tf`"}]
    text = render(rows, target="nucleo-l4r5zi", budget="cycles:0.6", clock_mhz=120.0, core="cortex-m4")
    resnet8, dscnn = (next(line for line in text.splitlines() if line.startswith(f"| {m}")) for m in ("resnet8", "dscnn"))
    assert [c.strip() for c in resnet8.strip("|").split("|")] == [
        "resnet8", "270.1 ms / 54.7 KiB / 88.00%", "274.8 ms / 55.0 KiB / 85.95%", "160.4 ms / 35.9 KiB / 83.45%",
        "704.0", "390.0", "165.1", "167.8"]
    assert [c.strip() for c in dscnn.strip("|").split("|")] == ["dscnn *", "61.0 ms / 25.0 KiB", "-", "-", "181.9",
                                                                "-", "43.2", "-"]
    assert "ours, factored (cycles:0.6)" in text and "on 1000 CIFAR-10 test images" in text
    assert "at 120 MHz" in text and "LLVM's cortex-m4 scheduling model" in text and "No flash wait states" in text
    assert "synthetic inputs" in text and "- dscnn: ours not made: no TensorFlow environment" in text


def test_synthetic_inputs_span_the_int8_files_input_range_and_are_seeded(tmp_path):
    path = mlperf_dir() / REFERENCES["dscnn"].int8_file
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    mean, std = input_normalisation(path)
    q = interpreter.io_quant(path.read_bytes())
    edges = interpreter.quantize_input(((np.array([0.0, 1.0]) - mean) / std).reshape(2, 1, 1, 1).astype(np.float32), q)
    assert edges.ravel().tolist() == [-128, 127]  # 0..1 data covers every int8 input value
    data = synthetic_data((1, 49, 10), 12, tmp_path / "a.npz")
    assert data.read_bytes() == synthetic_data((1, 49, 10), 12, tmp_path / "b.npz").read_bytes()
    with np.load(data) as arrays:
        assert arrays["x_train"].shape == (512, 49, 10, 1) and arrays["x_test"].dtype == np.uint8
        assert set(arrays["y_train"]) == set(range(12))


def test_a_target_without_firmware_is_refused_before_any_work(tmp_path):
    from pipeline.bench.mlperf import mlperf_tiny
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="Target 'rpi4' runs onnxruntime without firmware"):
        mlperf_tiny(target="rpi4", out=tmp_path / "m")
    assert not (tmp_path / "m").exists()
