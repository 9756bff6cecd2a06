"""The ONNX chain every caller runs in the same order: export -> simplify -> quantize."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from pipeline.onnx.export import INPUT_NAME, OUTPUT_NAME, export_onnx
from pipeline.onnx.quantize import quantize_onnx
from pipeline.onnx.simplify import simplify_onnx
from pipeline.util import atomic_path, onnx_data_inputs
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
    note = f"exported ONNX matches torch to {diff:.2g} (max abs) on {len(check_inputs)} test images"
    return _simplified_and_quantized(raw, folder, stem, note, check_inputs=check_inputs, calibration=calibration,
                                     quantization=quantization)


def from_onnx_file(source: Path, folder: Path, stem: str, *, check_inputs: np.ndarray, calibration: np.ndarray,
                   quantization: Quantization) -> OnnxPair:
    """The same pair from a user's ONNX file, which stays the reference: only its input and output are renamed to
    the names every later stage reads; simplification is kept only where it computes the same outputs."""
    model = onnx.load(str(source))
    renames = {onnx_data_inputs(model.graph)[0].name: INPUT_NAME, model.graph.output[0].name: OUTPUT_NAME}
    for value in (*model.graph.input, *model.graph.output):
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    with atomic_path(folder / f"{stem}.raw.onnx") as tmp:
        onnx.save(model, str(tmp))
    return _simplified_and_quantized(folder / f"{stem}.raw.onnx", folder, stem,
                                     f"the model's own ONNX file {source.name}, input and output renamed",
                                     check_inputs=check_inputs, calibration=calibration, quantization=quantization)


def _simplified_and_quantized(raw: Path, folder: Path, stem: str, note: str, *, check_inputs: np.ndarray,
                              calibration: np.ndarray, quantization: Quantization) -> OnnxPair:
    """The rest of the chain from `raw`, which it replaces: simplify, then quantize."""
    fp32, simplify_note = simplify_onnx(raw, folder / f"{stem}.fp32.onnx", check_inputs=check_inputs)
    raw.unlink()
    int8 = quantize_onnx(fp32, folder / f"{stem}.int8.onnx", calibration=calibration, settings=quantization)
    return OnnxPair(fp32, int8, (note, *([simplify_note] if simplify_note else [])))
