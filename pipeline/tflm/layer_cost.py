"""The allocation's second cost for microcontrollers: each candidate layer (or factored chain) alone, as
int8 firmware on the emulated board, counted in instructions per inference.

Each layer becomes a one-layer graph (`pipeline/ort/layer_latency.layer_graph`), quantized with the target's
settings, written as a .tflite and linked with the cached TFLM + CMSIS-NN library; the count is that of the
second inference (the first also runs the per-operator counter). Instructions are deterministic, so the
table, cached with the sensitivities, is the same on every host.
"""

import dataclasses
import tempfile
from pathlib import Path

from torch import nn

from pipeline.ort.layer_latency import quantized_layer
from pipeline.tflm.build import HARNESS, build_library, library_key
from pipeline.tflm.convert import convert_to_tflite
from pipeline.tflm.on_board import instructions_per_inference
from pipeline.util import sha256_bytes
from targets import Quantization


class FirmwareLayerLatency:
    """Instructions of a layer or chain alone on `cpu`'s emulated board."""

    def __init__(self, quantization: Quantization, *, cpu: str, root: Path, log=print):
        self.quantization, self.cpu, self.root, self.log = quantization, cpu, root, log
        self.unit = f"instructions on the emulated {cpu}"
        self.fingerprint = {**dataclasses.asdict(quantization), "cpu": cpu, "library": library_key(cpu, root),
                            "harness": sha256_bytes(*(p.read_bytes() for p in sorted(HARNESS.rglob("*")) if p.is_file())),
                            "unit": "instructions"}

    def __call__(self, module: nn.Module, input_shape: tuple[int, ...], *, seed: int = 0) -> float | None:
        build_library(self.cpu, self.root, log=self.log)  # built once, and said so, before the first count
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            made = quantized_layer(module, input_shape, tmp, quantization=self.quantization, seed=seed)
            if made is None:
                return None
            int8, x = made
            data = convert_to_tflite(int8, tmp / "layer.tflite").read_bytes()
            return float(instructions_per_inference(data, cpu=self.cpu, root=self.root, x_nchw=x))
