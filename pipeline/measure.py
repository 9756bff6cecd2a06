"""The measure stage: what an artefact costs and how accurate it is, on the runtime that will run it."""

import platform
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from pipeline.accuracy import agreement, per_class, top1
from pipeline.onnx_cost import onnx_cost
from pipeline.onnx_run import run, session


def host_machine() -> str:
    """Which machine computed host figures: architecture and CPU model (int8 results depend on it)."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{platform.machine()} host, {model}".rstrip(", ")


@dataclass(frozen=True)
class VariantReport:
    macs: int
    params: int
    bytes: int
    peak_activation_bytes: int
    top1: float
    agreement: float
    latency_ms: float
    runtime: str
    machine: str
    per_class: dict[str, float] = field(default_factory=dict)
    layers: tuple[dict, ...] = ()
    details: dict = field(default_factory=dict)  # runtime-specific figures (TFLM arena, ORT agreement, ...)


def latency_ms(path, *, sample: np.ndarray, runs: int, warmup: int) -> float:
    """Median wall time of one single-image inference on one thread, after warm-up runs."""
    sess = session(path, threads=1)
    name = sess.get_inputs()[0].name
    feed = {name: sample[None]}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_onnx(path, *, eval_x: np.ndarray, eval_y: np.ndarray, class_names, reference: np.ndarray | None,
                 latency_runs: int, latency_warmup: int, label: str = "") -> tuple[VariantReport, np.ndarray]:
    """Cost from the graph, accuracy and latency from ONNX Runtime; `reference` logits give the agreement."""
    cost = onnx_cost(path)
    sess = session(path)
    logits = np.concatenate([run(sess, eval_x[i:i + 500]) for i in
                             tqdm(range(0, len(eval_x), 500), desc=f"measure {label}", unit="batch", leave=False)])
    report = VariantReport(
        macs=cost.macs, params=cost.params, bytes=path.stat().st_size, peak_activation_bytes=cost.peak_activation_bytes,
        top1=top1(logits, eval_y), agreement=agreement(logits, reference if reference is not None else logits),
        latency_ms=round(latency_ms(path, sample=eval_x[0], runs=latency_runs, warmup=latency_warmup), 4),
        runtime=f"onnxruntime {ort.__version__}", machine=host_machine(),
        per_class=per_class(logits, eval_y, class_names),
        layers=tuple({"name": layer.name, "op": layer.op, "macs": layer.macs, "params": layer.params}
                     for layer in cost.layers),
    )
    return report, logits
