"""Runs on the device: an ONNX (or ORT-format) model over preprocessed inputs, outputs saved as .npy; or the
board's own latency of several models.

Needs only numpy and onnxruntime, so any board with Python can take it. Usage:
    python runner.py MODEL INPUTS.npy OUTPUTS.npy
    python runner.py --latency RUNS WARMUP MODEL [MODEL ...]   # one line per model: latency_ms NAME MEDIAN
    python runner.py --marks RUNS MAGIC MODEL.onnx [MODEL.onnx ...]   # for the block profiler (pipeline/cycles);
                                                                    # each model's input is MODEL.npy beside it
Exit code 3 means a package is missing; the message names it.
"""

import os
import platform
import statistics
import sys
import time

try:
    import numpy as np
    import onnxruntime as ort
except ImportError as exc:
    print(f"MISSING {exc.name}", file=sys.stderr)
    sys.exit(3)


def open_session(model: str) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one thread: what every board has, and what the host's figures use
    options.inter_op_num_threads = 1
    # no spinning thread waiting for work: under emulation it would add work that depends on the host's timing
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def latency(runs: int, warmup: int, models: list[str]) -> None:
    """Median wall time of one batch-1 inference on this board, after warm-up runs (weights get packed)."""
    for model in models:
        session = open_session(model)
        spec = session.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        feed = {spec.name: np.random.default_rng(0).normal(size=shape).astype(np.float32)}
        for _ in range(warmup):
            session.run(None, feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        print(f"latency_ms {model} {statistics.median(times) * 1e3:.6f}")
    print(f"onnxruntime {ort.__version__} on {platform.machine()}")


def mark(magic: int) -> None:
    """A phase boundary the block-profile plugin watches for: lseek on no file fails at once and changes nothing."""
    try:
        os.lseek(-1, magic, 0)
    except OSError:
        pass


def marks(runs: int, magic: int, models: list[str]) -> None:
    """Each model (its one input, CHW, in the .npy of the same stem): one warm-up inference (weights are packed on
    the first), then `runs` inferences between two marks, so the plugin's segment 2k + 1 holds model k's
    inferences and nothing else."""
    for model in models:
        session = open_session(model)
        feed = {session.get_inputs()[0].name: np.load(model.removesuffix(".onnx") + ".npy")[None]}
        session.run(None, feed)
        mark(magic)
        for _ in range(runs):
            session.run(None, feed)
        mark(magic)
    print(f"onnxruntime {ort.__version__} on {platform.machine()}")


def main() -> None:
    if sys.argv[1] == "--latency":
        latency(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
        return
    if sys.argv[1] == "--marks":
        marks(int(sys.argv[2]), int(sys.argv[3], 0), sys.argv[4:])
        return
    model, inputs, outputs = sys.argv[1:4]
    session = open_session(model)
    name = session.get_inputs()[0].name
    x = np.load(inputs)
    y = np.concatenate([session.run(None, {name: x[i:i + 100]})[0] for i in range(0, len(x), 100)])
    np.save(outputs, y)
    print(f"onnxruntime {ort.__version__} on {platform.machine()}")


if __name__ == "__main__":
    main()
