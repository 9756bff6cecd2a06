"""Deploy orchestration: the only place that knows the order of the stages.

decompose -> export -> simplify -> quantize -> emit, for the dense and the factored model, then measure
all four variants and write the reports. The build is assembled in a staging folder beside the output
and swapped in only when complete, so a failure or Ctrl-C leaves the previous build intact.
"""

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from calib import balanced_subset, load_dataset, preprocess
from pipeline.compress import check_settings, compress, with_overrides
from pipeline.decompose import METHODS
from pipeline.device import parse_device
from pipeline.emit import emit_onnxruntime
from pipeline.emit_mcu import arena_with_margin, emit_mcu
from pipeline.errors import ConfigError, InputError, StageError, unknown
from pipeline.export import export_onnx
from pipeline.manifest import write_manifest
from pipeline.measure import measure_onnx
from pipeline.measure_tflm import measure_tflite
from pipeline.quantize import quantize_onnx
from pipeline.ranks import parse_rank
from pipeline.regress import check_on_device
from pipeline.report import DeployReport, write_reports
from pipeline.simplify import simplify_onnx
from pipeline.targets import load_target
from pipeline.tflite_convert import convert_to_tflite
from pipeline.zoo import load_model

SEED = 0
CHECK_SAMPLES = 64  # real test images used to check export and simplification


def _stage(message: str) -> None:
    print(f"[deploy] {message}", flush=True)


