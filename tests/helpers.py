"""Settings and conditions the tests share."""

import contextlib
import subprocess
import sys

from targets import Decomposition


def plain(**overrides) -> Decomposition:
    """Decomposition settings without the profile's conveniences, so a test sees exactly the ranks it asks for:
    EVBMF ranks unless given, no rounding, and the first and last layers factored like any other."""
    return Decomposition(**{"rank": "evbmf", "round_to": 1, "keep_first_and_last": False, **overrides})


@contextlib.contextmanager
def busy_host(processes: int = 2, seconds: int = 300):
    """CPU-bound processes beside whatever runs inside: figures that must not depend on the host's load."""
    burners = [subprocess.Popen([sys.executable, "-c", f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"])
               for _ in range(processes)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()


# The suite's own deploy: the small seednet with the profile's method and rank (no budget sweep), so a deploy takes
# seconds; a test that exercises a budget gives one.
SEEDNET = ("--model", "seednet")
NO_BUDGET = ("--budget", "none")


def firmware_missing() -> str | None:
    """Why a microcontroller deploy cannot build and time its firmware here (the apt toolchain, the cycle tools or
    the TFLM sources), or None: such tests skip with it, as the firmware tests do."""
    from pipeline.cycles.tools import missing
    from pipeline.errors import DeviceError
    from pipeline.tflm.build import check_toolchain, sources_root

    try:
        check_toolchain()
        sources_root()
    except DeviceError as exc:
        return str(exc)
    return missing("llvm-mca", "gcc", "qemu-system-arm")


def with_trained_norms(net, *, bias_std: float = 0.0):
    """`net` (in eval mode) with BatchNorm statistics and scales like a trained net's, not the identity a fresh one
    computes, so that folding or cutting them is seen; seeded by the caller's `torch.manual_seed`."""
    from torch import nn

    net.eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            if bias_std:
                m.bias.data.normal_(0, bias_std)
    return net


def tflm_steps_from_onnxruntime(net, x, folder, *, calibrate: int = 32) -> float:
    """`net` exported, quantized on `x[:calibrate]` and written as a .tflite: the largest difference between TFLite
    Micro's outputs and the QDQ file's arithmetic in ONNX Runtime on the rest of `x`, in output quantization steps."""
    import numpy as np

    from pipeline.onnx.export import export_onnx
    from pipeline.onnx.quantize import quantize_onnx
    from pipeline.onnx.run import reference_session, run
    from pipeline.tflm import interpreter as tflm
    from pipeline.tflm.convert import convert_to_tflite
    from targets import Quantization

    raw, _ = export_onnx(net, folder / "m.onnx", check_inputs=x[:4])
    q = quantize_onnx(raw, folder / "q.onnx", calibration=x[:calibrate], settings=Quantization(activation_type="int8"))
    model = convert_to_tflite(q, folder / "m.tflite").read_bytes()
    io = tflm.io_quant(model)
    x_int8 = tflm.quantize_input(x[calibrate:], io)
    seen = ((x_int8.astype(np.float32) - io.input_zero_point) * io.input_scale).transpose(0, 3, 1, 2)
    ort = run(reference_session(q), np.ascontiguousarray(seen))  # the QDQ file's arithmetic
    if ort.ndim == 4:
        ort = ort.transpose(0, 2, 3, 1)  # NHWC, as TFLite writes it
    micro = tflm.dequantize_output(tflm.run_tflm(model, x_int8), io).reshape(ort.shape)
    return float(np.abs(micro - ort).max() / io.output_scale)
