"""A full-int8 .tflite measured as it is: `make deploy TARGET=<microcontroller> MODEL=model_int8.tflite`.

The other orchestration besides `deploy.py`, for a file that cannot be compressed (its float weights are gone; the
report says so). In order: read the file and the data -> host TFLite Micro (top-1, arena, flash, LiteRT beside
it) -> C sources -> firmware on the emulated board (bit-exact with the host, instructions, the board's estimated
cycles and ms) -> the benchmark firmware (MLPerf Tiny's serial protocol, and the profile's real board's image) ->
report -> manifest. The build is staged beside the output and swapped in whole, as a deploy's is, and `make
regress` runs on it the same way.
"""

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from calib import Hint, balanced_subset, load_data, preprocess
from pipeline.device.benchmark_board import benchmark_for_build
from pipeline.errors import ConfigError, DeviceError, InputError
from pipeline.metrics import VariantReport, estimated_on
from pipeline.output import check_output, mark
from pipeline.report.deploy_report import DeployReport, write_reports
from pipeline.report.manifest import write_manifest
from pipeline.tflm import interpreter
from pipeline.tflm.build import check_toolchain, sources_root
from pipeline.tflm.firmware import arena_with_margin, emit_mcu, io_of, model_sources
from pipeline.tflm.measure import measure_tflite
from pipeline.tflm.on_board import device_arena, measure_on_board, write_firmware_folder
from pipeline.tflm.ops import RESOLVER_CALLS
from pipeline.util import sha256_file, staging_beside, swap_in
from pipeline.zoo.tflite_file import read_tflite
from targets import TargetProfile

SEED = 0
VARIANT = "given_int8"
WHY = ("Not compressed: the file is full int8, so its float weights, which factorisation and channel cuts work on, "
       "are gone; it is measured as it is. Give its float model (.tflite, .keras, .h5, SavedModel, .onnx) to "
       "compress it.")


def is_int8_tflite(model: str) -> bool:
    return model.lower().endswith(".tflite") and Path(model).is_file() and read_tflite(model).precision == "int8"


def _log(message: str) -> None:
    print(f"[measure] {message}", flush=True)


def _checked_file(profile: TargetProfile, model: str):
    found = read_tflite(model)
    if profile.runtime != "tflite-micro":
        raise ConfigError(f"Model {model!r} is a full-int8 TFLite file, which runs on microcontroller targets (TFLite "
                          f"Micro); {profile.name} runs ONNX Runtime: give the float model instead (.onnx, .keras, "
                          f".h5, a SavedModel folder or a float .tflite)")
    if found.input_type != "INT8":
        raise InputError(f"Model {model!r} takes {found.input_type} input; the firmware feeds int8 (convert with "
                         f"inference_input_type=tf.int8 and inference_output_type=tf.int8)")
    missing = sorted(set(found.operators) - set(RESOLVER_CALLS))
    if missing:
        raise InputError(f"Model {model!r} uses operators the firmware does not register: {', '.join(missing)}; "
                         f"it knows {', '.join(sorted(RESOLVER_CALLS))}")
    return found


def check_given_baseline(baseline: str, profile: TargetProfile) -> None:
    """BASELINE= must be a full-int8 .tflite the profile's firmware can run."""
    if not str(baseline).lower().endswith(".tflite") or read_tflite(baseline).precision != "int8":
        raise InputError(f"BASELINE={baseline}; expected the model's own full-int8 .tflite")
    _checked_file(profile, baseline)


