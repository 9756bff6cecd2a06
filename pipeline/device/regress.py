"""The on-device accuracy regression test.

Runs the deployed int8 artefact on the device and compares it with the dense fp32 reference (top-1 drop and
agreement against the profile's thresholds), with the same int8 file's own arithmetic on the host (the
host-vs-device int8 gap; ORT unfused, since its fused x86 kernels saturate where ARM's do not), and with the
outputs of the last accepted run on that device, which must match exactly.
"""

import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from calib import Hint, balanced_subset, load_data, preprocess
from pipeline.cluster import Job, board_resource, connect
from pipeline.device.board_time import measured_on_board, record_board_time
from pipeline.device.transports import Device, parse_device, run_firmware_on_device, run_on_device
from pipeline.errors import DeviceError, InputError
from pipeline.metrics import agreement, top1
from pipeline.onnx.run import reference_session, run, session
from pipeline.output import check_build, writing
from pipeline.util import markdown_table, sha256_bytes, sha256_file, write_bytes, write_text
from targets import Thresholds

BASELINE_DIR = "device_baseline"
# MLPerf Tiny's 200 CIFAR-10 test images for image classification's performance runs (indices into the test split):
# what a microcontroller's board (real or emulated) streams by default for a CIFAR-10 build. MLPERF_TINY_DIR= points
# at another copy.
PERF_IMAGES = "ic_perf_samples_idxs.npy"
DEFAULT_MLPERF_DIR = Path(__file__).resolve().parents[3] / "shared" / "models" / "mlperf-tiny"
ARTEFACT = {"onnxruntime": "model.int8.onnx", "tflite-micro": "model.tflite"}
MEASURE_ELF = "firmware/measure.elf"  # the measuring harness (semihosting): instructions and the cycle engine's estimate
FIRMWARE_ELF = "firmware/firmware.elf"  # MLPerf Tiny's serial protocol on the emulated board (issue 39's name)
HOST_INT8 = {"onnxruntime": "model.int8.onnx", "tflite-micro": "baseline/factored.int8.onnx"}


@dataclass(frozen=True)
class RegressReport:
    target: str
    device: str
    device_about: str
    artefact: str
    eval_samples: int
    reference_top1: float  # dense_fp32 on the host: fp32 does not depend on the machine (within 1e-6)
    device_top1: float
    top1_drop: float
    agreement: float  # device int8 vs dense_fp32, top-1
    host_top1: float
    host_agreement: float  # device int8 vs the same int8 model on the host, unfused (`reference_session`)
    host_max_diff: float
    host_max_diff_steps: float | None  # the same in the int8 output's quantization steps, as deploy reports it
    baseline: dict
    thresholds: dict
    instructions: int | None  # per inference, on an emulated microcontroller
    board: dict | None  # one inference estimated on the board's core (cycles, ms), or {"missing": why}
    passed: bool
    failures: tuple[str, ...]
    device_seconds: float
    images: str = ""  # which test images: a class-balanced subset, or the indices of a file
    reference: str = "dense_fp32"  # what reference_top1 and agreement are taken on: "model.tflite (host TFLM)" for a
    # .tflite measured as it is, which has no float model

    def table(self) -> str:
        given = self.reference != "dense_fp32"
        lines = [markdown_table(("", "top-1", f"agreement w/ {self.reference}"),
                                [(f"{self.reference}{'' if given else ' (host)'}", f"{self.reference_top1:.2%}", "100.00%"),
                                 *([] if given else [("int8 on host, unfused", f"{self.host_top1:.2%}", "-")]),
                                 (f"int8 on {self.device}", f"{self.device_top1:.2%}", f"{self.agreement:.2%}")])]
        steps = "" if self.host_max_diff_steps is None else f" ({self.host_max_diff_steps:g} quantization steps)"
        lines += [f"\nhost vs device int8: top-1 agreement {self.host_agreement:.2%}, largest output difference "
                  f"{self.host_max_diff:.4g}{steps}",
                  f"device baseline: {self.baseline['status']}",
                  *([f"instructions per inference: {self.instructions:,}"] if self.instructions else []),
                  *([_board_line(self.board)] if self.board else []),
                  *([f"bit for bit with the host TFLM interpreter: {self.eval_samples - self.board['host_tflm_outputs_differing']}"
                     f" of {self.eval_samples} outputs"] if self.board and "host_tflm_outputs_differing" in self.board else []),
                  f"device run: {self.device_seconds:.1f} s on {self.eval_samples} images ({self.device_about}); "
                  f"images: {self.images or 'a class-balanced test subset'}",
                  f"\n{'PASSED' if self.passed else 'FAILED'}: top-1 drop {self.top1_drop * 100:+.2f} points "
                  f"(allowed {self.thresholds['max_top1_drop'] * 100:.2f}), agreement {self.agreement:.2%} "
                  f"(at least {self.thresholds['min_agreement']:.2%})"]
        lines += [f"  - {f}" for f in self.failures]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["failures"] = list(self.failures)
        return data


