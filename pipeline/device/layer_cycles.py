"""The allocation's cost on ARM Linux boards: estimated cycles on the board's core (the Raspberry Pi 4's Cortex-A72).

Each candidate layer or chain alone is the target's int8 one-layer ONNX graph (`pipeline/ort/layer_latency`), run
by the aarch64 ONNX Runtime in the emulated board with the block profiler, `board_cycles.BATCH` graphs to a guest
process; the whole dense model is exported, quantized and counted the way the deploy counts it. Deterministic, so a
plan is the same on any host at any load, and cached by the graphs' bytes.
"""

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from pipeline.cycles.cores import core_named
from pipeline.cycles.mca import model_key
from pipeline.device.board_cycles import layer_cycles, onnx_cycles
from pipeline.ort.layer_latency import quantized_layer, quantized_model
from targets import Quantization


class OnnxLayerCycles:
    """Estimated `core` cycles of a layer, a chain or the whole model as the target's int8 ONNX Runtime graph.
    `calibration` and `sample` are the deploy's own (so the dense model's count is the report's, from the cache);
    without them, synthetic inputs."""

    board = True

    def __init__(self, quantization: Quantization, *, core: str, calibration: np.ndarray | None = None,
                 sample: np.ndarray | None = None, log=print):
        self.quantization, self.core, self.calibration, self.sample, self.log = quantization, core, calibration, sample, log
        self.unit = f"estimated {core} cycles"
        self.fingerprint = {**dataclasses.asdict(quantization), "core": core, "llvm": model_key(core_named(core)),
                            "unit": "cycles"}

    def layers(self, items: list[tuple[nn.Module, tuple[int, ...]]]) -> list[float | None]:
        with tempfile.TemporaryDirectory() as tmp:
            made = {}
            for i, (module, shape) in enumerate(items):
                folder = Path(tmp) / str(i)
                folder.mkdir()
                made[i] = quantized_layer(module, shape, folder, quantization=self.quantization)
            built = [i for i, m in made.items() if m is not None]
            if built:
                self.log(f"estimate {self.core} cycles of {len(built)} layers and chains alone (emulated board)")
            cycles = layer_cycles([made[i][0] for i in built], samples=[made[i][1][0] for i in built], core=self.core,
                                  log=self.log)
        found = dict(zip(built, cycles, strict=True))
        return [float(found[i]) if i in found else None for i in range(len(items))]

    def model(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            int8, sample = quantized_model(module, input_shape, Path(tmp), quantization=self.quantization,
                                           calibration=self.calibration, sample=self.sample)
            (figures,) = onnx_cycles([int8], sample=sample, core=self.core, clock_mhz=0.0, log=self.log)
        return float(figures["cycles"])
