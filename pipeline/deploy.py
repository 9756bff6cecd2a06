"""Deploy orchestration: the only place that knows the order of the stages (`STAGES`).

compress -> export (export, simplify, quantize) -> convert (the runtime's format) -> measure -> a TensorFlow file's
own top-1 on the same images -> board cycles
(ARM Linux boards: the ONNX variants in the emulated Pi) -> time on a board (DEVICE=ssh://...) -> emit -> firmware
(microcontrollers, with their board cycles) -> device check -> report -> manifest. Each stage is a function of the `Build` it fills in. The build is
assembled in a staging folder beside the output and swapped in only when complete, so a failure or Ctrl-C
leaves the previous build intact.
"""

import dataclasses
import functools
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from calib import Dataset, DataSplits, Hint, balanced_subset, load_data, preprocess
from pipeline.cluster import connect
from pipeline.compress.budget.macs import count
from pipeline.compress.stage import Compressed, compress
from pipeline.compress.teacher import as_teacher, check_teacher_settings
from pipeline.compute import torch_device as resolve_torch_device
from pipeline.cycles.tools import require
from pipeline.device.benchmark_board import benchmark_for_build
from pipeline.device.board_cycles import TOOLS as ONNX_CYCLE_TOOLS
from pipeline.device.board_cycles import onnx_cycles
from pipeline.device.board_time import measured_on_board, with_board_time
from pipeline.device.layer_cycles import OnnxLayerCycles
from pipeline.device.regress import board_settings, device_check_job, keep_written
from pipeline.device.transports import Device, parse_device, time_on_device
from pipeline.errors import ConfigError, DeviceError, InputError, StageError
from pipeline.measure_int8 import check_given_baseline, is_int8_tflite, measure_int8_file
from pipeline.metrics import VariantReport, estimated_on
from pipeline.onnx.chain import from_onnx_file, to_onnx
from pipeline.ort.emit import emit_onnxruntime
from pipeline.ort.layer_latency import OrtLayerLatency
from pipeline.ort.measure import measure_onnx
from pipeline.output import build_folder, check_output, mark, writing
from pipeline.report.budgets import check_arena, check_cycles
from pipeline.report.compare import worse_than_dense
from pipeline.report.deploy_report import DeployReport, write_reports
from pipeline.report.manifest import write_manifest
from pipeline.tflm.board_cycles import CYCLE_TOOLS
from pipeline.tflm.build import check_toolchain, sources_root
from pipeline.tflm.convert import convert_to_tflite
from pipeline.tflm.firmware import arena_with_margin, emit_mcu, io_of
from pipeline.tflm.layer_cost import FirmwareLayerCycles
from pipeline.tflm.measure import measure_tflite
from pipeline.tflm.on_board import firmware_for_build
from pipeline.util import sha256_file, staging_beside, swap_in
from pipeline.zoo import ModelSpec, load_model
from pipeline.zoo.tensorflow_model import check_original, is_tensorflow_model
from pipeline.zoo.tflite_file import read_tflite
from targets import Memory, TargetProfile, load_target
from targets.budget import parse_budget

SEED = 0
CHECK_SAMPLES = 64  # real test images used to check export and simplification
VARIANTS = ("dense_fp32", "dense_int8", "factored_fp32", "factored_int8")  # measured in this order


def _stage(message: str) -> None:
    print(f"[deploy] {message}", flush=True)


