"""The allocation's cost on microcontrollers: estimated cycles on the firmware's Cortex-M core.

Each candidate layer (or factored chain) becomes a one-layer graph (`pipeline/ort/layer_latency.layer_graph`),
quantized with the target's settings, written as a .tflite and linked with the cached TFLM + CMSIS-NN library; the
firmware runs on the emulated board with the block profiler and its second inference is timed on the core
(pipeline/cycles; the first also runs the per-operator counter). The whole dense model is exported, quantized and
converted the way the deploy does it. Deterministic, so the table is the same on every host; each count is cached
by the model's bytes and what runs it.
"""

import concurrent.futures
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from pipeline.cycles.cores import core_named
from pipeline.cycles.mca import model_key
from pipeline.cycles.plugin import SOURCE
from pipeline.ort.layer_latency import quantized_layer, quantized_model
from pipeline.tflm.build import HARNESS, build_library, library_key
from pipeline.tflm.convert import convert_to_tflite
from pipeline.tflm.on_board import count_on_board
from pipeline.util import cache_dir, sha256_bytes, sha256_json, write_text
from targets import Quantization


class FirmwareLayerCycles:
    """Estimated cycles of a layer, a chain or the whole model as int8 firmware on `cpu`'s emulated board.
    `calibration` and `sample` are the deploy's own; without them, synthetic inputs."""

    board = True

    def __init__(self, quantization: Quantization, *, cpu: str, root: Path, calibration: np.ndarray | None = None,
                 sample: np.ndarray | None = None, log=print):
        self.quantization, self.cpu, self.root, self.log = quantization, cpu, root, log
        self.calibration, self.sample = calibration, sample
        self.unit = f"estimated {cpu} cycles"
        self.runs_on = sha256_json([library_key(cpu, root), model_key(core_named(cpu)), sha256_bytes(
            SOURCE.read_bytes(), *(p.read_bytes() for p in sorted(HARNESS.rglob("*")) if p.is_file()))])
        self.fingerprint = {**dataclasses.asdict(quantization), "cpu": cpu, "runs_on": self.runs_on, "unit": "cycles"}

    def _count(self, data: bytes, x: np.ndarray) -> float:
        path = cache_dir("cycles", "firmware", sha256_json([sha256_bytes(data, x.tobytes()), self.cpu, self.runs_on])[:24]
                         + ".json")
        if not path.is_file():
            counted = count_on_board(data, cpu=self.cpu, root=self.root, x_nchw=x, cycles=True)
            write_text(path, json.dumps(counted) + "\n")
        return float(json.loads(path.read_text())["cycles"])

    def layers(self, items: list[tuple[nn.Module, tuple[int, ...]]]) -> list[float | None]:
        build_library(self.cpu, self.root, log=self.log)  # built once, and said so, before the first count
        with tempfile.TemporaryDirectory() as tmp:
            models = {}
            for i, (module, shape) in enumerate(items):
                folder = Path(tmp) / str(i)
                folder.mkdir()
                made = quantized_layer(module, shape, folder, quantization=self.quantization)
                if made is not None:
                    models[i] = (convert_to_tflite(made[0], folder / "layer.tflite").read_bytes(), made[1][:1])
            if models:
                self.log(f"estimate {self.cpu} cycles of {len(models)} layers and chains alone (emulated board)")
            with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                found = dict(zip(models, pool.map(lambda m: self._count(*m), models.values()), strict=True))
        return [found.get(i) for i in range(len(items))]

    def model(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            int8, sample = quantized_model(module, input_shape, Path(tmp), quantization=self.quantization,
                                           calibration=self.calibration, sample=self.sample)
            data = convert_to_tflite(int8, Path(tmp) / "dense.tflite").read_bytes()
        return self._count(data, np.ascontiguousarray(sample[None], np.float32))