def measure_int8_file(profile: TargetProfile, *, model: str, data: str | None, samples: int, mean, std,
                      out: Path, progress: bool, started: float) -> DeployReport:
    """Measure the int8 .tflite `model` for `profile` (a microcontroller) on `samples` test samples of `data` (0:
    all), fed (x - mean) / std then quantized by the file's own input scale; write the build to `out`."""
    from pipeline.deploy import check_memory  # the one home of the fit check (an orchestration's own helper)
    from pipeline.zoo import per_channel

    found = _checked_file(profile, model)
    if mean is None or std is None:
        raise InputError(f"Model {model!r} does not say how its input is normalised: give MEAN= and STD= (a file "
                         f"taking raw 0..255 pixels: MEAN=0 STD=0.00392156862745098; the data is read in 0..1)")
    path = Path(model).resolve()
    mean, std = per_channel(mean, "mean", found.input_shape[0], model), per_channel(std, "std", found.input_shape[0], model)
    model_bytes = path.read_bytes()
    classes = int(np.prod(interpreter.run_tflm(model_bytes, np.zeros((1, *found.input_shape[1:],
                                                                       found.input_shape[0]), np.int8)).shape[1:]))
    splits = load_data(data, hint=Hint(*found.input_shape))
    splits.check_for(input_shape=found.input_shape, num_classes=classes, model=model)
    idx = balanced_subset(splits.test.y, samples or None, seed=SEED)
    eval_x, eval_y = preprocess(splits.test.x[idx], mean=mean, std=std), splits.test.y[idx]
    names = splits.classes or tuple(f"class{i}" for i in range(classes))
    staging = staging_beside(out)
    notes, failures = [WHY], []
    try:
        tflite = staging / "model.tflite"
        shutil.copyfile(path, tflite)
        _log(f"measure {path.name} in TFLite Micro on {len(eval_y)} test images")
        variant, _ = measure_tflite(tflite, quantized_onnx=None, eval_x=eval_x, eval_y=eval_y, class_names=names,
                                    reference=None, latency_runs=profile.evaluation.latency_runs,
                                    latency_warmup=profile.evaluation.latency_warmup, label=VARIANT, progress=progress)
        details = variant.details
        io = io_of(details, {"input_shape": list(found.input_shape), "mean": list(mean), "std": list(std),
                             "class_names": list(names)})
        arena = arena_with_margin(details["arena_bytes"], profile.memory.arena_margin)
        check_memory(profile.memory, arena=arena, flash=details["flash_bytes"], largest=details["largest_tensors"],
                     target=profile.name)
        emitted = emit_mcu(staging, tflite=tflite, arena_bytes=arena, io=io)
        variant = _firmware(profile, staging, variant, eval_x, arena=arena, io=io, notes=notes, failures=failures)
        report = DeployReport(
            target=profile.name, model=str(path), data=splits.describe(), class_names=names,
            variants={VARIANT: variant}, decomposition={"method": None, "why": WHY}, eval_samples=int(len(eval_y)),
            thresholds=profile.to_dict()["thresholds"], passed=not failures, top1_drop=0.0, notes=tuple(notes),
            failures=tuple(failures), wall_seconds=round(time.perf_counter() - started, 1),
            model_source={"file": str(path), "sha256": sha256_file(path), "format": "tflite", "precision": "int8"})
        reports = write_reports(staging, report, "")
        folder = staging / "firmware"
        artefacts = [*emitted.values(), *(p for p in sorted(folder.rglob("*")) if p.is_file())]
        write_manifest(staging, artefacts=artefacts, reports=reports, checkpoint=str(path),
                       checkpoint_sha256=report.model_source["sha256"], profile=profile.to_dict(),
                       settings={"model": str(path), "eval_samples": int(len(eval_y)), "data": splits.location,
                                 "data_set": splits.describe(), "device_samples": samples, "seed": SEED,
                                 "input_shape": list(found.input_shape), "mean": list(mean), "std": list(std)},
                       passed=report.passed)
        mark(staging, "deploy")
        check_output(out, kind="deploy")  # still ours: nothing else moved in while the run worked
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _firmware(profile: TargetProfile, staging: Path, variant: VariantReport, eval_x: np.ndarray, *, arena: int,
              io: dict, notes: list[str], failures: list[str]) -> VariantReport:
    """The file as firmware on the emulated board, its benchmark firmware beside it; the variant with the
    board's estimate as its latency. Where the toolchain is missing, the build says so and goes on."""
    firmware = profile.firmware
    try:
        check_toolchain()
        root = sources_root(firmware.sources)
    except DeviceError as exc:
        notes.append(f"firmware not built: {exc}")
        return variant
    x = eval_x[:firmware.samples]
    tflite, folder = staging / "model.tflite", staging / "firmware"
    _log(f"firmware for {firmware.cpu}: build, run {len(x)} test images on the emulated board")
    needed = device_arena(tflite, host_arena=arena, io=io, cpu=firmware.cpu, root=root, x_nchw=x)
    if needed > arena:
        notes.append(f"kTensorArenaSize raised from {arena:,} (host measure + margin) to {needed:,} bytes, what TFLM "
                     f"with CMSIS-NN used on the emulated {firmware.cpu}")
        model_sources(staging, tflite.read_bytes(), arena_bytes=needed, io=io)
    folder.mkdir()
    write_firmware_folder(folder, staging, cpu=firmware.cpu, root=root)
    figures = {**measure_on_board(tflite, folder, folder / "measure.elf", cpu=firmware.cpu, root=root, x_nchw=x,
                                  clock_mhz=profile.board.clock_mhz, log=_log),
               "arena_bytes": max(arena, needed), "device_arena_bytes": needed}
    if not figures["bit_exact"]:
        failures.append(f"firmware on {firmware.cpu}: outputs differ from the host TFLM interpreter on "
                        f"{figures['outputs_differing']} of {figures['samples']} images")
    _log("benchmark firmware (MLPerf Tiny's serial protocol)")
    figures["benchmark"] = benchmark_for_build(staging, x, cpu=firmware.cpu, root=root,
                                               firmware=dataclasses.asdict(firmware),
                                               memory=dataclasses.asdict(profile.memory), log=_log)
    if not figures["benchmark"]["protocol"]["bit_exact"]:
        failures.append(f"benchmark firmware on the emulated {firmware.cpu}: outputs differ from the host TFLM "
                        f"interpreter on {figures['benchmark']['protocol']['outputs_differing']} of {len(x)} images")
    variant.details["firmware"] = figures
    board = figures["board"]
    if board:
        variant = dataclasses.replace(variant, board=board)
        if board["ms"] is not None:
            variant = variant.with_latency("estimated", board["ms"], estimated_on(board))
    return variant
