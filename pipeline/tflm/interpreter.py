"""Run a full-int8 .tflite in TensorFlow Lite Micro (reference kernels) or ai-edge-litert, and read the arena."""

import contextlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError, StageError


@dataclass(frozen=True)
class IoQuant:
    """Scale and zero point of the model's int8 input and output, for quantizing images and reading logits."""

    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int


def io_quant(model_bytes: bytes) -> IoQuant:
    from ai_edge_litert.interpreter import Interpreter

    try:
        it = Interpreter(model_content=model_bytes)
    except ValueError as exc:
        raise InputError(f"not a readable TFLite model ({str(exc).strip()[:200]}); expected a complete .tflite") from exc
    (in_scale, in_zp), (out_scale, out_zp) = it.get_input_details()[0]["quantization"], it.get_output_details()[0]["quantization"]
    return IoQuant(float(in_scale), int(in_zp), float(out_scale), int(out_zp))


def quantize_input(x_nchw: np.ndarray, q: IoQuant) -> np.ndarray:
    nhwc = x_nchw.transpose(0, 2, 3, 1) if x_nchw.ndim == 4 else x_nchw
    return np.clip(np.round(nhwc / q.input_scale) + q.input_zero_point, -128, 127).astype(np.int8)


def dequantize_output(y: np.ndarray, q: IoQuant) -> np.ndarray:
    return (y.astype(np.float32) - q.output_zero_point) * q.output_scale


_FD2 = threading.Lock()  # the process's one stderr: two threads swapping it would each lose it for good


@contextlib.contextmanager
def _captured_fd2():
    """TFLM prints its allocation report from C++ to file descriptor 2, out of Python's reach. One capture at a
    time in the process (the firmware cost counts layers from several threads)."""
    with _FD2, tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        holder = {}
        try:
            yield holder
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            holder["text"] = sink.read().decode(errors="replace")


HOST_ARENA = 64 << 20  # on the host the arena only has to be big enough; its use is read, not guessed


def tflm_interpreter(model_bytes: bytes, arena_size: int | None = None):
    from tflite_micro import runtime

    try:
        # the binding's default arena (10x the model) is too small for nets with small weights and big maps
        return runtime.Interpreter.from_bytes(model_bytes, arena_size=arena_size or HOST_ARENA)
    except Exception as exc:  # the binding raises RuntimeError with the C++ message
        raise StageError(f"TFLite Micro refused the model ({str(exc).strip()[:300]})") from exc


def arena_bytes(model_bytes: bytes) -> int:
    """Bytes TFLM's recording allocator reports for this model (tensors, scratch and runtime structures)."""
    with _captured_fd2() as out:
        it = tflm_interpreter(model_bytes)
        it.print_allocations()
    match = re.search(r"Arena allocation total (\d+) bytes", out["text"])
    if not match:
        raise StageError(f"TFLite Micro printed no arena total: {out['text'][-300:]!r}")
    return int(match.group(1))


def runs_in_arena(model_bytes: bytes, size: int, sample: np.ndarray) -> bool:
    with _captured_fd2():
        try:
            it = tflm_interpreter(model_bytes, arena_size=size)
            it.set_input(sample[None], 0)
            it.invoke()
            return True
        except Exception:
            return False


def smallest_arena(model_bytes: bytes, sample: np.ndarray, *, hint: int) -> int:
    """Bisect the smallest arena in which the model allocates and runs (16-byte steps)."""
    low, high = 0, max(hint, 1024)
    while not runs_in_arena(model_bytes, high, sample):
        low, high = high, high * 2
        if high > 1 << 30:
            raise StageError("TFLite Micro did not run the model in any arena up to 1 GiB")
    while high - low > 16:
        mid = (low + high) // 2
        low, high = (low, mid) if runs_in_arena(model_bytes, mid, sample) else (mid, high)
    return high


def run_tflm(model_bytes: bytes, x_int8: np.ndarray) -> np.ndarray:
    it = tflm_interpreter(model_bytes)
    outputs = []
    for sample in x_int8:
        it.set_input(sample[None], 0)
        it.invoke()
        outputs.append(np.array(it.get_output(0)).reshape(-1))
    return np.stack(outputs)


def run_litert(model_bytes: bytes, x_int8: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model_bytes, num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    outputs = []
    for sample in x_int8:
        it.set_tensor(inp, sample[None])
        it.invoke()
        outputs.append(it.get_tensor(out).reshape(-1).copy())
    return np.stack(outputs)
