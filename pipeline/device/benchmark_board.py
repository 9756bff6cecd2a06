"""The benchmark firmware (MLPerf Tiny's serial protocol) checked against the host: on the emulated board, whose
UART qemu puts on a TCP port, or on a real board's serial port. The outputs are compared with the host TFLM
interpreter's bit for bit; a real board also gives its own milliseconds and cycles (DWT)."""

from pathlib import Path

import numpy as np

from pipeline.device.serial_protocol import BoardRun, run_benchmark
from pipeline.tflm import interpreter
from pipeline.tflm.emulator import emulated_board
from pipeline.util import sha256_bytes


def on_board(url: str | None, tflite: Path, x_nchw: np.ndarray, *, cpu: str, elf: Path | None = None,
             baud: int = 115200) -> tuple[BoardRun, np.ndarray]:
    """(the board's run, the host TFLM's int8 outputs) over `x_nchw`: on the board at `url`, or with `url` None on
    `cpu`'s emulated board running `elf`."""
    model = tflite.read_bytes()
    x = interpreter.quantize_input(x_nchw, interpreter.io_quant(model))
    sha = sha256_bytes(model)
    if url is None:
        with emulated_board(elf, cpu=cpu) as board:
            run = run_benchmark(board.url, x, model_sha256=sha, fresh=True, connect_within=20)
    else:
        run = run_benchmark(url, x, model_sha256=sha, baud=baud)
    return run, interpreter.run_tflm(model, x).reshape(len(x), -1)


def protocol_check(elf: Path, tflite: Path, x_nchw: np.ndarray, *, cpu: str) -> dict:
    """report.json's record of the benchmark firmware on the emulated board: bit-exact or not, and how fast the
    serial path moved images."""
    run, host = on_board(None, tflite, x_nchw, cpu=cpu, elf=elf)
    differing = int(np.any(run.outputs != host, axis=1).sum())
    return {"elf": elf.name, "samples": len(host), "bit_exact": differing == 0, "outputs_differing": differing,
            "seconds": round(run.seconds, 2), "images_per_second": round(len(host) / run.seconds, 2)}


def benchmark_for_build(folder: Path, x_nchw: np.ndarray, *, cpu: str, root: Path, firmware: dict, memory: dict,
                        log=print) -> dict:
    """A microcontroller build's benchmark firmware (`folder`/firmware: the emulated board's and the profile's real
    board's images, see `benchmark_images`), checked over the serial protocol on the emulated board against the host
    TFLM on `x_nchw`. `firmware` and `memory` are the profile's sections. Returns report.json's record."""
    from pipeline.tflm.boards import benchmark_images

    images = benchmark_images(folder / "firmware", cpu=cpu, root=root, board=firmware.get("board", ""),
                              baud=firmware.get("baud", 115200), flash_bytes=memory.get("flash_bytes", 0),
                              ram_bytes=memory.get("ram_bytes", 0), log=log)
    images["protocol"] = protocol_check(folder / "firmware" / "firmware.elf", folder / "model.tflite", x_nchw, cpu=cpu)
    return images
