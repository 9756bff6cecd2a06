"""Measure an ONNX Runtime variant: cost from the graph, accuracy and latency on the runtime that will run it."""

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from pipeline.metrics import VariantReport, agreement, on_this_host, per_class, top1
from pipeline.onnx.cost import onnx_cost
from pipeline.onnx.run import reference_session, run, session
from pipeline.util import host_machine, median_ms


def latency_ms(path, *, sample: np.ndarray, runs: int, warmup: int) -> float:
    """Median wall time of one single-image inference on one thread, after warm-up runs."""
    sess = session(path, threads=1)
    feed = {sess.get_inputs()[0].name: sample[None]}
    return median_ms(lambda: sess.run(None, feed), runs=runs, warmup=warmup)


def measure_onnx(path, *, eval_x: np.ndarray, eval_y: np.ndarray, class_names, reference: np.ndarray | None,
                 latency_runs: int, latency_warmup: int, label: str = "",
                 progress: bool = True) -> tuple[VariantReport, np.ndarray]:
    """Cost from the graph, accuracy from the file's own arithmetic (what ARM's int8 kernels compute, on any host)
    and latency from ONNX Runtime's optimized session on this host; `reference` logits give the agreement."""
    cost = onnx_cost(path)
    sess = reference_session(path)
    logits = np.concatenate([run(sess, eval_x[i:i + 500]) for i in
                             tqdm(range(0, len(eval_x), 500), desc=f"measure {label}", unit="batch", leave=False,
                                  disable=not progress)])
    host_ms = round(latency_ms(path, sample=eval_x[0], runs=latency_runs, warmup=latency_warmup), 4)
    report = VariantReport(
        macs=cost.macs, params=cost.params, bytes=path.stat().st_size, peak_activation_bytes=cost.peak_activation_bytes,
        top1=top1(logits, eval_y), agreement=agreement(logits, reference if reference is not None else logits),
        latency_ms=host_ms,
        runtime=f"onnxruntime {ort.__version__}", machine=host_machine(),
        per_class=per_class(logits, eval_y, class_names),
        host_latency_ms=host_ms, latency_on=on_this_host(),
        layers=tuple({"name": layer.name, "op": layer.op, "macs": layer.macs, "params": layer.params}
                     for layer in cost.layers),
    )
    return report, logits