@dataclass
class Build:
    """What the stages hand each other: the inputs, then the files and figures each stage adds."""

    profile: TargetProfile
    spec: ModelSpec
    data: DataSplits
    eval_x: np.ndarray
    eval_y: np.ndarray
    staging: Path
    board: Device | None  # a board that keeps time (DEVICE=ssh://...), for the latencies
    device_samples: int  # test samples of the device check (0: all); `make regress` uses the same by default
    progress: bool
    started: float = field(default_factory=time.perf_counter)
    compressed: Compressed | None = None
    onnx: dict[str, Path] = field(default_factory=dict)  # by variant name
    tflite: dict[str, Path] = field(default_factory=dict)  # dense, factored (microcontrollers)
    variants: dict[str, VariantReport] = field(default_factory=dict)
    emitted: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # where factoring made a cost worse: reported, not failed
    device: dict | None = None
    given_baseline: Path | None = None  # BASELINE=: the user's own int8 .tflite, the dense_int8 variant as it is
    teacher: ModelSpec | None = None  # TEACHER=: what fine-tuning distils from instead of the dense model
    dense_logits: np.ndarray | None = None  # dense fp32 on the evaluation images
    report: DeployReport | None = None
    reports: list[Path] = field(default_factory=list)

    @property
    def train_set(self) -> Dataset:
        return self.data.train

    @property
    def test_set(self) -> Dataset:
        return self.data.test

    @property
    def class_names(self) -> tuple[str, ...]:
        """The data's names, else the model's, else class0..classN-1: a report never names classes it lacks."""
        names = self.data.classes or self.spec.class_names
        return names if names is not None else tuple(f"class{i}" for i in range(self.spec.num_classes))

    @property
    def model_io(self) -> dict:
        """What firmware needs to know of the model's input and output, besides quantization."""
        return {"input_shape": list(self.spec.input_shape), "mean": list(self.spec.mean), "std": list(self.spec.std),
                "class_names": list(self.class_names)}

    @property
    def baseline(self) -> Path:
        return self.staging / "baseline"

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        return preprocess(x, mean=self.spec.mean, std=self.spec.std)

    @functools.cached_property
    def calibration(self) -> np.ndarray:
        """The images every int8 variant is calibrated on: one calibration shared by every target."""
        train = self.train_set
        return self.preprocess(train.x[balanced_subset(train.y, self.profile.quantization.calibration_samples,
                                                       seed=SEED)])

    @property
    def cycle_sample(self) -> np.ndarray:
        """The input cycles are estimated on: the test set's first, so `make regress` estimates on the same one."""
        return self.preprocess(self.test_set.x[:1])[0]


# ---- the stages, in order ---------------------------------------------------------------------------------

def compress_model(build: Build) -> None:
    settings, tuning = build.profile.decomposition, build.profile.finetune
    how = f"budget {settings.budget}" if settings.budget else f"{settings.method}, rank {settings.rank}"
    fine = f", then {tuning.epochs} epochs of distillation" if tuning.epochs else ""
    _stage(f"decompose {build.spec.name} ({how}{fine})")
    cost = layer_cost_for(build.profile, calibration=build.calibration, sample=build.cycle_sample, log=_stage)
    build.compressed = compress(build.spec, build.train_set, settings=settings, tuning=tuning, layer_cost=cost,
                                teacher=build.teacher, seed=SEED, progress=build.progress, log=_stage)
    print(build.compressed.plan_table(), flush=True)


def export_models(build: Build) -> None:
    build.baseline.mkdir()
    for name, module in (("dense", build.spec.module), ("factored", build.compressed.model)):
        _stage(f"export + simplify + quantize ({name})")
        source = build.spec.source if name == "dense" else None  # an ONNX model's baseline is its own file
        chain = functools.partial(from_onnx_file, Path(source["onnx"])) if source else functools.partial(to_onnx, module)
        pair = chain(build.baseline, name, check_inputs=build.eval_x[:CHECK_SAMPLES], calibration=build.calibration,
                     quantization=build.profile.quantization)
        build.onnx.update({f"{name}_fp32": pair.fp32, f"{name}_int8": pair.int8})
        build.notes += [f"{name}: {note}" for note in pair.notes]
        if source and "tensorflow" in source:  # the build keeps what the original file was converted to
            shutil.copyfile(source["onnx"], build.baseline / "converted.onnx")
        if source:
            build.notes.append(f"dense: the torch module read from it (factored and fine-tuned from there) matches "
                               f"ONNX Runtime on the file to {source['max_abs_diff']:.2g} (max abs, opset "
                               f"{source['opset']}, {source['nodes']} nodes)")


