"""Measure a full-int8 .tflite: accuracy in TFLite Micro and ai-edge-litert, agreement with ONNX Runtime's
int8 model on the same inputs, arena bytes (recorded and smallest that runs), flash bytes and host latency."""

from importlib import metadata
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as tfl
from tqdm import tqdm

from pipeline.metrics import VariantReport, agreement, on_this_host, per_class, top1
from pipeline.onnx.cost import onnx_cost
from pipeline.onnx.run import reference_session, run
from pipeline.tflm import interpreter
from pipeline.tflm.convert import before_final_softmax, tflite_bytes
from pipeline.tflm.firmware import operator_shapes
from pipeline.util import host_machine, median_ms


def largest_tensors(model_bytes: bytes, count: int = 3) -> list[tuple[str, int]]:
    """The biggest activation tensors (name, bytes): what to shrink when the arena does not fit."""
    graph = tfl.ModelT.InitFromPackedBuf(model_bytes, 0).subgraphs[0]
    sizes = [(t.name.decode() if isinstance(t.name, bytes) else t.name, int(np.prod(t.shape)))
             for t in graph.tensors if t.buffer == 0]
    return sorted(sizes, key=lambda item: -item[1])[:count]


_ITEMSIZE = {tfl.TensorType.INT8: 1, tfl.TensorType.UINT8: 1, tfl.TensorType.INT16: 2, tfl.TensorType.INT32: 4,
             tfl.TensorType.FLOAT32: 4, tfl.TensorType.INT64: 8, tfl.TensorType.BOOL: 1}


def peak_activation_bytes(model_bytes: bytes) -> int:
    """Largest total size of the tensors alive at once, running the .tflite's operators in order: the graph
    TFLM runs, so the PAD tensors the converter adds (stride-2 convs with symmetric padding) count. TFLM's arena
    adds its own bookkeeping and kernels' scratch buffers on top."""
    model = tfl.ModelT.InitFromPackedBuf(model_bytes, 0)
    graph = model.subgraphs[0]
    constant = {i for i, t in enumerate(graph.tensors) if model.buffers[t.buffer].data is not None
                and len(model.buffers[t.buffer].data)}

    def size(i: int) -> int:
        t = graph.tensors[i]
        return 0 if i in constant else int(np.prod(t.shape)) * _ITEMSIZE.get(t.type, 4)

    last_use = {}
    for step, op in enumerate(graph.operators):
        for i in op.inputs:
            last_use[i] = step
    for i in graph.outputs:
        last_use[i] = len(graph.operators)
    alive = {i for i in graph.inputs if i not in constant}
    peak = sum(size(i) for i in alive)
    for step, op in enumerate(graph.operators):
        alive |= {i for i in op.outputs if i >= 0}
        peak = max(peak, sum(size(i) for i in alive))
        alive = {i for i in alive if last_use.get(i, -1) > step}
    return peak


def _tflm_latency_ms(model_bytes: bytes, sample: np.ndarray, *, runs: int, warmup: int) -> float:
    it = interpreter.tflm_interpreter(model_bytes)
    it.set_input(sample[None], 0)
    return median_ms(it.invoke, runs=runs, warmup=warmup)


def output_difference_steps(model_bytes: bytes, quantized_onnx: Path, eval_x: np.ndarray, *, logits: np.ndarray,
                            ort_int8: np.ndarray) -> tuple[float, str]:
    """The largest |TFLM - ORT int8| in quantization steps, and which tensor it was taken on: the output, or the
    logits when the model ends in a softmax (see `before_final_softmax`)."""
    io = interpreter.io_quant(model_bytes)
    cut = before_final_softmax(quantized_onnx)
    if cut is None:
        return round(float(np.max(np.abs(logits - ort_int8)) / io.output_scale), 3), "output"
    cut_bytes = tflite_bytes(cut)
    cut_io = interpreter.io_quant(cut_bytes)
    micro = interpreter.dequantize_output(interpreter.run_tflm(cut_bytes, interpreter.quantize_input(eval_x, cut_io)), cut_io)
    ort = run(reference_session(cut.SerializeToString()), eval_x)
    return round(float(np.max(np.abs(micro.reshape(ort.shape) - ort)) / cut_io.output_scale), 3), \
        "logits (the input of the final Softmax)"