def _board_line(board: dict) -> str:
    if board.get("source") == "measured":
        ms = f" = {board['ms']:.3f} ms" if board.get("ms") is not None else ""
        estimated = (f"; the cycle engine estimated {board['estimated_cycles']:,} ({board['estimate_ratio']:.3f} of the "
                     "board's)") if board.get("estimated_cycles") else f"; no estimate ({board.get('estimate_missing')})"
        return f"measured on the board (DWT): {board['cycles']:,} cycles per inference{ms}{estimated}"
    if "missing" in board:
        return f"estimated cycles: not here ({board['missing']})"
    ms = f" = {board['ms']:.3f} ms at {board['clock_mhz']:g} MHz" if board["ms"] is not None else ""
    return f"estimated cycles per inference on the {board['core']}: {board['cycles']:,}{ms} (llvm-mca)"


def board_estimate(runtime: str, device: Device, artefact: Path, *, sample: np.ndarray, board: dict | None,
                   log=print) -> dict | None:
    """Estimated cycles of an ONNX Runtime artefact on the emulated Pi's core (None where the profile names no
    core or the device is not the emulated Pi; {"missing": why} where the tools are not here)."""
    if runtime != "onnxruntime" or device.kind != "qemu" or not (board or {}).get("core"):
        return None
    from pipeline.device.board_cycles import onnx_cycles

    try:
        return onnx_cycles([artefact], sample=sample, core=board["core"], clock_mhz=board["clock_mhz"], log=log)[0]
    except DeviceError as exc:
        return {"missing": str(exc)}