def convert_models(build: Build) -> None:
    RUNTIMES[build.profile.runtime].convert(build)


def measure_variants(build: Build) -> None:
    runtime = RUNTIMES[build.profile.runtime]
    _stage(f"measure four variants on {len(build.eval_y)} test images ({runtime.about})")
    reference = None
    for name in VARIANTS:
        measure = runtime.measure_int8 if name.endswith("int8") else _measure_ort
        build.variants[name], logits = measure(build, name, reference)
        reference = logits if reference is None else reference
    build.dense_logits = reference
    details = build.variants["factored_int8"].details
    drop = build.variants["dense_fp32"].top1 - build.variants["factored_int8"].top1
    build.failures += [f"threshold missed: {f}" for f in build.profile.thresholds.failures(
        top1_drop=drop, ort_agreement=details.get("ort_agreement"),
        max_output_diff_steps=details.get("max_output_diff_steps"))]
    if "arena_bytes" in details:
        check_memory(build.profile.memory, arena=arena_with_margin(details["arena_bytes"], build.profile.memory.arena_margin),
                     flash=details["flash_bytes"], largest=details["largest_tensors"], target=build.profile.name)


def check_original_file(build: Build) -> None:
    """A Keras, SavedModel or TFLite file: its own top-1 in TensorFlow on the same images equals the baseline's."""
    source = build.spec.source or {}
    if "tensorflow" not in source:
        return
    _stage(f"run the original {source['format']} file on the {len(build.eval_y)} test images")
    note, failure = check_original(source, build.eval_x, build.eval_y, dense_logits=build.dense_logits,
                                   mean=build.spec.mean, std=build.spec.std,
                                   normalised_inside=source["normalised_inside"])
    build.notes.append(note)
    build.failures += [failure] if failure else []


def set_board_estimate(build: Build, name: str, figures: dict) -> None:
    """A variant's estimated board figures; its latency becomes the board's estimate unless a board timed it."""
    variant = dataclasses.replace(build.variants[name], board=figures)
    if figures["ms"] is not None and variant.latency_source == "host":
        variant = variant.with_latency("estimated", figures["ms"], estimated_on(figures))
    build.variants[name] = variant


def estimate_board_cycles(build: Build) -> None:
    """ARM Linux boards: the four ONNX variants run by the aarch64 ONNX Runtime in the emulated board, their
    executed blocks timed on the board's core. Where the tools are missing the deploy goes on and says so."""
    profile = build.profile
    if profile.runtime != "onnxruntime" or not profile.core:
        return
    _stage(f"estimate {profile.core} cycles of the four variants (aarch64 ONNX Runtime in qemu, llvm-mca)")
    try:
        figures = onnx_cycles([build.onnx[name] for name in VARIANTS], sample=build.cycle_sample, core=profile.core,
                              clock_mhz=profile.board.clock_mhz, log=_stage)
    except DeviceError as exc:
        build.notes.append(f"board cycles not estimated, latency is this host's: {exc}")
        _stage(f"board cycles not estimated: {exc}")
        return
    for name, measured in zip(VARIANTS, figures, strict=True):
        set_board_estimate(build, name, measured)


def time_on_board(build: Build) -> None:
    """With a board that keeps time (DEVICE=ssh://...), the ONNX Runtime variants' latency is the board's."""
    if build.board is None or build.board.kind != "ssh" or build.profile.runtime != "onnxruntime":
        return
    _stage(f"time the four variants on {build.board.spec}")
    evaluation = build.profile.evaluation
    times, about = time_on_device(build.board, [build.onnx[name] for name in VARIANTS], runs=evaluation.latency_runs,
                                  warmup=evaluation.latency_warmup)
    for name, latency in zip(VARIANTS, times, strict=True):
        build.variants[name] = build.variants[name].with_latency("measured", round(latency, 4),
                                                                 f"measured on {build.board.spec} ({about})")