def tflite_layers(model_bytes: bytes) -> list[dict]:
    """Each operator's MACs and weights, read from the file (for a .tflite given as it is, with no ONNX beside it)."""
    model = tfl.ModelT.InitFromPackedBuf(model_bytes, 0)
    graph = model.subgraphs[0]
    layers = []
    for step, shape in enumerate(operator_shapes(model_bytes)):
        op = graph.operators[step]
        weights = [graph.tensors[i] for i in op.inputs[1:] if i >= 0]
        params = sum(int(np.prod(t.shape)) for t in weights if model.buffers[t.buffer].data is not None
                     and len(model.buffers[t.buffer].data))
        out = graph.tensors[op.outputs[0]].name
        layers.append({"name": out.decode() if isinstance(out, bytes) else out, "op": shape["op"],
                       "macs": shape["macs"], "params": params})
    return layers


def measure_tflite(tflite_path: Path, *, quantized_onnx: Path | None, eval_x: np.ndarray, eval_y: np.ndarray,
                   class_names, reference: np.ndarray | None, latency_runs: int, latency_warmup: int, label: str = "",
                   progress: bool = True) -> tuple[VariantReport, np.ndarray]:
    """`quantized_onnx`: the QDQ file it was converted from, compared with it; None for a .tflite given as it is
    (its MACs and weights then read from the file). `reference`: the logits agreement is taken against (None:
    itself)."""
    model_bytes = tflite_path.read_bytes()
    io = interpreter.io_quant(model_bytes)
    x_int8 = interpreter.quantize_input(eval_x, io)
    chunks = range(0, len(x_int8), 100)
    micro = np.concatenate([interpreter.run_tflm(model_bytes, x_int8[i:i + 100])
                            for i in tqdm(chunks, desc=f"TFLM {label}", unit="x100", leave=False, disable=not progress)])
    logits = interpreter.dequantize_output(micro, io)
    lite = interpreter.dequantize_output(interpreter.run_litert(model_bytes, x_int8), io)
    recorded = interpreter.arena_bytes(model_bytes)
    against_onnx = {}
    if quantized_onnx is not None:
        # the converter is judged on the QDQ file's meaning, the same on every host: fused, 13 of 20 per-operator
        # tests missed their step bound on a CPU without VNNI, and a ResNet-8 with 8-channel layers agreed on 51%
        ort_int8 = run(reference_session(quantized_onnx), eval_x)
        steps, compared_on = output_difference_steps(model_bytes, quantized_onnx, eval_x, logits=logits,
                                                     ort_int8=ort_int8)
        against_onnx = {"ort_int8_top1": top1(ort_int8, eval_y), "ort_agreement": agreement(logits, ort_int8),
                        "max_output_diff_steps": steps, "output_diff_on": compared_on}
        cost = onnx_cost(quantized_onnx)
        layers = [{"name": layer.name, "op": layer.op, "macs": layer.macs, "params": layer.params}
                  for layer in cost.layers]
    else:
        layers = tflite_layers(model_bytes)
    host_ms = round(_tflm_latency_ms(model_bytes, x_int8[0], runs=latency_runs, warmup=latency_warmup), 4)
    report = VariantReport(
        macs=sum(layer["macs"] for layer in layers), params=sum(layer["params"] for layer in layers),
        bytes=len(model_bytes), peak_activation_bytes=peak_activation_bytes(model_bytes),
        top1=top1(logits, eval_y), agreement=agreement(logits, logits if reference is None else reference),
        latency_ms=host_ms,
        runtime=f"tflite-micro {metadata.version('tflite-micro')} (reference kernels)", machine=host_machine(),
        per_class=per_class(logits, eval_y, class_names),
        host_latency_ms=host_ms, latency_on=on_this_host(),
        layers=tuple(layers),
        details={
            "flash_bytes": len(model_bytes),
            "arena_bytes": recorded,
            "smallest_arena_bytes": interpreter.smallest_arena(model_bytes, x_int8[0], hint=recorded),
            "litert_top1": top1(lite, eval_y),
            **against_onnx,
            "input_quantization": {"scale": io.input_scale, "zero_point": io.input_zero_point},
            "output_quantization": {"scale": io.output_scale, "zero_point": io.output_zero_point},
            "largest_tensors": largest_tensors(model_bytes),
        },
    )
    return report, logits
