"""Runs on the device: an ONNX (or ORT-format) model over preprocessed inputs, outputs saved as .npy.

Needs only numpy and onnxruntime, so any board with Python can take it. Usage:
    python runner.py MODEL INPUTS.npy OUTPUTS.npy
Exit code 3 means a package is missing; the message names it.
"""

import platform
import sys

try:
    import numpy as np
    import onnxruntime as ort
except ImportError as exc:
    print(f"MISSING {exc.name}", file=sys.stderr)
    sys.exit(3)


def main() -> None:
    model, inputs, outputs = sys.argv[1:4]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # numerics, not speed: one thread is what every board has
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.load(inputs)
    y = np.concatenate([session.run(None, {name: x[i:i + 100]})[0] for i in range(0, len(x), 100)])
    np.save(outputs, y)
    print(f"onnxruntime {ort.__version__} on {platform.machine()}")


if __name__ == "__main__":
    main()