def emit_artefacts(build: Build) -> None:
    RUNTIMES[build.profile.runtime].emit(build)


def build_firmware(build: Build) -> None:
    """Microcontrollers: the int8 variants as firmware on the emulated board (when the toolchain is here)."""
    firmware = build.profile.firmware
    if build.profile.runtime != "tflite-micro" or not firmware.cpu:
        return
    try:
        check_toolchain()
        root = sources_root(firmware.sources)
    except DeviceError as exc:
        build.notes.append(f"firmware not built: {exc}")
        _stage(f"firmware not built: {exc}")
        return
    x = build.eval_x[:firmware.samples]
    _stage(f"firmware for {firmware.cpu}: build, run {len(x)} test images on the emulated board")
    details = {name: build.variants[name].details for name in ("dense_int8", "factored_int8")}
    margin = build.profile.memory.arena_margin
    margin_arenas = {n: arena_with_margin(d["arena_bytes"], margin) for n, d in details.items()}
    figures, notes = firmware_for_build(
        build.staging, cpu=firmware.cpu, root=root, x_nchw=x, log=_stage, arenas=margin_arenas,
        ios={n: io_of(d, build.model_io) for n, d in details.items()}, clock_mhz=build.profile.board.clock_mhz)
    build.notes += notes
    for name, measured in figures.items():
        build.variants[name].details["firmware"] = measured
        if measured["board"]:
            set_board_estimate(build, name, measured["board"])
        elif "board_missing" in measured and measured["board_missing"] not in " ".join(build.notes):
            build.notes.append(f"board cycles not estimated, instructions only: {measured['board_missing']}")
        if not measured["bit_exact"]:
            build.failures.append(f"firmware on {firmware.cpu}: {name} outputs differ from the host TFLM interpreter "
                                  f"on {measured['outputs_differing']} of {measured['samples']} images")
    factored = figures["factored_int8"]
    if factored["arena_bytes"] > margin_arenas["factored_int8"]:  # the device needed more: does the part still fit?
        check_memory(build.profile.memory, arena=factored["arena_bytes"], flash=factored["flash_model_bytes"],
                     largest=details["factored_int8"]["largest_tensors"], target=build.profile.name)
    folder = build.staging / "firmware"
    _stage(f"benchmark firmware (MLPerf Tiny's serial protocol) for the emulated board{' and ' + firmware.board if firmware.board else ''}")
    images = benchmark_for_build(build.staging, x, cpu=firmware.cpu, root=root, firmware=dataclasses.asdict(firmware),
                                 memory=dataclasses.asdict(build.profile.memory), log=_stage)
    build.variants["factored_int8"].details["firmware"]["benchmark"] = images
    if not images["protocol"]["bit_exact"]:
        build.failures.append(f"benchmark firmware on the emulated {firmware.cpu}: outputs differ from the host TFLM "
                              f"interpreter on {images['protocol']['outputs_differing']} of {len(x)} images")
    build.emitted.update({f"firmware/{p.relative_to(folder)}": p for p in sorted(folder.rglob("*")) if p.is_file()})


def check_device(build: Build) -> None:
    device = build.profile.device
    if not device.check_on_deploy:
        return
    test = build.test_set
    idx = balanced_subset(test.y, build.device_samples or None, seed=SEED)
    # a job that asks for the board: on a Ray cluster (RAY_ADDRESS) it runs on the node the board is attached to
    job = device_check_job(build.staging, runtime=build.profile.runtime, target=build.profile.name,
                           thresholds=build.profile.thresholds, eval_x=build.preprocess(test.x[idx]),
                           eval_y=test.y[idx], device=parse_device(device.default), accept=True,
                           firmware=dataclasses.asdict(build.profile.firmware),
                           board=board_settings(build.profile.to_dict()),
                           cycle_sample=build.cycle_sample)
    report, written = connect().run([job], desc="device check", progress=False, log=_stage)[0]
    keep_written(build.staging, written)
    build.failures += [f"device check on {report.device}: {f}" for f in report.failures]
    build.device = report.to_dict()
    build.variants["factored_int8"] = with_board_time(build.variants["factored_int8"], measured_on_board(
        report.board, device=report.device, samples=report.eval_samples))