def output_scale(artefact: Path) -> float | None:
    """The int8 output's quantization step: from the .tflite's output tensor, or the scale of the
    DequantizeLinear that produces the ONNX graph's output (None when the output is not quantized)."""
    if artefact.suffix == ".tflite":
        from pipeline.tflm.interpreter import io_quant

        return float(io_quant(artefact.read_bytes()).output_scale)
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(artefact).graph
    producer = next((n for n in graph.node if graph.output[0].name in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    scale = next((i for i in graph.initializer if i.name == producer.input[1]), None)
    return float(numpy_helper.to_array(scale).reshape(-1)[0]) if scale is not None else None


def _in_steps(difference: float, artefact: Path) -> float | None:
    scale = output_scale(artefact)
    return round(difference / scale, 3) if scale else None


def _compare_with_baseline(path: Path, outputs: np.ndarray, *, artefact_sha: str, inputs_sha: str, accept: bool,
                           instructions: int | None = None, max_rise: float = 0.0, cycles: int | None = None,
                           max_cycle_rise: float = 0.0) -> dict:
    if accept or not path.is_file():
        buffer = io.BytesIO()
        np.savez(buffer, outputs=outputs, artefact_sha256=artefact_sha, inputs_sha256=inputs_sha,
                 instructions=-1 if instructions is None else instructions, cycles=-1 if cycles is None else cycles)
        write_bytes(path, buffer.getvalue())
        return {"status": "recorded" + (" (accepted)" if accept else " (first run on this device)"), "ok": True}
    with np.load(path, allow_pickle=False) as saved:
        old, old_artefact, old_inputs = saved["outputs"], str(saved["artefact_sha256"]), str(saved["inputs_sha256"])
        old_instructions = int(saved["instructions"]) if "instructions" in saved else -1
        old_cycles = int(saved["cycles"]) if "cycles" in saved else -1
    if cycles is not None and old_cycles > 0 and cycles > old_cycles * (1 + max_cycle_rise):
        return {"status": f"SLOWER: {cycles:,} estimated cycles per inference against {old_cycles:,} accepted "
                          f"(+{cycles / old_cycles - 1:.2%}, {max_cycle_rise:.2%} allowed)", "ok": False}
    if instructions is not None and old_instructions > 0 and instructions > old_instructions * (1 + max_rise):
        return {"status": f"SLOWER: {instructions:,} instructions per inference against {old_instructions:,} accepted "
                          f"(+{instructions / old_instructions - 1:.2%}, {max_rise:.2%} allowed)", "ok": False}
    if old_artefact != artefact_sha:
        return {"status": "artefact changed since the baseline was accepted: check it, then ACCEPT=1", "ok": False}
    if old_inputs != inputs_sha or old.shape != outputs.shape:
        return {"status": f"baseline was recorded on other inputs ({len(old)} images): use the same EVAL_SAMPLES "
                          "or ACCEPT=1", "ok": False}
    differs = np.any(old != outputs, axis=tuple(range(1, outputs.ndim)))
    if not differs.any():
        return {"status": f"matched exactly ({len(outputs)} outputs)", "ok": True}
    change = float(np.max(np.abs(old.astype(np.float64) - outputs)))
    flipped = int(np.sum(old.argmax(1) != outputs.argmax(1)))
    return {"status": f"CHANGED: {int(differs.sum())} of {len(outputs)} outputs differ, by up to {change:.4g}; "
                      f"{flipped} top-1 changes", "ok": False, "changed_outputs": int(differs.sum()),
            "max_change": change, "top1_changes": flipped}


def _artefact(runtime: str, device: Device) -> tuple[str, bool]:
    on_board = runtime == "tflite-micro" and device.kind in ("qemu", "serial")
    return (FIRMWARE_ELF if on_board and device.kind == "qemu" else ARTEFACT[runtime]), on_board


def _references(folder: Path, runtime: str) -> list[str]:
    """What the device's outputs are held to: the dense fp32 model and the host's int8 model. A .tflite measured as
    it is (`pipeline.measure_int8`) has neither, and no baseline folder: the host TFLM interpreter on the file
    itself is then both."""
    if runtime == "tflite-micro" and not (folder / "baseline").is_dir():
        return []
    return [HOST_INT8[runtime], "baseline/dense.fp32.onnx"]


def _host_outputs(folder: Path, runtime: str, eval_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the reference's outputs, the host int8 model's) on `eval_x`."""
    if _references(folder, runtime):
        return run(session(folder / "baseline/dense.fp32.onnx"), eval_x), \
            run(reference_session(folder / HOST_INT8[runtime]), eval_x)
    from pipeline.tflm import interpreter

    model = (folder / ARTEFACT[runtime]).read_bytes()
    q = interpreter.io_quant(model)
    host = interpreter.dequantize_output(interpreter.run_tflm(model, interpreter.quantize_input(eval_x, q)), q)
    return host, host


def _check_complete(folder: Path, *, runtime: str, target: str, device: Device) -> list[str]:
    """The build's files a device check reads (relative paths), or an error naming the first one missing."""
    artefact, on_board = _artefact(runtime, device)
    needed = [artefact, *_references(folder, runtime), *([MEASURE_ELF, ARTEFACT[runtime]] if on_board else [])]
    for name in needed:
        if not (folder / name).is_file():
            hint = " with the arm-none-eabi toolchain installed (see `make firmware`)" if name == artefact and on_board else ""
            raise InputError(f"{folder / name} is missing; expected a complete build from `make deploy TARGET={target}`{hint}")
    baselines = sorted(str(p.relative_to(folder)) for p in (folder / BASELINE_DIR).glob("*") if p.is_file())
    return list(dict.fromkeys([*needed, ARTEFACT[runtime], *baselines]))


def check_on_device(folder: Path, *, runtime: str, target: str, thresholds: Thresholds, eval_x: np.ndarray,
                    eval_y: np.ndarray, device: Device, accept: bool, firmware: dict | None = None,
                    board: dict | None = None, cycle_sample: np.ndarray | None = None, images: str = "",
                    log=print) -> RegressReport:
    """`firmware` (the profile's [firmware] section) runs a microcontroller build's ELF on its emulated board
    when the device is `qemu`; `board` (its [board] section) gives the core and clock its cycles are estimated
    for, and how much they may rise over the accepted baseline; an ONNX model's cycles are estimated on
    `cycle_sample` (default: the first image checked)."""
    _check_complete(folder, runtime=runtime, target=target, device=device)
    name, on_board = _artefact(runtime, device)
    artefact = folder / name
    log(f"[device] running {artefact.name} on {device.spec} ({len(eval_x)} images)")
    instructions, key, board = None, device.key, board or {}
    if on_board:
        outputs, seconds, about, instructions, estimate = _on_microcontroller(
            folder, device, eval_x, firmware=firmware, board=board,
            cycle_sample=eval_x[0] if cycle_sample is None else cycle_sample)
        key = f"qemu-{firmware['cpu']}" if device.kind == "qemu" else key
    else:
        outputs, seconds, about = run_on_device(device, artefact, eval_x, log=log)
        estimate = board_estimate(runtime, device, artefact, sample=eval_x[0] if cycle_sample is None else cycle_sample,
                                  board=board, log=log)
    reference, host = _host_outputs(folder, runtime, eval_x)
    baseline = _compare_with_baseline(folder / BASELINE_DIR / f"{key}.npz", outputs, artefact_sha=sha256_file(artefact),
                                      inputs_sha=sha256_bytes(np.ascontiguousarray(eval_x).tobytes()), accept=accept,
                                      instructions=instructions,
                                      max_rise=(firmware or {}).get("max_instruction_rise", 0.0),
                                      cycles=(estimate or {}).get("cycles"), max_cycle_rise=board.get("max_cycle_rise", 0.0))
    drop = top1(reference, eval_y) - top1(outputs, eval_y)
    agree = agreement(outputs, reference)
    failures = thresholds.failures(top1_drop=drop, agreement=agree)
    if not baseline["ok"]:
        failures.append(f"device outputs: {baseline['status']}")
    if (estimate or {}).get("host_tflm_outputs_differing"):
        failures.append(f"device outputs differ from the host TFLM interpreter's on "
                        f"{estimate['host_tflm_outputs_differing']} of {len(eval_x)} images")
    return RegressReport(
        target=target, device=device.spec, device_about=about, artefact=artefact.name, eval_samples=len(eval_x),
        reference_top1=top1(reference, eval_y), device_top1=top1(outputs, eval_y), top1_drop=round(float(drop), 6),
        agreement=agree, host_top1=top1(host, eval_y), host_agreement=agreement(outputs, host),
        host_max_diff=float(np.max(np.abs(outputs - host))), baseline=baseline,
        host_max_diff_steps=_in_steps(float(np.max(np.abs(outputs - host))), folder / ARTEFACT[runtime]), thresholds=asdict(thresholds),
        passed=not failures, failures=tuple(failures), device_seconds=round(seconds, 1), instructions=instructions,
        board=estimate, images=images,
        reference="dense_fp32" if _references(folder, runtime) else f"{ARTEFACT[runtime]} (host TFLM)")


def _on_microcontroller(folder: Path, device: Device, eval_x: np.ndarray, *, firmware: dict, board: dict,
                        cycle_sample: np.ndarray) -> tuple:
    """A microcontroller build through the benchmark firmware's serial protocol, on the emulated board (qemu) or a
    real one: (dequantized outputs, seconds, what ran, instructions per inference, board figures). The figures are
    the cycle engine's estimate (the measuring harness on the emulated board, one image); a real board adds its own
    DWT cycles and milliseconds, which become the figures, with the estimate and their ratio beside them."""
    from pipeline.device.benchmark_board import on_board
    from pipeline.tflm import interpreter

    tflite, cpu = folder / ARTEFACT["tflite-micro"], firmware["cpu"]
    url = None if device.kind == "qemu" else device.url
    run, host = on_board(url, tflite, eval_x, cpu=cpu, elf=folder / FIRMWARE_ELF, baud=firmware.get("baud", 115200))
    io_q = interpreter.io_quant(tflite.read_bytes())
    outputs = interpreter.dequantize_output(run.outputs, io_q)
    _, _, _, instructions, estimate = run_firmware_on_device(folder / MEASURE_ELF, tflite, cycle_sample[None],
                                                             cpu=cpu, clock_mhz=board.get("clock_mhz", 0.0))
    where = f"the emulated {cpu}" if url is None else url
    about = f"benchmark firmware (MLPerf Tiny serial protocol) on {where}, {len(eval_x) / run.seconds:.1f} images/s"
    if run.cycles is not None:
        estimated = estimate.get("cycles")
        estimate = {"source": "measured", "latency_source": "measured", "cycles": run.cycles, "ms": run.milliseconds,
                    "estimated_cycles": estimated,
                    "estimated_ms": estimate.get("ms"), "estimate_missing": estimate.get("missing"),
                    "estimate_ratio": round(estimated / run.cycles, 4) if estimated else None}
    differing = int(np.any(run.outputs != host, axis=1).sum())  # the firmware against the host TFLM, bit for bit
    return outputs, run.seconds, about, instructions, {**estimate, "host_tflm_outputs_differing": differing}


def check_packed(files: dict[str, bytes], **settings) -> tuple[RegressReport, dict[str, bytes]]:
    """`check_on_device` on a build shipped as bytes (relative path -> content), wherever the board is: returns
    the report and the device baselines it wrote, for the build's home to keep."""
    with tempfile.TemporaryDirectory(prefix="cnn-deploy-check-") as tmp:
        root = Path(tmp)
        for name, data in files.items():
            write_bytes(root / name, data)
        report = check_on_device(root, **settings)
        written = {str(p.relative_to(root)): p.read_bytes() for p in (root / BASELINE_DIR).glob("*")
                   if p.is_file() and files.get(str(p.relative_to(root))) != p.read_bytes()}
    return report, written


def device_check_job(folder: Path, *, runtime: str, target: str, device: Device, **settings) -> Job:
    """The device check of one build as a job that asks for its board (`board_resource`): on a Ray cluster it
    runs on a node that declares the board, here it runs in this process."""
    files = {name: (folder / name).read_bytes()
             for name in _check_complete(folder, runtime=runtime, target=target, device=device)}
    return Job(f"device check {target} on {device.spec}", check_packed, (files,),
               {"runtime": runtime, "target": target, "device": device, **settings},
               resources={board_resource(target, device.kind): 1})


def keep_written(folder: Path, written: dict[str, bytes]) -> None:
    for name, data in written.items():
        write_bytes(folder / name, data)


def regress(build_dir: str | Path, *, device: str | None = None, eval_samples: int | None = None,
            data: str | None = None, accept: bool = False, images: str | None = None) -> RegressReport:
    """Regression-test a deployed build (`build/<target>/`) on its device; writes `regress.json` beside it."""
    return regress_all([build_dir], device=device, eval_samples=eval_samples, data=data, accept=accept,
                       images=images)[0]


def perf_images(data_name: str, input_shape) -> Path | None:
    """MLPerf Tiny's performance images for a CIFAR-10 build of 32x32 RGB input, where the file is here."""
    cifar = data_name == "CIFAR-10" and list(input_shape) == [3, 32, 32]
    path = Path(os.environ.get("MLPERF_TINY_DIR") or DEFAULT_MLPERF_DIR) / PERF_IMAGES
    return path if cifar and path.is_file() else None


def _indices(path: Path, count: int) -> np.ndarray:
    try:
        idx = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot read test-image indices from {path}: {exc}") from exc
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or len(idx) == 0 or idx.min() < 0 or idx.max() >= count:
        raise InputError(f"{path} holds {idx.dtype} of shape {idx.shape}; expected indices into the {count:,} test "
                         "images (a 1-D integer array)")
    return idx


def _regress_job(build_dir: str | Path, *, device: str | None, eval_samples: int | None, data: str | None,
                 accept: bool, images: str | None = None) -> Job:
    folder = Path(build_dir)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        profile, settings = manifest["target_profile"], manifest["settings"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{folder} holds no complete build ({exc}); run `make deploy` first") from exc
    dev = parse_device(device or profile["device"]["default"])
    if profile["runtime"] == "onnxruntime" and dev.kind == "serial":
        raise InputError(f"Target {profile['name']!r} runs ONNX Runtime on a board with an OS; {dev.spec!r} is a "
                         "serial port, which microcontroller builds' benchmark firmware answers on. Use DEVICE=qemu or "
                         "DEVICE=ssh://user@host")
    if profile["runtime"] == "tflite-micro" and dev.kind == "ssh":
        raise InputError(f"Target {profile['name']!r} runs TFLite Micro; device {dev.spec!r} runs ONNX Runtime. "
                         "Use DEVICE=tflm (the host interpreter) or DEVICE=qemu (the firmware on the emulated board)")
    if profile["runtime"] == "onnxruntime" and dev.kind == "tflm":
        raise InputError(f"Target {profile['name']!r} runs ONNX Runtime; use DEVICE=qemu or DEVICE=ssh://user@host")
    # by default the images the deploy's device check ran, so the baseline it recorded applies
    samples = settings.get("device_samples", profile["device"]["samples"]) if eval_samples is None else eval_samples
    splits = load_data(data if data is not None else settings.get("data"), hint=Hint(*settings["input_shape"]))
    test = splits.test
    idx = balanced_subset(test.y, samples or None, seed=settings.get("seed", 0))
    board_run = dev.kind == "serial" or (dev.kind == "qemu" and profile["runtime"] == "tflite-micro")
    chosen = Path(images) if images else perf_images(splits.name, settings["input_shape"]) \
        if board_run and eval_samples is None else None
    if chosen is not None:
        idx = _indices(chosen, len(test.y))
    x = preprocess(test.x[idx], mean=settings["mean"], std=settings["std"])
    return device_check_job(folder, runtime=profile["runtime"], target=profile["name"], device=dev,
                            thresholds=Thresholds(**profile["thresholds"]), eval_x=x, eval_y=test.y[idx], accept=accept,
                            firmware=profile.get("firmware"), board=board_settings(profile),
                            cycle_sample=preprocess(test.x[:1], mean=settings["mean"], std=settings["std"])[0],
                            images=f"the test images indexed by {chosen}" if chosen else "")


def board_settings(profile: dict) -> dict | None:
    """A profile's [board] section (as a dict, e.g. a build's recorded profile), its core resolved as
    `TargetProfile.core` does; None for builds from before the section."""
    board = profile.get("board")
    if board is None:
        return None
    return {**board, "core": board["core"] or (profile.get("firmware") or {}).get("cpu", "")}


def regress_all(build_dirs: list[str | Path], *, device: str | None = None, eval_samples: int | None = None,
                data: str | None = None, accept: bool = False, images: str | None = None,
                log=print) -> list[RegressReport]:
    """Regression-test several builds, each on its own board: one after another here, at once on a Ray cluster's
    board farm (RAY_ADDRESS). Each build's `regress.json` and device baselines are written beside it."""
    build_dirs = [check_build(d) for d in build_dirs]
    with writing(*build_dirs):
        jobs = [_regress_job(d, device=device, eval_samples=eval_samples, data=data, accept=accept, images=images)
                for d in build_dirs]
        reports = []
        for build_dir, (report, written) in zip(build_dirs, connect().run(jobs, desc="regress", progress=False, log=log),
                                                strict=True):
            keep_written(build_dir, written)
            write_text(build_dir / "regress.json", json.dumps(report.to_dict(), indent=2) + "\n")
            # a real board's DWT time becomes the build's latency, once the run is complete
            record_board_time(build_dir, measured_on_board(report.board, device=report.device,
                                                           samples=report.eval_samples))
            reports.append(report)
    return reports