def _prepare_output(out: Path) -> Path:
    """A fresh staging folder beside `out` (same filesystem, so the final swap is a rename)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        staging.chmod(0o755)  # mkdtemp makes 0700; the build folder is for others to read
        return staging
    except OSError as exc:
        raise InputError(f"Output folder {str(out)!r} is not writable ({exc.strerror}); choose another with OUT=") from exc


def _swap_in(staging: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


MEASURE_ORDER = ("dense_fp32", "dense_int8", "factored_fp32", "factored_int8")


def _measure_fp32(files: dict, name: str, profile, eval_x, eval_y, class_names, reference):
    return measure_onnx(files[name], eval_x=eval_x, eval_y=eval_y, class_names=class_names, reference=reference,
                        latency_runs=profile.evaluation.latency_runs, latency_warmup=profile.evaluation.latency_warmup,
                        label=name)


def _emit_and_measure_ort(staging, files, profile, eval_x, eval_y, class_names):
    _stage("emit onnxruntime artefacts")
    emitted = emit_onnxruntime(staging, int8_onnx=files["factored_int8"], fp32_onnx=files["factored_fp32"])
    for name in ("factored_fp32", "factored_int8"):
        files[name].unlink()
    files["factored_fp32"], files["factored_int8"] = emitted["fp32_onnx"], emitted["int8_onnx"]
    _stage(f"measure four variants on {len(eval_y)} test images (onnxruntime)")
    variants, reference = {}, None
    for name in MEASURE_ORDER:
        variants[name], logits = _measure_fp32(files, name, profile, eval_x, eval_y, class_names, reference)
        reference = logits if reference is None else reference
    return variants, emitted


def _emit_and_measure_mcu(staging, files, profile, eval_x, eval_y, class_names):
    _stage("convert int8 ONNX to TFLite (dense and factored)")
    tflite = {name: convert_to_tflite(files[f"{name}_int8"], staging / "baseline" / f"{name}.int8.tflite")
              for name in ("dense", "factored")}
    _stage(f"measure four variants on {len(eval_y)} test images (fp32: onnxruntime, int8: tflite-micro)")
    variants, reference = {}, None
    for name in MEASURE_ORDER:
        if name.endswith("fp32"):
            variants[name], logits = _measure_fp32(files, name, profile, eval_x, eval_y, class_names, reference)
        else:
            base = name.removesuffix("_int8")
            variants[name], logits = measure_tflite(
                tflite[base], quantized_onnx=files[name], eval_x=eval_x, eval_y=eval_y, class_names=class_names,
                reference=reference, latency_runs=profile.evaluation.latency_runs,
                latency_warmup=profile.evaluation.latency_warmup, label=name)
        reference = logits if reference is None else reference
    details = variants["factored_int8"].details
    arena = arena_with_margin(details["arena_bytes"], profile.budget.arena_margin)
    check_budget(profile.budget, arena=arena, flash=details["flash_bytes"], largest=details["largest_tensors"],
                 target=profile.name)
    _stage("emit firmware sources")
    emitted = emit_mcu(staging, tflite=tflite["factored"], arena_bytes=arena,
                       io={"input_scale": details["input_quantization"]["scale"],
                           "input_zero_point": details["input_quantization"]["zero_point"],
                           "output_scale": details["output_quantization"]["scale"],
                           "output_zero_point": details["output_quantization"]["zero_point"]})
    tflite["factored"].unlink()
    return variants, emitted


def check_budget(budget, *, arena: int, flash: int, largest, target: str) -> None:
    """A model that does not fit the part is an error, with what it needs against what there is."""
    problems = []
    ram = budget.ram_bytes - budget.ram_reserve_bytes
    if budget.ram_bytes and arena > ram:
        biggest = ", ".join(f"{name} {size:,} B" for name, size in largest)
        problems.append(f"arena needs {arena:,} bytes but {ram:,} are free ({budget.ram_bytes:,} RAM - "
                        f"{budget.ram_reserve_bytes:,} reserved); biggest tensors: {biggest}")
    room = budget.flash_bytes - budget.flash_reserve_bytes
    if budget.flash_bytes and flash > room:
        problems.append(f"model needs {flash:,} bytes of flash but {room:,} are free ({budget.flash_bytes:,} flash - "
                        f"{budget.flash_reserve_bytes:,} reserved)")
    if problems:
        raise StageError(f"Model does not fit target {target!r}: " + "; ".join(problems))


def _threshold_failures(profile, variants, drop: float) -> list[str]:
    t = profile.thresholds
    failures = []
    if drop > t.max_top1_drop + 1e-12:
        failures.append(f"threshold missed: top-1 drop {drop * 100:.2f} points > {t.max_top1_drop * 100:.2f} allowed")
    details = variants["factored_int8"].details
    if "ort_agreement" in details:
        if details["ort_agreement"] < t.min_ort_agreement:
            failures.append(f"threshold missed: TFLM agrees with ONNX Runtime int8 on {details['ort_agreement']:.2%} "
                            f"of images < {t.min_ort_agreement:.2%}")
        if details["max_output_diff_steps"] > t.max_output_diff_steps:
            failures.append(f"threshold missed: TFLM output differs from ONNX Runtime int8 by "
                            f"{details['max_output_diff_steps']} steps > {t.max_output_diff_steps}")
    return failures


def deploy(*, target: str = "rpi4", model: str = "seednet", weights: str | None = None, method: str | None = None,
           rank: str | None = None, budget: str | None = None, finetune_epochs: int | None = None,
           data: str | None = None, eval_samples: int | None = None,
           out: str | os.PathLike | None = None, progress: bool = True) -> DeployReport:
    started = time.perf_counter()
    profile = load_target(target)
    decomposition = profile.decomposition
    if method is not None:
        if method not in METHODS:
            raise unknown("method", method, METHODS)
        decomposition = dataclasses.replace(decomposition, method=method)
    if rank is not None:
        parse_rank(rank)  # refuse a bad rank before any work
        decomposition = dataclasses.replace(decomposition, rank=str(rank))
    decomposition, tuning = with_overrides(decomposition, profile.finetune, budget=budget, finetune_epochs=finetune_epochs)
    check_settings(decomposition, tuning)  # a bad budget or epoch count is refused before any work
    profile = dataclasses.replace(profile, decomposition=decomposition, finetune=tuning)
    if profile.device.check_on_deploy:
        parse_device(profile.device.default)  # an unknown device is refused before any work
    samples = profile.evaluation.samples if eval_samples is None else eval_samples
    if samples < 0:
        raise ConfigError(f"EVAL_SAMPLES={samples}; expected 0 (the full test set) or a positive count")
    out = Path(out) if out is not None else Path("build") / target
    torch.manual_seed(SEED)

    spec = load_model(model, weights)
    train_set, test_set = load_dataset("train", data), load_dataset("test", data)
    if train_set.x.shape[1:3] != spec.input_shape[1:]:
        raise InputError(f"Images of {train_set.x.shape[1]}x{train_set.x.shape[2]} pixels; model {model!r} "
                         f"expects {spec.input_shape[1]}x{spec.input_shape[2]}")
    calibration = preprocess(train_set.x[balanced_subset(train_set.y, profile.quantization.calibration_samples, seed=SEED)],
                             mean=spec.mean, std=spec.std)
    eval_idx = balanced_subset(test_set.y, samples or None, seed=SEED)
    eval_x = preprocess(test_set.x[eval_idx], mean=spec.mean, std=spec.std)
    eval_y = test_set.y[eval_idx]
    check_x = eval_x[:CHECK_SAMPLES]

    staging = _prepare_output(out)
    try:
        how = (f"budget {decomposition.budget}" if decomposition.budget
               else f"{decomposition.method}, rank {decomposition.rank}")
        fine = f", then {tuning.epochs} epochs of distillation" if tuning.epochs else ""
        _stage(f"decompose {model} ({how}{fine})")
        compressed = compress(spec, train_set, settings=decomposition, tuning=tuning, quantization=profile.quantization,
                              seed=SEED, progress=progress, log=_stage)
        factored, plan = compressed.model, compressed.plan
        print(plan.table(), flush=True)
        work = staging / "baseline"
        work.mkdir()
        onnx_files, notes = {}, []
        for name, module in (("dense", spec.module), ("factored", factored)):
            _stage(f"export + simplify + quantize ({name})")
            raw, diff = export_onnx(module, work / f"{name}.raw.onnx", check_inputs=check_x)
            notes.append(f"{name}: exported ONNX matches torch to {diff:.2g} (max abs) on {len(check_x)} test images")
            simple, note = simplify_onnx(raw, work / f"{name}.fp32.onnx", check_inputs=check_x)
            raw.unlink()
            if note:
                notes.append(f"{name}: {note}")
            onnx_files[f"{name}_fp32"] = simple
            onnx_files[f"{name}_int8"] = quantize_onnx(simple, work / f"{name}.int8.onnx", calibration=calibration,
                                                       settings=profile.quantization)
        if profile.runtime == "onnxruntime":
            variants, emitted = _emit_and_measure_ort(staging, onnx_files, profile, eval_x, eval_y, spec.class_names)
        else:
            variants, emitted = _emit_and_measure_mcu(staging, onnx_files, profile, eval_x, eval_y, spec.class_names)
        drop = variants["dense_fp32"].top1 - variants["factored_int8"].top1
        failures = _threshold_failures(profile, variants, drop)
        device_report = None
        if profile.device.check_on_deploy:
            idx = balanced_subset(test_set.y, profile.device.samples or None, seed=SEED)
            device_report = check_on_device(
                staging, runtime=profile.runtime, target=profile.name, thresholds=dataclasses.asdict(profile.thresholds),
                eval_x=preprocess(test_set.x[idx], mean=spec.mean, std=spec.std), eval_y=test_set.y[idx],
                device=parse_device(profile.device.default), accept=True, log=_stage)
            failures += [f"device check on {device_report.device}: {f}" for f in device_report.failures]
        passed = not failures
        report = DeployReport(target=profile.name, model=model, variants=variants, decomposition=compressed.record(),
                              eval_samples=int(len(eval_y)), thresholds=dataclasses.asdict(profile.thresholds),
                              passed=passed, top1_drop=round(float(drop), 6), notes=tuple(notes),
                              failures=tuple(failures),
                              device=device_report.to_dict() if device_report else None,
                              wall_seconds=round(time.perf_counter() - started, 1))
        written = write_reports(staging, report, plan.table())
        artefacts = [*emitted.values(), *(staging / "baseline").iterdir()]
        write_manifest(staging, artefacts=artefacts, reports=written, checkpoint=spec.weights, checkpoint_sha256=spec.weights_sha256,
                       profile=profile.to_dict(),
                       settings={"model": model, "eval_samples": int(len(eval_y)), "data": str(data) if data else None,
                                 "seed": SEED, "input_shape": list(spec.input_shape), "mean": list(spec.mean),
                                 "std": list(spec.std)},
                       passed=passed)
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