def compare_with_dense(build: Build) -> None:
    """Every cost the factored int8 model pays over the dense one, with the layers responsible."""
    inner = {}  # each factored layer's largest tensor inside its chain, in int8 bytes
    costs = count(build.compressed.model, build.spec.input_shape)
    for layer in build.compressed.plan.layers:
        sizes = [math.prod(c.input_shape) for name, c in costs.items()
                 if name.startswith(f"{layer.name}.") and not name.endswith(".0")] if layer.method else []
        if sizes:
            inner[layer.name] = max(sizes)
    build.warnings = worse_than_dense(build.variants, build.compressed.plan, intermediate_bytes=inner,
                                      latency_tolerance=build.profile.evaluation.latency_tolerance)
    build.warnings += check_cycles(build.compressed.allocation, build.variants)
    build.warnings += check_arena(build.compressed.allocation, build.variants)
    for warning in build.warnings:
        _stage(f"warning: {warning}")


def write_report(build: Build) -> None:
    drop = build.variants["dense_fp32"].top1 - build.variants["factored_int8"].top1
    report = DeployReport(target=build.profile.name, model=build.spec.name, data=build.data.describe(),
                          class_names=build.class_names, warnings=tuple(build.warnings), variants=build.variants,
                          decomposition=build.compressed.record(), eval_samples=int(len(build.eval_y)),
                          thresholds=build.profile.to_dict()["thresholds"], passed=not build.failures,
                          top1_drop=round(float(drop), 6), notes=tuple(build.notes), failures=tuple(build.failures),
                          device=build.device, wall_seconds=round(time.perf_counter() - build.started, 1),
                          model_source=build.spec.source)
    build.report, build.reports = report, write_reports(build.staging, report, build.compressed.plan_table())


def write_build_manifest(build: Build) -> None:
    spec = build.spec
    write_manifest(build.staging, artefacts=[*build.emitted.values(), *build.baseline.iterdir()], reports=build.reports,
                   checkpoint=spec.weights, checkpoint_sha256=spec.weights_sha256, profile=build.profile.to_dict(),
                   settings={"model": spec.name, "eval_samples": int(len(build.eval_y)),
                             "data": build.data.location, "data_set": build.data.describe(),
                             "device_samples": build.device_samples, "seed": SEED, "input_shape": list(spec.input_shape),
                             "mean": list(spec.mean), "std": list(spec.std)},
                   passed=not build.failures)


STAGES: tuple[Callable[[Build], None], ...] = (compress_model, export_models, convert_models, measure_variants,
                                               check_original_file,
                                               estimate_board_cycles, time_on_board, emit_artefacts, build_firmware,
                                               check_device, compare_with_dense, write_report, write_build_manifest)


# ---- what differs between runtimes ------------------------------------------------------------------------

def _measure_ort(build: Build, name: str, reference) -> tuple[VariantReport, np.ndarray]:
    evaluation = build.profile.evaluation
    return measure_onnx(build.onnx[name], eval_x=build.eval_x, eval_y=build.eval_y, class_names=build.class_names,
                        reference=reference, latency_runs=evaluation.latency_runs,
                        latency_warmup=evaluation.latency_warmup, label=name, progress=build.progress)


def _emit_ort(build: Build) -> None:
    _stage("emit onnxruntime artefacts")
    build.emitted = emit_onnxruntime(build.staging, int8_onnx=build.onnx["factored_int8"],
                                     fp32_onnx=build.onnx["factored_fp32"])
    for name in ("factored_fp32", "factored_int8"):  # emitted under their deployed names: not kept twice
        build.onnx.pop(name).unlink()


