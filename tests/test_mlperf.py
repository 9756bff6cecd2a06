"""The MLPerf Tiny side-by-side table: published board figures beside the estimates, with the caveats, and the
seeded stand-ins for models without weights or data here."""

import numpy as np
import torch

from pipeline.bench.mlperf import PUBLISHED, _synthetic, render
from pipeline.zoo import ZOO


def test_the_table_puts_the_estimates_beside_the_published_board_figures():
    rows = [{"model": "resnet8", "trained": True, "macs_dense": 12_500_000, "macs_factored": 8_750_000,
             "ms_dense": 307.3, "ms_factored": 265.8, "top1_dense_int8": 0.87, "top1_factored_int8": 0.85,
             "eval_samples": 1000, "published_ms": PUBLISHED["resnet8"].__dict__},
            {"model": "dscnn", "trained": False, "macs_dense": 2_700_000, "macs_factored": 1_900_000,
             "ms_dense": 50.0, "ms_factored": None, "top1_dense_int8": None, "top1_factored_int8": None,
             "eval_samples": 200, "published_ms": PUBLISHED["dscnn"].__dict__}]
    text = render(rows, target="nucleo-l4r5zi", budget="0.7", clock_mhz=120.0, core="cortex-m4")
    resnet8, dscnn = (next(line for line in text.splitlines() if line.startswith(f"| {m}")) for m in ("resnet8", "dscnn"))
    cells = [c.strip() for c in resnet8.strip("|").split("|")]
    assert cells == ["resnet8", "12.50 M -> 8.75 M", "307.3", "265.8", "87.00% / 85.00% (1000 images)", "704.0",
                     "390.0", "227.0"]
    assert [c.strip() for c in dscnn.strip("|").split("|")] == ["dscnn *", "2.70 M -> 1.90 M", "50.0", "-", "-", "182.0",
                                                                "-", "75.1"]
    assert "at 120 MHz" in text and "LLVM's cortex-m4 scheduling model" in text and "No flash wait states" in text
    assert "untrained weights on synthetic inputs" in text


def test_models_without_weights_get_seeded_weights_and_inputs_of_their_shape(tmp_path):
    weights, data = _synthetic("dscnn", tmp_path)
    again = _synthetic("dscnn", tmp_path / "again")
    assert weights.read_bytes() == again[0].read_bytes() and data.read_bytes() == again[1].read_bytes()
    state = torch.load(weights, weights_only=True)
    assert set(state) == set(ZOO["dscnn"].build().state_dict())
    with np.load(data) as arrays:
        assert arrays["x_train"].shape == (512, 49, 10, 1) and arrays["x_test"].dtype == np.uint8
        assert set(arrays["y_train"]) == set(range(len(ZOO["dscnn"].class_names)))


def test_a_target_without_firmware_is_refused_before_any_work(tmp_path):
    import pytest

    from pipeline.bench.mlperf import mlperf_tiny
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="Target 'rpi4' runs onnxruntime without firmware"):
        mlperf_tiny(target="rpi4", out=tmp_path / "m")
    assert not (tmp_path / "m").exists()
