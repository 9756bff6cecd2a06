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
from pipeline.decompose import METHODS, decompose
from pipeline.emit import emit_onnxruntime
from pipeline.errors import ConfigError, InputError, unknown
from pipeline.export import export_onnx
from pipeline.manifest import write_manifest
from pipeline.measure import measure_onnx
from pipeline.quantize import quantize_onnx
from pipeline.ranks import parse_rank
from pipeline.report import DeployReport, write_reports
from pipeline.simplify import simplify_onnx
from pipeline.targets import load_target
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


def deploy(*, target: str = "rpi4", model: str = "seednet", weights: str | None = None, method: str | None = None,
           rank: str | None = None, data: str | None = None, eval_samples: int | None = None,
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
    profile = dataclasses.replace(profile, decomposition=decomposition)
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
        _stage(f"decompose {model} ({decomposition.method}, rank {decomposition.rank})")
        factored, plan = decompose(spec.module, input_shape=spec.input_shape, method=decomposition.method,
                                   rank=decomposition.rank, layers=decomposition.layers, exclude=decomposition.exclude,
                                   round_to=decomposition.round_to, seed=SEED, progress=progress)
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
        _stage("emit onnxruntime artefacts")
        emitted = emit_onnxruntime(staging, int8_onnx=onnx_files["factored_int8"], fp32_onnx=onnx_files["factored_fp32"])
        for name in ("factored_fp32", "factored_int8"):
            onnx_files[name].unlink()
        onnx_files["factored_fp32"], onnx_files["factored_int8"] = emitted["fp32_onnx"], emitted["int8_onnx"]

        _stage(f"measure four variants on {len(eval_y)} test images")
        variants, reference = {}, None
        for name in ("dense_fp32", "dense_int8", "factored_fp32", "factored_int8"):
            variants[name], logits = measure_onnx(onnx_files[name], eval_x=eval_x, eval_y=eval_y,
                                                  class_names=spec.class_names, reference=reference,
                                                  latency_runs=profile.evaluation.latency_runs,
                                                  latency_warmup=profile.evaluation.latency_warmup, label=name)
            reference = logits if reference is None else reference
        drop = variants["dense_fp32"].top1 - variants["factored_int8"].top1
        passed = bool(drop <= profile.thresholds.max_top1_drop + 1e-12)
        report = DeployReport(target=target, model=model, variants=variants, decomposition=plan.to_dict(),
                              eval_samples=int(len(eval_y)), thresholds=dataclasses.asdict(profile.thresholds),
                              passed=passed, top1_drop=round(float(drop), 6), notes=tuple(notes),
                              wall_seconds=round(time.perf_counter() - started, 1))
        written = write_reports(staging, report, plan.table())
        artefacts = [*emitted.values(), *written, *(staging / "baseline").glob("*.onnx")]
        write_manifest(staging, artefacts=artefacts, checkpoint=spec.weights, checkpoint_sha256=spec.weights_sha256,
                       profile=profile.to_dict(),
                       settings={"model": model, "eval_samples": int(len(eval_y)), "data": str(data) if data else None,
                                 "seed": SEED},
                       passed=passed)
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