def _convert_tflite(build: Build) -> None:
    _stage("convert int8 ONNX to TFLite (dense and factored)")
    build.tflite = {name: convert_to_tflite(build.onnx[f"{name}_int8"], build.baseline / f"{name}.int8.tflite")
                    for name in ("dense", "factored")}
    given = build.given_baseline
    if given is not None:  # the user's own int8 file stands in for ours, byte for byte
        shutil.copyfile(given, build.tflite["dense"])
        build.notes.append(f"dense_int8: the given int8 file {given} (sha256 {sha256_file(given)}), measured as it "
                           f"is; the factored model is quantized by this tool")


def _measure_tflite(build: Build, name: str, reference) -> tuple[VariantReport, np.ndarray]:
    evaluation = build.profile.evaluation
    given = name == "dense_int8" and build.given_baseline is not None  # not converted from our ONNX: no ORT check
    return measure_tflite(build.tflite[name.removesuffix("_int8")], quantized_onnx=None if given else build.onnx[name],
                          eval_x=build.eval_x, eval_y=build.eval_y, class_names=build.class_names,
                          reference=reference, latency_runs=evaluation.latency_runs,
                          latency_warmup=evaluation.latency_warmup, label=name, progress=build.progress)


def _emit_firmware_sources(build: Build) -> None:
    _stage("emit firmware sources")
    details = build.variants["factored_int8"].details
    build.emitted = emit_mcu(build.staging, tflite=build.tflite["factored"],
                             arena_bytes=arena_with_margin(details["arena_bytes"], build.profile.memory.arena_margin),
                             io=io_of(details, build.model_io))
    build.tflite.pop("factored").unlink()  # emitted as model.tflite


@dataclass(frozen=True)
class Runtime:
    about: str  # which runtime measures what, for the log
    convert: Callable[[Build], None]  # the int8 ONNX model to the runtime's own format
    measure_int8: Callable[[Build, str, np.ndarray | None], tuple[VariantReport, np.ndarray]]
    emit: Callable[[Build], None]  # the files the board loads


RUNTIMES = {
    "onnxruntime": Runtime("onnxruntime", lambda build: None, _measure_ort, _emit_ort),
    "tflite-micro": Runtime("fp32: onnxruntime, int8: tflite-micro", _convert_tflite, _measure_tflite,
                            _emit_firmware_sources),
}


def layer_cost_for(profile: TargetProfile, *, calibration: np.ndarray | None = None, sample: np.ndarray | None = None,
                   log=print):
    """The target's own per-layer cost for the allocation: estimated cycles on the board's core (the emulated board
    runs the target's runtime; firmware on a microcontroller), the same on every host. A target without a core gets
    this host's ONNX Runtime latency, which only a latency weight uses. `calibration` and `sample` are the deploy's
    (the dense model's count is then the report's). Missing cycle tools are an error where the budget counts cycles,
    else a fallback to the host's latency, said in the log."""
    budget = profile.decomposition.budget
    try:
        if profile.runtime == "tflite-micro" and profile.firmware.cpu:
            check_toolchain()
            require(*CYCLE_TOOLS)
            return FirmwareLayerCycles(profile.quantization, cpu=profile.firmware.cpu,
                                       root=sources_root(profile.firmware.sources), calibration=calibration,
                                       sample=sample, log=log)
        if profile.runtime == "onnxruntime" and profile.core:
            require(*ONNX_CYCLE_TOOLS)
            return OnnxLayerCycles(profile.quantization, core=profile.core, calibration=calibration, sample=sample,
                                   log=log)
    except DeviceError as exc:
        if budget and "cycles" in parse_budget(budget).resources:
            raise DeviceError(f"BUDGET={budget} on {profile.name} counts estimated cycles on the emulated board: "
                              f"{exc}") from exc
        log(f"per-layer cycles not estimated, the allocation weighs this host's latency: {exc}")
    return OrtLayerLatency(profile.quantization)


