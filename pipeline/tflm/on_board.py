"""An int8 model as firmware on its emulated board: link it, run real images, check it against the host.

The figures are the device's own: instructions per inference and per operator, estimated cycles and milliseconds
on the core (pipeline/cycles; left out, with the reason, where its tools are missing), flash split into runtime
and model, RAM (data + bss, the arena inside it), the arena the interpreter really used, the stack high-water
mark, and whether every output equals the host TFLM interpreter's bit for bit.
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.cycles.tools import missing as missing_tools
from pipeline.tflm import interpreter
from pipeline.tflm.board_cycles import CYCLE_TOOLS, firmware_cycles
from pipeline.tflm.build import HARNESS, build_library, library_sources, link_firmware, rebuild_script
from pipeline.tflm.emulator import run_firmware, size
from pipeline.tflm.firmware import model_sources, operator_shapes
from pipeline.util import write_text

HARNESS_FILES = ("main.cc", "platform.cc", "platform.h", "startup.c", "link.ld", "ruy/profiler/instrumentation.h")
MODEL_FILES = ("model_data.cc", "model_data.h", "model_settings.h")


def measure_on_board(tflite: Path, sources: Path, elf: Path, *, cpu: str, root: Path, x_nchw: np.ndarray,
                     clock_mhz: float = 0.0, log=print) -> dict:
    """Link `sources` (the model's C files) into `elf`, run it over `x_nchw` on `cpu`'s emulated board and
    compare with the host interpreter; cycles are estimated for `cpu` at `clock_mhz` (0: cycles only). Returns
    the figures for report.json."""
    library = build_library(cpu, root, log=log)
    firmware = link_firmware(sources, elf, cpu_name=cpu, root=root, library=library)
    model_bytes = tflite.read_bytes()
    io = interpreter.io_quant(model_bytes)
    x = interpreter.quantize_input(x_nchw, io)
    if len(x) == 1:  # the steady inference is the second: the first also runs the per-operator profiler
        x = np.concatenate([x, x])
    missing = missing_tools(*CYCLE_TOOLS)
    run = run_firmware(firmware.elf, x, cpu=cpu, profile_blocks=missing is None)
    host = interpreter.run_tflm(model_bytes, x).reshape(len(x), -1)
    differing = int(np.any(run.outputs != host, axis=1).sum())
    sections = size(firmware.elf)
    steady = run.instructions[1:] or run.instructions  # the first inference also ran the per-operator counter
    return {
        "cpu": cpu,
        "instructions": int(np.median(steady)),
        "instructions_range": [int(min(steady)), int(max(steady))],
        "layers": [{"op": op, "instructions": n} for op, n in run.layers],
        "flash_bytes": sections["flash_bytes"],
        "flash_model_bytes": len(model_bytes),
        "flash_runtime_bytes": sections["flash_bytes"] - len(model_bytes),
        "ram_bytes": sections["ram_bytes"],
        "data_bytes": sections["data_bytes"],
        "bss_bytes": sections["bss_bytes"],
        "arena_used_bytes": run.arena_used_bytes,
        "stack_used_bytes": run.stack_used_bytes,
        "samples": len(x),
        "bit_exact": differing == 0,
        "outputs_differing": differing,
        "elf": elf.name,
        "board": firmware_cycles(run, cpu=cpu, clock_mhz=clock_mhz, shapes=operator_shapes(model_bytes))
        if missing is None else None,
        **({"board_missing": missing} if missing else {}),
    }


def write_firmware_folder(folder: Path, model_sources: Path, *, cpu: str, root: Path) -> None:
    """`folder` gets everything needed to rebuild the firmware: the harness, the model's C files and a
    `build.sh` with the exact compile and link commands."""
    for name in HARNESS_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HARNESS / name, folder / name)
    for name in MODEL_FILES:
        if model_sources.resolve() != folder.resolve():
            shutil.copyfile(model_sources / name, folder / name)
    script = write_text(folder / "build.sh", rebuild_script(library_sources(root), cpu_name=cpu, root=root))
    script.chmod(0o755)


PROBE_SLACK = 64 * 1024  # a probe arena this much above the host's figure: room for any CMSIS-NN scratch buffer
DEVICE_SLACK = 256  # bytes over what the device used: FIRMWARE.md saw +64 fail and +256 work for every model


def count_on_board(model_bytes: bytes, *, cpu: str, root: Path, x_nchw: np.ndarray, cycles: bool = False) -> dict:
    """Instructions of one inference of the model as firmware on `cpu`'s emulated board, and with `cycles` its
    estimated cycles on the core: those of the second of two images of `x_nchw` (one image runs twice), because
    the first also runs the per-operator counter. Deterministic, so one inference is a measurement."""
    library = build_library(cpu, root, log=lambda *_: None)
    q = interpreter.io_quant(model_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        # a generous arena: only the count matters here, and CMSIS-NN's scratch is not in the host's figure
        model_sources(tmp, model_bytes, arena_bytes=interpreter.arena_bytes(model_bytes) + PROBE_SLACK,
                      io={"input_scale": q.input_scale, "input_zero_point": q.input_zero_point,
                          "output_scale": q.output_scale, "output_zero_point": q.output_zero_point})
        elf = link_firmware(Path(tmp), Path(tmp) / "count.elf", cpu_name=cpu, root=root, library=library).elf
        run = run_firmware(elf, interpreter.quantize_input(np.resize(x_nchw[:2], (2, *x_nchw.shape[1:])), q), cpu=cpu,
                           profile_blocks=cycles)
    counted = {"instructions": run.instructions[1]}
    if cycles:
        counted["cycles"] = firmware_cycles(run, cpu=cpu, clock_mhz=0.0)["cycles"]
    return counted


def instructions_per_inference(model_bytes: bytes, *, cpu: str, root: Path, x_nchw: np.ndarray) -> int:
    """Instructions of one inference (see `count_on_board`)."""
    return count_on_board(model_bytes, cpu=cpu, root=root, x_nchw=x_nchw)["instructions"]


def device_arena(tflite: Path, *, host_arena: int, io: dict, cpu: str, root: Path, x_nchw: np.ndarray) -> int:
    """The arena the firmware needs on the device: a probe ELF with a generous arena reports what TFLM used
    (CMSIS-NN's scratch buffers are not in the host's figure), plus slack, rounded to TFLM's 16 bytes."""
    data = tflite.read_bytes()
    library = build_library(cpu, root, log=lambda *_: None)
    with tempfile.TemporaryDirectory() as tmp:
        model_sources(tmp, data, arena_bytes=host_arena + PROBE_SLACK, io=io)
        elf = link_firmware(Path(tmp), Path(tmp) / "probe.elf", cpu_name=cpu, root=root, library=library).elf
        used = run_firmware(elf, interpreter.quantize_input(x_nchw[:1], interpreter.io_quant(data)), cpu=cpu).arena_used_bytes
    return -(-(used + DEVICE_SLACK) // 16) * 16


def firmware_for_build(folder: Path, *, cpu: str, root: Path, x_nchw: np.ndarray, arenas: dict[str, int],
                       ios: dict[str, dict], clock_mhz: float = 0.0, log=print) -> tuple[dict[str, dict], list[str]]:
    """Both int8 variants of a microcontroller build as firmware: the factored model from the build's own C
    files into `firmware/` (with everything needed to rebuild it), the dense one into `baseline/`. `arenas`
    holds each variant's kTensorArenaSize from the host's measurement; where the device needs more, the
    variant's C files get the device's figure and a note says so. Returns the figures and the notes."""
    models = {"factored_int8": folder / "model.tflite", "dense_int8": folder / "baseline" / "dense.int8.tflite"}
    figures, notes = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"factored_int8": folder, "dense_int8": Path(tmp)}
        for name, tflite in models.items():
            arena = arenas[name]
            needed = device_arena(tflite, host_arena=arena, io=ios[name], cpu=cpu, root=root, x_nchw=x_nchw)
            if needed > arena:
                notes.append(f"{name}: kTensorArenaSize raised from {arena:,} (host measure + margin) to {needed:,} "
                             f"bytes, what TFLM with CMSIS-NN used on the emulated {cpu} plus {DEVICE_SLACK} B")
                arena = needed
            if name == "dense_int8" or needed > arenas[name]:
                model_sources(sources[name], tflite.read_bytes(), arena_bytes=arena, io=ios[name])
            if name == "factored_int8":
                target = folder / "firmware"
                target.mkdir(exist_ok=True)
                write_firmware_folder(target, folder, cpu=cpu, root=root)
                elf = target / "measure.elf"
            else:
                target, elf = sources[name], folder / "baseline" / "dense.measure.elf"
            figures[name] = {**measure_on_board(tflite, target, elf, cpu=cpu, root=root, x_nchw=x_nchw,
                                                clock_mhz=clock_mhz, log=log),
                             "arena_bytes": arena, "device_arena_bytes": needed}
    return figures, notes
