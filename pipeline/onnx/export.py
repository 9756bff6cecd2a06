"""The export stage: a torch model to a single-file ONNX graph, checked against torch on real inputs."""

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import StageError
from pipeline.onnx.run import run, session
from pipeline.util import atomic_path

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(module: nn.Module, out: str | os.PathLike, *, check_inputs: np.ndarray,
                tolerance: float = 1e-4) -> tuple[Path, float]:
    """Write `out` (batch dimension dynamic) and return it with the largest |ONNX - torch| on `check_inputs`.

    Raises StageError when that difference exceeds `tolerance`; nothing is left at `out` then.
    """
    module = module.eval()
    # a fresh row-major copy: one-channel NCHW views count as contiguous with odd strides, which torch.export
    # traces as an as_strided gather over the batch (Shape, Range, Gather) that TFLite cannot run
    example = torch.from_numpy(np.array(check_inputs[:2], dtype=np.float32, order="C", copy=True))
    batch = torch.export.Dim("batch", min=1, max=65536)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = logging.getLogger("torch.onnx")
        previous = quiet.level
        quiet.setLevel(logging.ERROR)  # the exporter logs every skipped torchvision op as a warning
        try:
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False)
        finally:
            quiet.setLevel(previous)
        program.model.producer_version = ""  # keep the file identical across runs of the same torch
        program.save(str(tmp), external_data=False)
        with torch.inference_mode():
            expected = module(torch.from_numpy(check_inputs)).numpy()
        got = run(session(tmp), check_inputs)
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= tolerance:
            raise StageError(f"Exported ONNX differs from torch by {diff:.3g} on {len(check_inputs)} inputs; "
                             f"expected at most {tolerance:g}")
    return Path(out), diff
