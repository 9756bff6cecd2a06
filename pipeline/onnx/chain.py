"""The ONNX chain every caller runs in the same order: export -> simplify -> quantize."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from pipeline.onnx.export import export_onnx
from pipeline.onnx.quantize import quantize_onnx
from pipeline.onnx.simplify import simplify_onnx
from targets import Quantization


@dataclass(frozen=True)
class OnnxPair:
    fp32: Path  # exported and simplified
    int8: Path  # statically quantized from fp32
    notes: tuple[str, ...]  # how the export matched torch; why simplification was not kept, if it was not


def to_onnx(module: nn.Module, folder: Path, stem: str, *, check_inputs: np.ndarray, calibration: np.ndarray,
            quantization: Quantization) -> OnnxPair:
    """Write `<stem>.fp32.onnx` and `<stem>.int8.onnx` into `folder` (stems may hold dots: `b0.35`)."""
    raw, diff = export_onnx(module, folder / f"{stem}.raw.onnx", check_inputs=check_inputs)
    notes = [f"exported ONNX matches torch to {diff:.2g} (max abs) on {len(check_inputs)} test images"]
    fp32, note = simplify_onnx(raw, folder / f"{stem}.fp32.onnx", check_inputs=check_inputs)
    raw.unlink()
    notes += [note] if note else []
    int8 = quantize_onnx(fp32, folder / f"{stem}.int8.onnx", calibration=calibration, settings=quantization)
    return OnnxPair(fp32, int8, tuple(notes))