def check_memory(memory: Memory, *, arena: int, flash: int, largest, target: str) -> None:
    """A model that does not fit the part is an error, with what it needs against what there is."""
    problems = []
    ram = memory.ram_bytes - memory.ram_reserve_bytes
    if memory.ram_bytes and arena > ram:
        biggest = ", ".join(f"{name} {size:,} B" for name, size in largest)
        problems.append(f"arena needs {arena:,} bytes but {ram:,} are free ({memory.ram_bytes:,} RAM - "
                        f"{memory.ram_reserve_bytes:,} reserved); biggest tensors: {biggest}")
    room = memory.flash_bytes - memory.flash_reserve_bytes
    if memory.flash_bytes and flash > room:
        problems.append(f"model needs {flash:,} bytes of flash but {room:,} are free ({memory.flash_bytes:,} flash - "
                        f"{memory.flash_reserve_bytes:,} reserved)")
    if problems:
        raise StageError(f"Model does not fit target {target!r}: " + "; ".join(problems))


# ---- the whole run ----------------------------------------------------------------------------------------

# What a deploy runs when not told otherwise, from make, the CLI and the API alike: MLPerf Tiny's ResNet-8 (shipped
# CIFAR-10 weights), the shape users deploy, at 70% of its MACs allocated by measured sensitivity.
DEFAULT_MODEL = "resnet8"
DEFAULT_BUDGET = "0.7"
NO_BUDGET = "none"  # BUDGET=none: the profile's method and rank on every layer


def default_budget(budget: str | None, *, method: str | None, rank: str | None, profile_budget: str) -> str | None:
    """The budget a deploy applies: the one given; none when a method or rank is given alone or BUDGET=none;
    else the profile's own, or `DEFAULT_BUDGET` when the profile names none."""
    if budget is not None:
        return "" if budget == NO_BUDGET else budget
    if method is not None or rank is not None:
        return ""
    return profile_budget or DEFAULT_BUDGET


def deploy(*, target: str = "rpi4", model: str = DEFAULT_MODEL, weights: str | None = None, method: str | None = None,
           rank: str | None = None, budget: str | None = None, finetune_epochs: int | None = None,
           exclude: list[str] | None = None, candidates: list[str] | None = None, data: str | None = None,
           eval_samples: int | None = None, input_shape: tuple[int, int, int] | None = None, mean=None, std=None, signature: str | None = None,
           baseline: str | None = None, device: str | None = None, teacher: str | None = None,
           teacher_weights: str | None = None, out: str | os.PathLike | None = None, torch_device: str | None = None,
           progress: bool = True) -> DeployReport:
    """Compress `model` (a zoo name, `package.module:callable` or `file.py:callable`, weights from `weights`; an
    ONNX, Keras, SavedModel or float TFLite file; a full-int8 .tflite is measured as it is: `measure_int8`),
    export, quantize and emit it for `target` (a profile name or a path to a .toml), measure the dense and
    factored variants on `eval_samples` test samples from `data` (any layout of `calib.FORMATS`), and write the
    build to `out` (default `build/<the profile's name>`; refused unless absent, empty or an earlier build).

    `method`, `rank`, `budget` (see `default_budget`), `finetune_epochs`, `exclude` and `candidates` (the methods a
    budget may pick: factorisations, `prune`, or both) override the profile's settings; `input_shape`, `mean` and `std` the model's (`signature`: a SavedModel's serving function; `baseline`:
    the model's own full-int8 .tflite, then the dense_int8 variant as it is on a microcontroller; `teacher` and
    `teacher_weights`: a model to distil from instead of the dense one, see `compress.teacher`). Every setting is checked before any work. `device` (DEVICE=) replaces the
    profile's device for the on-device check; a board over SSH also times the layer table and the four variants
    itself. `torch_device` (TORCH_DEVICE=) replaces the profile's `[finetune] device`, where fine-tuning and the
    sensitivity sweep run. Returns the report; `report.passed` says whether every threshold was met. Raises a `PipelineError`
    on bad input, leaving any previous build in `out` as it was."""
    started = time.perf_counter()
    profile = load_target(target)
    budget = default_budget(budget, method=method, rank=rank, profile_budget=profile.decomposition.budget)
    profile = profile.override(
        decomposition={"method": method, "rank": rank, "budget": budget,
                       "candidates": list(candidates) if candidates is not None else None,
                       **({"exclude": list(exclude), "keep_first_and_last": False} if exclude is not None else {})},
        finetune={"epochs": finetune_epochs, "device": torch_device})
    resolve_torch_device(profile.finetune.device)  # cuda asked for and absent is refused before any work
    check_teacher_settings(teacher, teacher_weights, epochs=profile.finetune.epochs, profile=profile.name)
    if device is not None:
        profile = dataclasses.replace(profile, device=dataclasses.replace(profile.device, default=device))
    board = parse_device(profile.device.default)  # an unknown device is refused before any work
    samples = profile.evaluation.samples if eval_samples is None else eval_samples
    if samples < 0:
        raise ConfigError(f"EVAL_SAMPLES={samples}; expected 0 (the full test set) or a positive count")
    if baseline is not None:
        check_given_baseline(baseline, profile)
    out = check_output(build_folder(profile.name, out), kind="deploy",
                       inputs=[*run_inputs(target, model, weights, data, teacher_weights), baseline])
    if is_int8_tflite(model):  # nothing to compress: measured as it is
        with writing(out):
            return measure_int8_file(profile, model=model, data=data, samples=samples, mean=mean, std=std, out=out,
                                     progress=progress, started=started)
    with writing(out):
        return _deploy(profile, board if device is not None else None, model=model, weights=weights, data=data,
                       samples=samples, device_samples=profile.device.samples if eval_samples is None else samples,
                       input_shape=input_shape, mean=mean, std=std, signature=signature, baseline=baseline, out=out,
                       teacher=teacher, teacher_weights=teacher_weights, progress=progress, started=started)


