"""The simplify stage: onnxsim, accepted only if the simplified graph computes the same outputs."""

import os
import shutil
from pathlib import Path

import numpy as np
import onnx

from pipeline.onnx.run import run, session
from pipeline.util import atomic_path


def simplify_onnx(model_path: str | os.PathLike, out: str | os.PathLike, *, check_inputs: np.ndarray,
                  tolerance: float = 1e-5) -> tuple[Path, str]:
    """Write the simplified graph to `out`, or the input unchanged if onnxsim fails or changes the outputs.

    Returns the path and a note saying why simplification was not kept (empty when it was).
    """
    import onnxsim  # imports torch and onnxruntime itself: ~5 s, so only when this stage runs

    reference = run(session(model_path), check_inputs)
    note = ""
    with atomic_path(out) as tmp:
        try:
            simplified, ok = onnxsim.simplify(onnx.load(str(model_path)), check_n=0)
            if not ok:
                raise RuntimeError("onnxsim's own check failed")
            onnx.save(simplified, str(tmp))
            diff = float(np.max(np.abs(run(session(tmp), check_inputs) - reference)))
            if not diff <= tolerance:
                raise RuntimeError(f"outputs changed by {diff:.3g} (tolerance {tolerance:g})")
        except Exception as exc:  # onnxsim raises bare RuntimeErrors from its C++ core
            note = f"onnxsim failed, unsimplified graph kept: {str(exc).strip().splitlines()[0][:200]}"
            shutil.copyfile(model_path, tmp)
    return Path(out), note
