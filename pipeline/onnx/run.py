"""Run an ONNX model in ONNX Runtime on batches of NCHW float input (shared by the checks and `measure`)."""

import os

import numpy as np
import onnxruntime as ort

from pipeline.errors import InputError


def session(path: str | os.PathLike | bytes, *, threads: int = 0, optimize: bool = True) -> ort.InferenceSession:
    """A CPU session on a file, or on a serialized model held in memory."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        name = "(in memory)" if isinstance(path, bytes) else str(path)
        raise InputError(f"ONNX model {name!r} could not be loaded ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:300]}); expected a complete .onnx or .ort file") from exc


def reference_session(path: str | os.PathLike | bytes) -> ort.InferenceSession:
    """ONNX Runtime on the file's own arithmetic, operator by operator: a QDQ model dequantizes, runs the float
    operator and quantizes again. Accuracy and reference outputs use this, not ORT's fused x86 int8 kernels, which
    saturate u8 x s8 pairs on CPUs without VNNI (FINDINGS: this AVX2 EPYC; a small CNN's int8 top-1 fell from 69%
    to 44%): ARM's NEON and CMSIS-NN kernels do not, and agree with this graph to within rounding on every host."""
    return session(path, optimize=False)


def run(sess: ort.InferenceSession, x: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    name = sess.get_inputs()[0].name
    fixed = sess.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else batch_size
    return np.concatenate([sess.run(None, {name: x[i:i + step]})[0] for i in range(0, len(x), step)])