def run_inputs(target: str, model: str, weights: str | None, data: str | None, *more: str | None) -> list[str | None]:
    """The user's files a run reads, which its output folder must not hold."""
    source = model if is_tensorflow_model(model) else model.rsplit(":", 1)[0]
    return [target if target.endswith(".toml") else None,
            source if source.endswith((".py", ".onnx")) or is_tensorflow_model(source) else None,
            weights, data, *more]


def _deploy(profile: TargetProfile, board: Device | None, *, model, weights, data, samples, device_samples,
            input_shape, mean, std, signature, baseline, out: Path, teacher, teacher_weights, progress: bool,
            started: float) -> DeployReport:
    torch.manual_seed(SEED)
    spec = load_model(model, weights, input_shape=input_shape, mean=mean, std=std, signature=signature)
    judge = load_model(teacher, teacher_weights) if teacher is not None else None
    if judge is not None:
        as_teacher(judge, spec)  # one that reads other images or answers in other classes is refused before any work
    if baseline is not None and read_tflite(baseline).input_shape != spec.input_shape:
        raise InputError(f"BASELINE={baseline} takes {read_tflite(baseline).input_shape} (C x H x W); the model "
                         f"{model!r} takes {spec.input_shape}: expected the same model's int8 file")
    splits = load_data(data, hint=Hint(*spec.input_shape))
    splits.check_for(input_shape=spec.input_shape, num_classes=spec.num_classes, model=model)
    eval_idx = balanced_subset(splits.test.y, samples or None, seed=SEED)
    staging = staging_beside(out)
    try:
        build = Build(profile, spec, splits, preprocess(splits.test.x[eval_idx], mean=spec.mean, std=spec.std),
                      splits.test.y[eval_idx], staging, board, device_samples=device_samples, progress=progress,
                      started=started, given_baseline=Path(baseline).resolve() if baseline is not None else None,
                      teacher=judge)
        for stage in STAGES:
            stage(build)
        mark(staging, "deploy")
        check_output(out, kind="deploy")  # still ours: nothing else moved in while the run worked
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return build.report
