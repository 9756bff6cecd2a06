"""The allocation's second cost timed on the Raspberry Pi itself: each candidate layer alone, as the same
int8 one-layer graph the host would time, run by ONNX Runtime on the board over SSH."""

import dataclasses
import tempfile
from pathlib import Path

from torch import nn

from pipeline.device.transports import Device, time_on_device
from pipeline.ort.layer_latency import quantized_layer
from targets import Quantization


class BoardLayerLatency:
    """Milliseconds of a layer or chain alone on `device` (batch 1, one thread, median)."""

    def __init__(self, quantization: Quantization, device: Device, *, runs: int = 60, warmup: int = 10):
        self.quantization, self.device, self.runs, self.warmup = quantization, device, runs, warmup
        self.unit = f"ms on {device.spec} (ONNX Runtime, one thread)"
        self.fingerprint = {**dataclasses.asdict(quantization), "board": device.key}

    def __call__(self, module: nn.Module, input_shape: tuple[int, ...]) -> float | None:
        with tempfile.TemporaryDirectory() as tmp:
            made = quantized_layer(module, input_shape, Path(tmp), quantization=self.quantization)
            if made is None:
                return None
            (latency,), _ = time_on_device(self.device, [made[0]], runs=self.runs, warmup=self.warmup)
            return latency
